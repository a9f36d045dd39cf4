"""The drift diff: per cousin, its generations and scores joined with the original's by row key into
drift rows (drift/cousin={name}/, computed on Ray Data workers: drift/rows.py), then summaries with
bootstrap CIs (summary.json, contract.summary.Summary) and report.html, made from the workers' mergeable
aggregates (drift/aggregate.py): the driver never holds a drift row. CPU only: reads stored generations
and scores, never an engine (this package does not import the engine modules). `recompute` redoes
it for a committed run, on the connected Ray.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from cousins.drift import answers
from cousins.drift.metrics import KLD_BOUND, KLD_EXACT, jaccard_pairs, pair_indices, rest_mass_warning
from cousins.drift.rows import drift_rows, first_texts, load_error
from cousins.drift.summary import QUANTILE_ERROR, BootstrapSpec, summary_of
from cousins.drift.plane import plane
from cousins.contract.codec import decode, encode
from cousins.contract.records import NOISE_FLOOR, DriftDone, Headline, ModelEntry
from cousins.contract.summary import Summary
from cousins.run.lifecycle import Run, StageIncomplete, committed, now
from cousins.run.storage import Location


@dataclass(frozen=True)
class DiffSettings:
    """What the diff needs besides the stored rows (from the drift config)."""

    score_topk: int
    rule: answers.Rule  # how labelled rows are judged (drift.answer_match, corpus.answer)
    bootstrap: BootstrapSpec
    worst_n: int
    kld: str = "topk"  # or exact: the kld/ stages' per-token KLD replaces the top-k bound


def _homogenisation(run: Run, merged: dict, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Per cousin, the homogenisation pairs' similarities: pairs of sample-0 answers picked by rank
    (metrics.pair_indices: known from the count alone) among the prompts that have one, or a fixed
    sample of them by hash on a large run (Merged.pair_prompts), then only those answers read back."""
    order = {}
    for name, m in merged.items():
        ids = m.pair_prompts()
        order[name] = (ids, pair_indices(len(ids), seed=seed))
    wanted = {name: sorted({ids[i] for pair in pairs for i in pair}) for name, (ids, pairs) in order.items()}
    texts = first_texts(run, wanted) if any(wanted.values()) else {}
    out = {}
    for name, (ids, pairs) in order.items():
        got = texts.get(name, {})
        out[name] = {side: jaccard_pairs({i: got.get(ids[i], ("", ""))[k] for pair in pairs for i in pair}, pairs)
                     for k, side in enumerate(("original", "cousin"))}
    return out


def stage_diff(run: Run, entries: list[ModelEntry], settings: DiffSettings, *, extra: dict | None = None,
               timings: dict | None = None) -> dict:
    """Drift rows for every cousin (and the noise floor), summary.json and report.html; returns the
    summary (as written). `entries` are the run's models, the original first. `extra` (the run's
    accounting) and `timings` of the earlier stages go into the summary and the report; with the
    accounting, the summary's capability-against-cost `plane` (cousins/drift/plane.py). Rows are
    computed and written by Ray Data workers; the driver merges their aggregates."""
    from cousins.drift.report import render_report  # (matplotlib is imported when a report is rendered)

    t0 = time.perf_counter()
    layout, original = run.layout, entries[0]
    errors = {e.name: load_error(layout.generations(e.name)) for e in entries[1:]}
    token_level = {e.name: not (e.text_only or errors[e.name]) for e in entries[1:]}
    spec = settings.bootstrap
    merged = drift_rows(run, entries, token_level, rule=settings.rule, worst_n=settings.worst_n,
                        seed=spec.seed, resamples=spec.resamples, quantile_resamples=spec.quantile_resamples,
                        exact_kld=settings.kld == "exact")
    expected = run.count(layout.generations(original.name))
    homogenisation = _homogenisation(run, merged, spec.seed)
    summaries = {}
    for e in entries[1:]:
        stage, m = layout.drift(e.name), merged[e.name]
        # Keys are distinct by construction (one worker owns a prompt, one row per original row, the
        # stage restarted first); the counts are checked from the Parquet footers, not from rows.
        on_disk = run.count(stage)
        if not m.rows == on_disk == expected:
            raise StageIncomplete(f"drift rows of {e.name!r}: {m.rows} computed, {on_disk} on storage, expected "
                                  f"{expected}; rerun the diff (drift.recompute=true run.run_id={run.run_id})")
        run.finish(stage, DriftDone(rows=m.rows, nodes=sorted(m.nodes)))
        summaries[e.name] = summary_of(m, e.kind, spec, error=errors[e.name], homogenisation=homogenisation[e.name])
    noise = summaries.pop(NOISE_FLOOR, None)
    exact = settings.kld == "exact"
    warnings = [] if exact else [w for s in summaries.values() if (w := rest_mass_warning(
        s["name"], (s["metrics"].get("rest_mass_mean") or {}).get("value"), settings.score_topk))]
    summary = {
        "run_id": run.run_id, "original": original.name, "score_topk": settings.score_topk,
        "prompts": run.count(layout.prompts),
        "bootstrap": {"resamples": spec.resamples, "level": spec.level, "seed": spec.seed,
                      "quantile_resamples": spec.quantile_resamples},
        "kld_bound": KLD_EXACT if exact else KLD_BOUND, "kld": settings.kld, "answer_match": settings.rule.checker,
        "answer_checkers": checker_counts(layout.prompts, settings.rule),
        "quantile_error": QUANTILE_ERROR,
        "noise_floor": noise,
        "cousins": sorted(summaries.values(), key=_drift_rank),
        "warnings": warnings,
        "computed": now(),
        **(extra or {}),
    }
    if summary.get("accounting"):
        summary["plane"] = plane(summary["accounting"], {e.name: e.kind for e in entries}, level=spec.level,
                                 currency=summary.get("cost_currency") or "USD")
    diff_s = time.perf_counter() - t0
    html = render_report(summary, {name: m.view() for name, m in merged.items()})
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


def _count_checkers(batch: pa.Table, *, rule: answers.Rule) -> pa.Table:
    counts: dict[str, int] = {}
    for ref, choices, own in zip(batch.column("reference").to_pylist(), batch.column("choices").to_pylist(),
                                 batch.column("checker").to_pylist()):
        if ref is not None:
            name = rule.name(ref, choices, own)
            counts[name] = counts.get(name, 0) + 1
    return pa.table({"checker": list(counts), "prompts": list(counts.values())})


def checker_counts(prompts: Location, rule: answers.Rule) -> dict[str, int]:
    """Labelled prompts by the checker that judges them (what `auto` picked, per reference), counted
    by Ray Data workers; a few numbers reach the driver."""
    from cousins.contract.schema import PROMPTS
    from cousins.run.layout import read_rows

    ds = read_rows(prompts, ["reference", "choices", "checker"], schema=PROMPTS)  # older runs: nulls
    counts: dict[str, int] = {}
    if ds is not None:
        for r in ds.map_batches(_count_checkers, fn_kwargs={"rule": rule}, batch_format="pyarrow",
                                num_cpus=0.1).take_all():
            counts[r["checker"]] = counts.get(r["checker"], 0) + r["prompts"]
    return counts


def recompute(root: Location, run_id: str, *, bootstrap: BootstrapSpec, rule: answers.Rule, worst_n: int) -> dict:
    """Redo the diff of a committed drift run from its stored generations and scores on the
    connected Ray (no engine). The models come from its manifest, the top-k from its config; the presentation settings
    (bootstrap, the answer rule, worst_n) are the caller's. Rewrites drift rows, summary, report and
    the manifest's drift headline."""
    done = committed(root, run_id)
    if done.manifest.get("drift") is None:
        raise FileNotFoundError(f"run {run_id!r} at {done.url} is not a drift run (its manifest has no drift)")
    run = Run(done.layout, "committed")
    entries = done.entries()
    drift_cfg = done.config().get("drift") or {}
    score_topk = int(drift_cfg.get("score_topk") or 0)
    kld = drift_cfg.get("kld") or "topk"  # as it ran (exact reads the run's kld/ stages)
    before = json.loads(done.layout.summary.read_text()) if done.layout.summary.exists() else {}
    kept = {k: before[k] for k in ("accounting", "cost_currency", "kld_routes") if k in before}  # as it ran
    ran = {k: v for k, v in before.get("timings", {}).items()
           if k in ("generate_s", "score_s", "generate_busy_s", "score_busy_s", "kld_s")}
    summary = stage_diff(run, entries, DiffSettings(score_topk=score_topk, rule=rule,
                                                    bootstrap=bootstrap, worst_n=worst_n, kld=kld),
                         extra=kept, timings=ran)
    manifest = done.typed()
    manifest.drift = drift_headline(summary)
    manifest.drift_recomputed = summary["computed"]
    run.commit(manifest)
    return summary
