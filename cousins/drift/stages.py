"""The drift run's stages after generation: score (teacher-forced, on the engines) and diff (CPU).

- score: every scoring model (the original, each token-level cousin, the noise floor) reads the
  ORIGINAL's generations and writes its distribution at every output position to
  scores/model={name}/. The noise floor scores in another order and batch size. A stage without its
  `_SUCCESS` marker is redone whole (scoring costs less than generating).
- diff: per cousin, its generations and scores joined with the original's by row key into drift
  rows (drift/cousin={name}/), then summaries with bootstrap CIs (summary.json) and report.html.
  Needs no engine: `recompute` redoes it from a committed run's stored generations and scores.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Callable

import pyarrow as pa
import pyarrow.dataset as pads

from cousins import engine, schema
from cousins.config import Config
from cousins.drift import compare as cmp
from cousins.drift.metrics import KLD_BOUND
from cousins.drift.summary import BootstrapSpec, summarise
from cousins.ledger import new_ledger
from cousins.storage import Location, RunLayout, data_files, done_info, is_done, mark_done, write_parquet_atomic

SCORE_INPUT = ["prompt_id", "sample_index", "prompt_text", "output_token_ids", "error"]


class ScoreIncomplete(RuntimeError):
    pass


def _read(loc: Location, columns: list[str] | None = None) -> pa.Table | None:
    files = data_files(loc)
    if not files:
        return None
    t = pads.dataset(files, filesystem=loc.arrow_fs(), format="parquet").to_table(columns=columns)
    return t.sort_by([(k, "ascending") for k in ("prompt_id", "sample_index") if k in t.column_names])


def stage_score(cfg: Config, layout: RunLayout, entry, original) -> dict:
    """Score the original's outputs with `entry` (a pipeline.ModelEntry); returns the stage's info."""
    import ray
    import ray.data

    from cousins.pipeline import LIGHT_TASK_CPUS, _write_part, engine_spec, placement

    out = layout.scores(entry.name)
    if is_done(out):
        return done_info(out)
    out.remove_tree()  # an unfinished attempt's parts are redone
    src = layout.generations(original.name)
    expected = done_info(src).get("rows") or _count(src)
    t0 = time.perf_counter()
    rows = ray.data.read_parquet(data_files(src), filesystem=src.arrow_fs(), columns=SCORE_INPUT,
                                 num_cpus=LIGHT_TASK_CPUS)
    where = placement(cfg, reorder=entry.reorder)
    if entry.reorder:
        rows = rows.random_shuffle(seed=cfg.drift.seed + 2)
    ledger = new_ledger()
    try:
        scored = engine.score(rows.repartition(max(cfg.engine.num_actors, -(-expected // where["batch_size"]))),
                              spec=engine_spec(cfg, entry), topk=cfg.drift.score_topk, ledger=ledger,
                              tolerate_load_failure=not entry.is_original, **where)
        scored.map_batches(_write_part, fn_kwargs={"out": out}, batch_size=cfg.storage.rows_per_file,
                           batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS).take_all()
        retries = ray.get(ledger.report.remote(f"score:{entry.name}"))
    finally:
        ray.kill(ledger)
    t = _read(out, ["prompt_id", "sample_index", "engine_time_s", "error"])
    keys = schema.row_keys(t) if t is not None else []
    if len(keys) != expected or len(set(keys)) != len(keys):
        raise ScoreIncomplete(f"scores of {entry.name!r}: {len(keys)} rows ({len(set(keys))} distinct), "
                              f"expected {expected}; rerun with the same run.run_id")
    d = t.to_pydict()
    info = {"rows": len(keys), "error_rows": sum(e is not None for e in d["error"]),
            "engine_s": sum(x or 0.0 for x in d["engine_time_s"]), "wall_s": time.perf_counter() - t0,
            "retries": retries, "batch_size": where["batch_size"], "reordered": entry.reorder}
    mark_done(out, info)
    return info


def _count(loc: Location) -> int:
    t = _read(loc, ["prompt_id"])
    return 0 if t is None else t.num_rows


def _decoder(path: str) -> Callable[[list[int]], str] | None:
    """Token ids -> text with the original's tokenizer (the `tokenizers` library: light to load),
    to place divergent tokens in the texts; None without a local tokenizer.json."""
    import os

    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(file)
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def stage_diff(cfg: Config, layout: RunLayout, entries: list, *, run_id: str, extra: dict | None = None,
               timings: dict | None = None) -> dict:
    """Drift rows for every cousin (and the noise floor), summary.json and report.html.
    Returns the summary. Reads stored generations and scores only. `extra` (e.g. the run's
    accounting) and `timings` of the earlier stages go into the summary and the report."""
    from cousins.report import render_report

    t0 = time.perf_counter()
    original = entries[0]
    prompts = _read(layout.prompts, ["prompt_id", "reference"])
    references = {p: r for p, r in zip(prompts.column("prompt_id").to_pylist(),
                                       prompts.column("reference").to_pylist()) if r is not None}
    og = _read(layout.generations(original.name), cmp.GEN_COLUMNS)
    so = _read(layout.scores(original.name), cmp.SCORE_COLUMNS)
    decode = _decoder(original.path)
    spec = BootstrapSpec(resamples=cfg.drift.bootstrap, level=cfg.drift.confidence, seed=cfg.drift.seed)
    summaries, tables = {}, []
    for e in entries[1:]:
        cg = _read(layout.generations(e.name), cmp.GEN_COLUMNS)
        sc = None if e.text_only else _read(layout.scores(e.name), cmp.SCORE_COLUMNS)
        load_error = _load_error(cg)
        if e.text_only or load_error:
            drift = cmp.compare(e.name, og, cg, None, None, answer_match=cfg.drift.answer_match,
                                references=references, decode=decode)
        else:
            drift = cmp.compare(e.name, og, cg, so, sc, answer_match=cfg.drift.answer_match,
                                references=references, decode=decode)
        out = layout.drift(e.name)
        write_parquet_atomic(drift, out.join("part-00000.parquet"))
        mark_done(out, {"rows": drift.num_rows})
        summaries[e.name] = summarise(e.name, e.kind, drift, spec, text_only=e.text_only or bool(load_error),
                                      error=load_error)
        tables.append(drift)
    noise = summaries.pop("noise-floor", None)
    summary = {
        "run_id": run_id, "original": original.name, "score_topk": cfg.drift.score_topk,
        "prompts": len(set(og.column("prompt_id").to_pylist())),
        "bootstrap": {"resamples": spec.resamples, "level": spec.level, "seed": spec.seed,
                      "quantile_resamples": spec.quantile_resamples},
        "kld_bound": KLD_BOUND, "answer_match": cfg.drift.answer_match,
        "noise_floor": noise,
        "cousins": sorted(summaries.values(), key=_drift_rank),
        "computed": datetime.now(timezone.utc).isoformat(),
        **(extra or {}),
    }
    diff_s = time.perf_counter() - t0
    html = render_report(summary, pa.concat_tables(tables) if tables else schema.DRIFT.empty_table(),
                         worst_n=cfg.drift.worst_n)
    summary["timings"] = {**(timings or {}), "diff_s": diff_s, "report_s": time.perf_counter() - t0 - diff_s}
    layout.summary.write_text_atomic(json.dumps(summary, indent=1, allow_nan=False, default=_jsonable))
    layout.report.write_text_atomic(html)
    return summary


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x)}")


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


def recompute(cfg: Config) -> dict:
    """Redo the diff of a committed run from its stored generations and scores: no Ray, no engine.
    The run's models come from its config.yaml; storage and the drift presentation settings
    (bootstrap, confidence, seed, answer_match, worst_n) from `cfg`."""
    import dataclasses

    import yaml
    from omegaconf import OmegaConf

    from cousins.config import to_config
    from cousins.pipeline import drift_headline, model_entries
    from cousins.storage import resolve

    if not cfg.run.run_id:
        raise ValueError("drift.recompute needs run.run_id: the committed run to recompute")
    layout = RunLayout(resolve(cfg.storage.root, **cfg.storage.options), cfg.run.run_id)
    if not layout.manifest.exists():
        raise FileNotFoundError(f"run {cfg.run.run_id!r} at {layout.run.url} is not committed (no manifest.json)")
    stored_dict = yaml.safe_load(layout.config.read_text())
    stored_dict.pop("storage", None)  # secrets were masked there; this command's storage is used
    stored = to_config(OmegaConf.merge(OmegaConf.structured(Config), stored_dict))
    stored.storage = cfg.storage
    keep = {k: getattr(cfg.drift, k) for k in ("bootstrap", "confidence", "seed", "answer_match", "worst_n")}
    stored.drift = dataclasses.replace(stored.drift, **keep)
    entries = model_entries(stored, noise_floor=stored.drift.noise_floor)
    missing = [e.name for e in entries if not is_done(layout.generations(e.name))]
    if missing:
        raise FileNotFoundError(f"run {cfg.run.run_id!r} has no generations for {missing}; it is not a drift run")
    before = json.loads(layout.summary.read_text()) if layout.summary.exists() else {}
    kept = {k: before[k] for k in ("accounting", "cost_currency") if k in before}  # measured when it ran
    ran = {k: v for k, v in before.get("timings", {}).items() if k in ("generate_s", "score_s", "generate_busy_s", "score_busy_s")}
    summary = stage_diff(stored, layout, entries, run_id=layout.run_id, extra=kept, timings=ran)
    manifest = json.loads(layout.manifest.read_text())
    manifest["drift"] = drift_headline(summary)
    manifest["drift_recomputed"] = summary["computed"]
    layout.manifest.write_json_atomic(manifest)
    return summary
