"""Distillation-ready data from a committed run: SFT chats, optionally with the teacher's top-k
logprobs for logit distillation (KD), filtered, deduplicated, sharded, with a dataset card.

    export(ExportConfig(run_id=..., kd=True))  ->  {run}/distill/{sft|kd}/part-*.parquet + README.md

Filters run in a fixed order and each reports what it dropped: generation errors, truncated
outputs (finish reason `length`), output length bounds, the answer check on labelled prompts, exact
duplicates, near-duplicates (MinHash LSH over word shingles, datasketch), best-of-n per prompt.
Filters are pure functions over an Arrow table (`apply_filters`), tested on crafted tables.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from omegaconf import MISSING

from cousins import schema
from cousins.config import StorageConfig
from cousins.drift.metrics import is_correct, normalise_answer
from cousins.records import ExportDone, ExportFile, encode
from cousins.run import NotCommitted, committed
from cousins.storage import mark_done, parquet_bytes, resolve

# --- config --------------------------------------------------------------------------------------


@dataclass
class FiltersConfig:
    drop_truncated: bool = True  # drop outputs cut by max_tokens (finish reason "length")
    min_output_tokens: int = 1
    max_output_tokens: int | None = None
    answer_check: str | None = None  # None | contains | exact | regex: labelled prompts must be answered right
    answer_regex: str | None = None  # answer_check=regex: group 1 (or the match) must equal the reference, normalised
    exact_dedup: bool = True  # identical (prompt, answer) pairs, whitespace- and case-normalised
    near_dedup: bool = False  # MinHash LSH near-duplicate answers to the same prompt kind
    near_dedup_threshold: float = 0.8  # estimated Jaccard similarity of word 3-gram sets
    near_dedup_num_perm: int = 128
    best_of_n: str | None = None  # keep one row per prompt: the max of this field ("-field": the min)


@dataclass
class ExportConfig:
    run_id: str = MISSING
    storage: StorageConfig = field(default_factory=StorageConfig)
    model: str | None = None  # default: the run's original model
    kd: bool = False  # add the teacher's per-token top-k logprobs (logit distillation)
    format: str = "parquet"  # parquet | jsonl
    rows_per_file: int = 50_000
    out: str | None = None  # default: {run}/distill/{sft|kd}
    filters: FiltersConfig = field(default_factory=FiltersConfig)


class ExportError(ValueError):
    pass


# --- schema of the export ------------------------------------------------------------------------

SFT = pa.schema([
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("sample_index", pa.int32(), nullable=False),
    pa.field("messages", pa.list_(schema.MESSAGE), nullable=False),  # system?/user/…/assistant
    pa.field("category", pa.string()),
    pa.field("reference", pa.string()),
    pa.field("teacher", pa.string(), nullable=False),
    pa.field("prompt_text", pa.string()),  # the prompt after the teacher's chat template
    pa.field("finish_reason", pa.string()),
    pa.field("output_tokens", pa.int32()),
])
KD = pa.schema([
    *SFT,
    pa.field("token_ids", pa.list_(pa.int32())),  # the assistant tokens, in the teacher's vocabulary
    pa.field("topk_token_ids", pa.list_(pa.list_(pa.int32()))),  # per assistant token, the teacher's top-k
    pa.field("topk_logprobs", pa.list_(pa.list_(pa.float32()))),
])

GEN_COLUMNS = ["prompt_id", "sample_index", "model", "category", "prompt_text", "output_text",
               "output_token_ids", "output_logprobs", "finish_reason", "prompt_tokens", "output_tokens",
               "engine_time_s", "error"]
KD_COLUMNS = ["topk_token_ids", "topk_logprobs"]


# --- filters -------------------------------------------------------------------------------------

@dataclass
class FilterReport:
    name: str
    before: int
    dropped: int
    detail: str = ""


def _derived(t: pa.Table) -> pa.Table:
    """Columns a best-of-n score may use besides the stored ones: mean and sum of the sampled
    tokens' logprobs (the teacher's own confidence in its answer)."""
    if "output_logprobs" not in t.column_names:
        return t
    lps = t.column("output_logprobs").to_pylist()
    mean = [float(np.mean(x)) if x else None for x in lps]
    total = [float(np.sum(x)) if x else None for x in lps]
    return t.append_column("mean_logprob", pa.array(mean, pa.float64())).append_column(
        "sum_logprob", pa.array(total, pa.float64()))


def numeric_fields(t: pa.Table) -> list[str]:
    return sorted(f.name for f in t.schema if pa.types.is_integer(f.type) or pa.types.is_floating(f.type))


def check_filters(filters: FiltersConfig, available: list[str]) -> list[str]:
    """Problems with the filter settings, all at once (fields named against the available ones)."""
    problems = []
    if filters.best_of_n is not None and filters.best_of_n.lstrip("-") not in available:
        problems.append(f"filters.best_of_n: no field {filters.best_of_n.lstrip('-')!r}; available fields: "
                        f"{', '.join(available)}")
    if filters.answer_check not in (None, "contains", "exact", "regex"):
        problems.append(f"filters.answer_check {filters.answer_check!r} must be null, contains, exact or regex")
    if filters.answer_check == "regex":
        try:
            re.compile(filters.answer_regex or "")
        except re.error as e:
            problems.append(f"filters.answer_regex: {e}")
        if not filters.answer_regex:
            problems.append("filters.answer_check=regex needs filters.answer_regex")
    if filters.min_output_tokens < 0 or (filters.max_output_tokens is not None
                                         and filters.max_output_tokens < filters.min_output_tokens):
        problems.append("filters: need 0 <= min_output_tokens <= max_output_tokens")
    if not 0 < filters.near_dedup_threshold <= 1:
        problems.append("filters.near_dedup_threshold must be in (0, 1]")
    return problems


def _keep(t: pa.Table, mask, name: str, reports: list[FilterReport], detail: str = "") -> pa.Table:
    mask = pa.array(mask, pa.bool_()) if not isinstance(mask, (pa.Array, pa.ChunkedArray)) else mask
    kept = t.filter(pc.fill_null(mask, False))
    reports.append(FilterReport(name, t.num_rows, t.num_rows - kept.num_rows, detail))
    return kept


def _answer_ok(text: str, reference: str, filters: FiltersConfig) -> bool:
    if filters.answer_check == "regex":
        m = re.search(filters.answer_regex, text or "")
        if not m:
            return False
        got = m.group(1) if m.groups() else m.group(0)
        return normalise_answer(got) == normalise_answer(reference)
    return is_correct(text or "", reference, filters.answer_check)


def _shingles(text: str, n: int = 3) -> set[bytes]:
    words = normalise_answer(text).split()
    if len(words) < n:
        return {" ".join(words).encode()} if words else set()
    return {" ".join(words[i:i + n]).encode() for i in range(len(words) - n + 1)}


def near_duplicates(texts: list[str], threshold: float, num_perm: int = 128, seed: int = 1) -> list[bool]:
    """True for each text that is a near-duplicate of an earlier kept one (MinHash LSH)."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    dup = []
    for i, text in enumerate(texts):
        sh = _shingles(text)
        m = MinHash(num_perm=num_perm, seed=seed)
        m.update_batch(list(sh))
        if sh and lsh.query(m):
            dup.append(True)
            continue
        if sh:
            lsh.insert(str(i), m)
        dup.append(False)
    return dup


def apply_filters(t: pa.Table, filters: FiltersConfig, references: dict[str, str]) -> tuple[pa.Table, list[FilterReport]]:
    """Rows kept, and what each filter dropped. `t` holds GENERATIONS columns (plus `prompt_key`, a
    string identifying the prompt's content, for deduplication)."""
    reports: list[FilterReport] = []
    t = _keep(t, pc.is_null(t.column("error")), "generation errors", reports)
    if filters.drop_truncated:
        t = _keep(t, pc.not_equal(pc.fill_null(t.column("finish_reason"), ""), "length"), "truncated (length)", reports)
    n = pc.fill_null(t.column("output_tokens"), 0)
    mask = pc.greater_equal(n, filters.min_output_tokens)
    if filters.max_output_tokens is not None:
        mask = pc.and_(mask, pc.less_equal(n, filters.max_output_tokens))
    t = _keep(t, mask, "output length", reports,
              f"[{filters.min_output_tokens}, {filters.max_output_tokens if filters.max_output_tokens is not None else '∞'}] tokens")
    if filters.answer_check is not None:
        ok = [pid not in references or _answer_ok(text, references[pid], filters)
              for pid, text in zip(t.column("prompt_id").to_pylist(), t.column("output_text").to_pylist())]
        labelled = sum(pid in references for pid in t.column("prompt_id").to_pylist())
        t = _keep(t, ok, "answer check", reports, f"{filters.answer_check} on {labelled} labelled rows")
    if filters.exact_dedup:
        seen, keep = set(), []
        for pk, text in zip(t.column("prompt_key").to_pylist(), t.column("output_text").to_pylist()):
            key = hashlib.sha256(f"{pk}\0{' '.join((text or '').lower().split())}".encode()).digest()
            keep.append(key not in seen)
            seen.add(key)
        t = _keep(t, keep, "exact duplicates", reports)
    if filters.near_dedup:
        dup = near_duplicates(t.column("output_text").to_pylist(), filters.near_dedup_threshold,
                              filters.near_dedup_num_perm)
        t = _keep(t, [not d for d in dup], "near duplicates", reports,
                  f"MinHash LSH, Jaccard >= {filters.near_dedup_threshold}, {filters.near_dedup_num_perm} permutations")
    if filters.best_of_n is not None:
        name = filters.best_of_n.lstrip("-")
        sign = -1.0 if filters.best_of_n.startswith("-") else 1.0
        scores = [sign * v if v is not None else -np.inf for v in t.column(name).to_pylist()]
        best: dict[str, int] = {}
        for i, pid in enumerate(t.column("prompt_id").to_pylist()):
            if pid not in best or scores[i] > scores[best[pid]]:
                best[pid] = i
        chosen = set(best.values())
        t = _keep(t, [i in chosen for i in range(t.num_rows)], "best-of-n", reports,
                  f"one row per prompt, {'min' if sign < 0 else 'max'} {name}")
    return t, reports


# --- the export ----------------------------------------------------------------------------------

def _rows(gens: pa.Table, prompts: pa.Table, kd: bool, teacher: str) -> pa.Table:
    by_id = {r["prompt_id"]: r for r in prompts.select(["prompt_id", "messages", "reference"]).to_pylist()}
    cols: dict[str, list] = {f.name: [] for f in (KD if kd else SFT)}
    d = gens.to_pydict()
    for i, pid in enumerate(d["prompt_id"]):
        p = by_id[pid]
        cols["prompt_id"].append(pid)
        cols["sample_index"].append(d["sample_index"][i])
        cols["messages"].append([*p["messages"], {"role": "assistant", "content": d["output_text"][i]}])
        cols["category"].append(d["category"][i])
        cols["reference"].append(p["reference"])
        cols["teacher"].append(teacher)
        cols["prompt_text"].append(d["prompt_text"][i])
        cols["finish_reason"].append(d["finish_reason"][i])
        cols["output_tokens"].append(d["output_tokens"][i])
        if kd:
            cols["token_ids"].append(d["output_token_ids"][i])
            cols["topk_token_ids"].append(d["topk_token_ids"][i])
            cols["topk_logprobs"].append(d["topk_logprobs"][i])
    return pa.Table.from_pydict(cols, schema=KD if kd else SFT)


@dataclass
class ExportResult:
    out_url: str
    files: list[dict]  # name, rows, bytes
    rows_in: int
    rows_out: int
    filters: list[FilterReport]
    output_tokens: int
    bytes_per_output_token: float | None
    topk: int | None


def export(cfg: ExportConfig) -> ExportResult:
    """Export a committed run's generations of one model as SFT (or KD) data. ExportError on bad input."""
    if cfg.format not in ("parquet", "jsonl"):
        raise ExportError(f"format {cfg.format!r} must be parquet or jsonl")
    if cfg.rows_per_file < 1:
        raise ExportError(f"rows_per_file must be >= 1, got {cfg.rows_per_file}")
    try:
        run = committed(resolve(cfg.storage.root, **cfg.storage.options), cfg.run_id)
    except NotCommitted as e:
        raise ExportError(str(e)) from None
    layout, manifest = run.layout, run.manifest
    models = {m["name"]: m for m in manifest["models"]}
    model = cfg.model or manifest["models"][0]["name"]
    if model not in models:
        raise ExportError(f"run {cfg.run_id!r} has no model {model!r}; models: {', '.join(models)}")
    if cfg.kd and not manifest["sampling"].get("logprobs"):
        raise ExportError(f"run {cfg.run_id!r} stored no top-k logprobs (sampling.logprobs=0): KD export needs them")

    gens = _derived(run.read(layout.generations(model), GEN_COLUMNS + (KD_COLUMNS if cfg.kd else [])))
    problems = check_filters(cfg.filters, numeric_fields(gens))
    if problems:
        raise ExportError("invalid export filters:\n" + "\n".join(f"  - {p}" for p in problems))
    prompts = run.read(layout.prompts, ["prompt_id", "messages", "reference"])
    references = {p: r for p, r in zip(prompts.column("prompt_id").to_pylist(),
                                       prompts.column("reference").to_pylist()) if r is not None}
    keys = {r["prompt_id"]: json.dumps(r["messages"], sort_keys=True) for r in prompts.to_pylist()}
    gens = gens.sort_by([("prompt_id", "ascending"), ("sample_index", "ascending")])
    gens = gens.append_column("prompt_key", pa.array([keys[p] for p in gens.column("prompt_id").to_pylist()]))
    kept, reports = apply_filters(gens, cfg.filters, references)
    table = _rows(kept, prompts, cfg.kd, model)

    kind = "kd" if cfg.kd else "sft"
    out = resolve(cfg.out, **cfg.storage.options) if cfg.out else layout.run.join("distill", kind)
    out.remove_tree()
    files = []
    for i, start in enumerate(range(0, max(table.num_rows, 1), cfg.rows_per_file)):
        part = table.slice(start, cfg.rows_per_file)
        name = f"part-{i:05d}.{cfg.format}"
        data = _encode(part, cfg.format)
        out.join(name).write_bytes_atomic(data)
        files.append({"name": name, "rows": part.num_rows, "bytes": len(data)})
    tokens = int(pc.sum(table.column("output_tokens")).as_py() or 0)
    size = sum(f["bytes"] for f in files)
    topk = manifest["sampling"].get("logprobs") if cfg.kd else None
    result = ExportResult(out_url=out.url, files=files, rows_in=gens.num_rows, rows_out=table.num_rows,
                          filters=reports, output_tokens=tokens,
                          bytes_per_output_token=size / tokens if tokens else None, topk=topk)
    mark_done(out, encode(ExportDone(rows=table.num_rows, files=[ExportFile(**f) for f in files])))
    out.join("README.md").write_text_atomic(dataset_card(cfg, manifest, model, result))
    return result


def _encode(t: pa.Table, fmt: str) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in t.to_pylist()).encode()
    return parquet_bytes(t)


def dataset_card(cfg: ExportConfig, manifest: dict, model: str, r: ExportResult) -> str:
    """README.md of the export: what it is, where it came from, what was dropped, how to load it."""
    m = next(x for x in manifest["models"] if x["name"] == model)
    kind = "KD (SFT chats + per-token teacher top-k logprobs)" if cfg.kd else "SFT (chat messages)"
    rows = "\n".join(f"| {f.name} | {f.before} | {f.dropped} | {f.detail} |" for f in r.filters)
    files = "\n".join(f"| {f['name']} | {f['rows']} | {f['bytes']} |" for f in r.files)
    pattern = f"*.{cfg.format}"
    loader = "parquet" if cfg.format == "parquet" else "json"
    schema_ = KD if cfg.kd else SFT
    columns = "\n".join(f"| `{f.name}` | {f.type} |" for f in schema_)
    return f"""# {kind} data from run `{manifest['run_id']}`

Teacher generations exported by cousins on {datetime.now(timezone.utc).isoformat()}.

## Provenance

- producing run: `{manifest['run_id']}` (committed {manifest['committed']}, config hash `{manifest['config_hash']}`)
- teacher: `{model}` at `{m['path']}`, fingerprint `{m['fingerprint']}`, dtype {m['dtype']}, quantization {m['quantization']}
- sampling: `{json.dumps(manifest['sampling'])}`, {manifest['samples']} sample(s) per prompt, seed {manifest['seed']}
  (per-row seed rule: {manifest['seed_rule']})
- corpus: `{manifest['corpus']['path']}` ({manifest['corpus']['prompts']} prompts)
- versions: `{json.dumps(manifest['versions'])}`
- export settings: `{json.dumps({k: v for k, v in asdict(cfg).items() if k != 'storage'})}`

## Rows

{r.rows_in} generated rows in, {r.rows_out} out; {r.output_tokens} assistant tokens;
{'%.1f' % r.bytes_per_output_token if r.bytes_per_output_token else '-'} bytes per assistant token on storage
({cfg.format}{', zstd' if cfg.format == 'parquet' else ''}{f', top-{r.topk} logprobs' if r.topk else ''}).

| filter (in order) | rows before | dropped | detail |
|---|---|---|---|
{rows}

| file | rows | bytes |
|---|---|---|
{files}

## Schema

| column | type |
|---|---|
{columns}

`messages` is the chat (the prompt's system/user turns, then the teacher's answer as `assistant`).
{'`token_ids` are the answer in the teacher vocabulary; `topk_token_ids`/`topk_logprobs` hold, per answer token, the teacher raw top-k (before temperature), sorted by logprob.' if cfg.kd else ''}

## Loading

```python
import datasets; ds = datasets.load_dataset("{loader}", data_files="{r.out_url}/{pattern}", split="train")
import pyarrow.dataset as pads; t = pads.dataset("{r.out_url}", format="{'parquet' if cfg.format == 'parquet' else 'json'}", exclude_invalid_files=True).to_table()
import duckdb; duckdb.sql("select count(*) from read_{'parquet' if cfg.format == 'parquet' else 'json'}('{r.out_url}/{pattern}')").fetchall()
```
"""


def filter_table(result: ExportResult) -> str:
    lines = [f"{'filter':<22} {'before':>8} {'dropped':>8}  detail"]
    lines += [f"{f.name:<22} {f.before:>8} {f.dropped:>8}  {f.detail}" for f in result.filters]
    size = sum(f["bytes"] for f in result.files)
    lines.append(f"{result.rows_in} rows in, {result.rows_out} out, {len(result.files)} file(s), {size} bytes, "
                 f"{result.output_tokens} assistant tokens"
                 + (f", {result.bytes_per_output_token:.1f} B/token" if result.bytes_per_output_token else "")
                 + f" -> {result.out_url}")
    return "\n".join(lines)


def register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_export", node=ExportConfig)


register()
