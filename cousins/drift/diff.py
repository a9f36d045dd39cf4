"""The drift diff: per cousin, its generations and scores joined with the original's by row key into
drift rows (drift/cousin={name}/, computed on Ray Data workers: drift/rows.py), then summaries with
bootstrap CIs (summary.json, records.Summary) and report.html. CPU only: reads stored generations
and scores, never an engine (this package does not import the engine modules). `recompute` redoes
it for a committed run, on the connected Ray.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pyarrow as pa

from cousins import schema
from cousins.drift.rows import drift_rows, load_error
from cousins.drift.metrics import KLD_BOUND, rest_mass_warning
from cousins.drift.summary import BootstrapSpec, summarise
from cousins.records import NOISE_FLOOR, DriftDone, Headline, ModelEntry, Summary, decode, encode
from cousins.run import Run, committed, now
from cousins.storage import Location, data_files


@dataclass(frozen=True)
class DiffSettings:
    """What the diff needs besides the stored rows (from the drift config)."""

    score_topk: int
    answer_match: str
    bootstrap: BootstrapSpec
    worst_n: int


def _read(run: Run, stage: Location, columns: list[str] | None = None) -> pa.Table | None:
    """A stage sorted by row key; None when it holds no part."""
    if not data_files(stage):
        return None
    t = run.read(stage, columns)
    return t.sort_by([(k, "ascending") for k in ("prompt_id", "sample_index") if k in t.column_names])


def stage_diff(run: Run, entries: list[ModelEntry], settings: DiffSettings, *, extra: dict | None = None,
               timings: dict | None = None) -> dict:
    """Drift rows for every cousin (and the noise floor), summary.json and report.html; returns the
    summary (as written). `entries` are the run's models, the original first. `extra` (the run's
    accounting) and `timings` of the earlier stages go into the summary and the report."""
    from cousins.report import render_report

    t0 = time.perf_counter()
    layout, original = run.layout, entries[0]
    errors = {e.name: load_error(layout.generations(e.name)) for e in entries[1:]}
    token_level = {e.name: not (e.text_only or errors[e.name]) for e in entries[1:]}
    written = drift_rows(run, entries, token_level, answer_match=settings.answer_match)
    expected = run.count(layout.generations(original.name))
    spec = settings.bootstrap
    summaries, tables = {}, []
    for e in entries[1:]:
        stage = layout.drift(e.name)
        run.verify(stage, expected, f"drift rows of {e.name!r}", ["prompt_id", "sample_index"])
        rows, nodes = written[e.name]
        run.finish(stage, DriftDone(rows=rows, nodes=nodes))
        drift = _read(run, stage)
        drift = schema.DRIFT.empty_table() if drift is None else drift
        summaries[e.name] = summarise(e.name, e.kind, drift, spec, text_only=not token_level[e.name],
                                      error=errors[e.name])
        tables.append(drift)
    noise = summaries.pop(NOISE_FLOOR, None)
    warnings = [w for s in summaries.values() if (w := rest_mass_warning(
        s["name"], (s["metrics"].get("rest_mass_mean") or {}).get("value"), settings.score_topk))]
    summary = {
        "run_id": run.run_id, "original": original.name, "score_topk": settings.score_topk,
        "prompts": run.count(layout.prompts),
        "bootstrap": {"resamples": spec.resamples, "level": spec.level, "seed": spec.seed,
                      "quantile_resamples": spec.quantile_resamples},
        "kld_bound": KLD_BOUND, "answer_match": settings.answer_match,
        "noise_floor": noise,
        "cousins": sorted(summaries.values(), key=_drift_rank),
        "warnings": warnings,
        "computed": now(),
        **(extra or {}),
    }
    diff_s = time.perf_counter() - t0
    html = render_report(summary, pa.concat_tables(tables) if tables else schema.DRIFT.empty_table(),
                         worst_n=settings.worst_n)
    summary["timings"] = {**(timings or {}), "diff_s": diff_s, "report_s": time.perf_counter() - t0 - diff_s}
    return run.write_summary(decode(Summary, encode(summary)), html)


def _drift_rank(s: dict):
    """Most drift first: token KLD mean where there is one, else 100 - chrF."""
    kld = (s["metrics"].get("kld_mean") or {}).get("value")
    chrf = (s["metrics"].get("chrf") or {}).get("value")
    return (s["error"] is not None, -(kld if kld is not None else -1.0), chrf if chrf is not None else 0.0)


def drift_headline(summary: dict) -> dict[str, Headline]:
    """The manifest's short view of the summary: per cousin, the figures a listing shows."""
    keys = ("kld_mean", "same_top1", "flip_rate", "length_ratio", "exact_match")
    out = {}
    for s in [*summary["cousins"], *([summary["noise_floor"]] if summary.get("noise_floor") else [])]:
        out[s["name"]] = Headline(kind=s["kind"], error=s["error"],
                                  **{k: (s["metrics"].get(k) or {}).get("value") for k in keys})
    return out


def recompute(root: Location, run_id: str, *, bootstrap: BootstrapSpec, answer_match: str, worst_n: int) -> dict:
    """Redo the diff of a committed drift run from its stored generations and scores: no Ray, no
    engine. The models come from its manifest, the top-k from its config; the presentation settings
    (bootstrap, answer_match, worst_n) are the caller's. Rewrites drift rows, summary, report and
    the manifest's drift headline."""
    done = committed(root, run_id)
    if done.manifest.get("drift") is None:
        raise FileNotFoundError(f"run {run_id!r} at {done.url} is not a drift run (its manifest has no drift)")
    run = Run(done.layout, "committed")
    entries = done.entries()
    score_topk = int((done.config().get("drift") or {}).get("score_topk") or 0)
    before = json.loads(done.layout.summary.read_text()) if done.layout.summary.exists() else {}
    kept = {k: before[k] for k in ("accounting", "cost_currency") if k in before}  # measured when it ran
    ran = {k: v for k, v in before.get("timings", {}).items()
           if k in ("generate_s", "score_s", "generate_busy_s", "score_busy_s")}
    summary = stage_diff(run, entries, DiffSettings(score_topk=score_topk, answer_match=answer_match,
                                                    bootstrap=bootstrap, worst_n=worst_n), extra=kept, timings=ran)
    manifest = done.typed()
    manifest.drift = drift_headline(summary)
    manifest.drift_recomputed = summary["computed"]
    run.commit(manifest)
    return summary
