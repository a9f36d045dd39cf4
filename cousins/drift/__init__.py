"""Drift between an original model and its cousins: metrics (pure), the compare step, summaries."""
