"""The drift diff: per cousin, its generations and scores joined with the original's by row key into
drift rows (drift/cousin={name}/), then summaries with bootstrap CIs (summary.json, records.Summary)
and report.html. CPU only: reads stored generations and scores through the run, never an engine
(this package does not import the engine modules). `recompute` redoes it for a committed run.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa

from cousins import schema
from cousins.drift import compare as cmp
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


def _read(run: Run, stage: Location, columns: list[str]) -> pa.Table | None:
    """A stage sorted by row key; None when it holds no part."""
    if not data_files(stage):
        return None
    t = run.read(stage, columns)
    return t.sort_by([(k, "ascending") for k in ("prompt_id", "sample_index") if k in t.column_names])


def _decoder(path: str) -> Callable[[list[int]], str] | None:
    """Token ids -> text with the original's tokenizer (the `tokenizers` library: light to load),
    to place divergent tokens in the texts; None without a local tokenizer.json."""
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(file)
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def stage_diff(run: Run, entries: list[ModelEntry], settings: DiffSettings, *, extra: dict | None = None,
               timings: dict | None = None) -> dict:
    """Drift rows for every cousin (and the noise floor), summary.json and report.html; returns the
    summary (as written). `entries` are the run's models, the original first. `extra` (the run's
    accounting) and `timings` of the earlier stages go into the summary and the report."""
    from cousins.report import render_report

    t0 = time.perf_counter()
    layout, original = run.layout, entries[0]
    prompts = _read(run, layout.prompts, ["prompt_id", "reference"])
    references = {p: r for p, r in zip(prompts.column("prompt_id").to_pylist(),
                                       prompts.column("reference").to_pylist()) if r is not None}
    og = _read(run, layout.generations(original.name), cmp.GEN_COLUMNS)
    so = _read(run, layout.scores(original.name), cmp.SCORE_COLUMNS)
    decode_ids = _decoder(original.path)
    spec = settings.bootstrap
    summaries, tables = {}, []
    for e in entries[1:]:
        cg = _read(run, layout.generations(e.name), cmp.GEN_COLUMNS)
        load_error = _load_error(cg)
        token_level = not (e.text_only or load_error)
        sc = _read(run, layout.scores(e.name), cmp.SCORE_COLUMNS) if token_level else None
        drift = cmp.compare(e.name, og, cg, so if token_level else None, sc, answer_match=settings.answer_match,
                            references=references, decode=decode_ids)
        run.write_part(layout.drift(e.name), drift, "part-00000.parquet")
        run.finish(layout.drift(e.name), DriftDone(rows=drift.num_rows))
        summaries[e.name] = summarise(e.name, e.kind, drift, spec, text_only=not token_level, error=load_error)
        tables.append(drift)
    noise = summaries.pop(NOISE_FLOOR, None)
    warnings = [w for s in summaries.values() if (w := rest_mass_warning(
        s["name"], (s["metrics"].get("rest_mass_mean") or {}).get("value"), settings.score_topk))]
    summary = {
        "run_id": run.run_id, "original": original.name, "score_topk": settings.score_topk,
        "prompts": len(set(og.column("prompt_id").to_pylist())),
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


def _load_error(gens: pa.Table | None) -> str | None:
    """The engine's load error when every row of a model failed with it."""
    if gens is None or gens.num_rows == 0:
        return "no generations"
    errors = gens.column("error").to_pylist()
    if all(e is not None and e.startswith("engine failed to load") for e in errors):
        return errors[0]
    return None


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
