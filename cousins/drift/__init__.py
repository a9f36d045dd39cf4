"""Drift between an original model and its cousins: metrics (pure), the compare step, the diff's mergeable aggregates and summaries, the capability-against-cost plane, and the HTML report."""
