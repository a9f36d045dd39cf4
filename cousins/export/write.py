"""Distillation-ready data from a committed run: SFT chats, optionally with the teacher's top-k
logprobs for logit distillation (KD), filtered, deduplicated, sharded, with a dataset card.

    export(ExportConfig(run_id=..., kd=True))  ->  {run}/distill/{sft|kd}/part-*.parquet + README.md

Filters run in a fixed order and each reports what it dropped: generation errors, truncated
outputs (finish reason `length`), output length bounds, the answer check on labelled prompts, exact
duplicates, near-duplicates (MinHash LSH over word shingles, datasketch's signatures and bands),
best-of-n per prompt. They run as Ray Data operations (hash-partitioned by prompt, dedup key or
LSH band: see "the filters as Dataset operations" below), the export rows are built and written by
the workers, and the driver only sees counts and file names. Each step is a pure function over an
Arrow table; `apply_filters` runs them on one table in memory (tests on crafted tables).
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

from cousins.contract import schema
from cousins.contract.config import LogConfig, RayConfig, StorageConfig
from cousins.drift.metrics import is_correct, normalise_answer
from cousins.run.progress import Bar
from cousins.contract.codec import encode
from cousins.contract.records import ExportDone, ExportFile
from cousins.run.lifecycle import NotCommitted, Run, committed
from cousins.run.storage import Location, mark_done, parquet_bytes, resolve

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
    ray: RayConfig = field(default_factory=RayConfig)  # the filters and joins run on Ray Data
    log: LogConfig = field(default_factory=LogConfig)
    model: str | None = None  # default: the run's original model
    kd: bool = False  # add the teacher's per-token top-k logprobs (logit distillation)
    format: str = "parquet"  # parquet | jsonl
    rows_per_file: int = 50_000  # at most; a file holds one partition's rows (about 20k SFT or 2k KD rows)
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


def numeric_fields(s: pa.Schema) -> list[str]:
    """The fields best-of-n may rank by: the numeric ones, and the derived logprob figures."""
    return sorted({f.name for f in s if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)} | set(DERIVED))


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


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) of MinHash LSH for a Jaccard threshold: datasketch's own choice, the
    one that minimises its false positive plus false negative probability."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 0.5, 0.5)


def band_keys(text: str, threshold: float, num_perm: int = 128, seed: int = 1) -> list[str]:
    """The text's MinHash LSH band keys (word 3-gram shingles; none for a text without words): two
    texts sharing a key are near-duplicate candidates, as in datasketch's MinHashLSH."""
    from datasketch import MinHash

    sh = _shingles(text)
    if not sh:
        return []
    m = MinHash(num_perm=num_perm, seed=seed)
    m.update_batch(list(sh))
    b, r = lsh_bands(threshold, num_perm)
    return [f"{i}:" + hashlib.blake2b(m.hashvalues[i * r:(i + 1) * r].tobytes(), digest_size=12).hexdigest()
            for i in range(b)]


def near_duplicates(texts: list[str], threshold: float, num_perm: int = 128, seed: int = 1) -> list[bool]:
    """True for each text that shares an LSH band with an earlier text (the rule the export applies
    across workers, here on one list)."""
    seen: set[str] = set()
    dup = []
    for text in texts:
        keys = band_keys(text, threshold, num_perm, seed)
        dup.append(any(k in seen for k in keys))
        seen.update(keys)
    return dup


# --- the filters as Dataset operations --------------------------------------------------------------
#
# Every generation row gets a verdict row (VERDICT: its key, the filter that dropped it or null, its
# exact-dedup key, best-of-n score and LSH band keys), computed where its prompt row meets it.
# Exact duplicates: verdicts hash-partitioned by dedup key; in each key the first row in (prompt_id,
# sample_index) order is kept. Near duplicates: one (band key, row) pair per band of each live row,
# hash-partitioned by band key; in each band the first row is kept and every other one dropped, so
# a row goes when it is not the first of any band it is in. (A sequential LSH would keep a row whose
# only near-twin was itself dropped; here such chains collapse to their first row.) Best-of-n: per
# prompt, the live row with the highest score (the first on ties). Counts come back per filter.

VERDICT = pa.schema([("prompt_id", pa.string()), ("sample_index", pa.int32()), ("dropped", pa.string()),
                     ("dedup_key", pa.string()), ("score", pa.float64()), ("bands", pa.list_(pa.string()))])
PROMPT_INFO = pa.schema([("prompt_id", pa.string()), ("prompt_key", pa.string()), ("reference", pa.string())])
KEYS = pa.schema([("prompt_id", pa.string()), ("sample_index", pa.int32())])


def prompt_info(prompts: pa.Table) -> pa.Table:
    """A prompt's identity for deduplication (its messages as canonical JSON) and its reference."""
    keys = [json.dumps(m, sort_keys=True) for m in prompts.column("messages").to_pylist()]
    return pa.Table.from_arrays([prompts.column("prompt_id"), pa.array(keys, pa.string()),
                                 prompts.column("reference")], schema=PROMPT_INFO)


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


DERIVED = ["mean_logprob", "sum_logprob"]


def verdicts(gens: pa.Table, prompts: pa.Table, filters: FiltersConfig) -> pa.Table:
    """The VERDICT rows of generation rows, given their prompts' PROMPT_INFO rows."""
    info = {p: (k, r) for p, k, r in zip(*(prompts.column(c).to_pylist() for c in PROMPT_INFO.names))}
    if filters.best_of_n is not None and filters.best_of_n.lstrip("-") not in gens.column_names:
        gens = _derived(gens)
    d = {c: gens.column(c).to_pylist() for c in ("prompt_id", "output_text", "finish_reason", "output_tokens", "error")}
    lo, hi = filters.min_output_tokens, filters.max_output_tokens
    dropped, keys, bands = [], [], []
    for pid, text, finish, n, err in zip(*d.values()):
        prompt_key, reference = info.get(pid, (None, None))
        why = None
        if err is not None or pid not in info:
            why = "generation errors"
        elif filters.drop_truncated and finish == "length":
            why = "truncated (length)"
        elif not (lo <= (n or 0) and (hi is None or (n or 0) <= hi)):
            why = "output length"
        elif filters.answer_check is not None and reference is not None and not _answer_ok(text, reference, filters):
            why = "answer check"
        dropped.append(why)
        keys.append(hashlib.sha256(f"{prompt_key}\0{' '.join((text or '').lower().split())}".encode()).hexdigest()
                    if filters.exact_dedup and why is None else None)
        bands.append(band_keys(text or "", filters.near_dedup_threshold, filters.near_dedup_num_perm)
                     if filters.near_dedup and why is None else [])
    if filters.best_of_n is not None:
        sign = -1.0 if filters.best_of_n.startswith("-") else 1.0
        score = [sign * v if v is not None else -np.inf for v in gens.column(filters.best_of_n.lstrip("-")).to_pylist()]
    else:
        score = [None] * gens.num_rows
    return pa.Table.from_arrays([gens.column("prompt_id"), gens.column("sample_index").cast(pa.int32()),
                                 pa.array(dropped, pa.string()), pa.array(keys, pa.string()),
                                 pa.array(score, pa.float64()), pa.array(bands, pa.list_(pa.string()))],
                                schema=VERDICT)


def _first_of(t: pa.Table, key: str) -> np.ndarray:
    """Mask of the first row, in (prompt_id, sample_index) order, of each value of `key`."""
    order = pc.sort_indices(t, sort_keys=[(key, "ascending"), ("prompt_id", "ascending"),
                                          ("sample_index", "ascending")]).to_numpy()
    k = np.asarray(t.column(key).take(pa.array(order)).to_pylist(), dtype=object)
    first = np.ones(len(k), bool)
    first[1:] = k[1:] != k[:-1]
    out = np.zeros(t.num_rows, bool)
    out[order] = first
    return out


def _drop(t: pa.Table, mask: np.ndarray, why: str) -> pa.Table:
    live = pc.is_null(t.column("dropped")).to_numpy(zero_copy_only=False)
    d = np.asarray(t.column("dropped").to_pylist(), dtype=object)
    d[live & mask] = why
    return t.set_column(t.schema.get_field_index("dropped"), "dropped", pa.array(d.tolist(), pa.string()))


def mark_exact(t: pa.Table) -> pa.Table:
    """Drop every live row that is not the first of its dedup key (t: VERDICT rows, all of a key)."""
    live = pc.is_null(t.column("dropped")).to_numpy(zero_copy_only=False)
    if not live.any():
        return t
    first = np.zeros(t.num_rows, bool)
    idx = np.nonzero(live)[0]
    first[idx] = _first_of(t.take(pa.array(idx)), "dedup_key")
    return _drop(t, live & ~first, "exact duplicates")


BAND_ROWS = pa.schema([("band", pa.string()), ("prompt_id", pa.string()), ("sample_index", pa.int32())])


def band_rows(t: pa.Table) -> pa.Table:
    """(band key, row key) for every band of every live row."""
    live = t.filter(pc.is_null(t.column("dropped")))
    lengths = pc.list_value_length(live.column("bands")).to_numpy(zero_copy_only=False)
    rows = np.repeat(np.arange(live.num_rows), lengths)
    return pa.Table.from_arrays([pc.list_flatten(live.column("bands")).cast(pa.string()),
                                 live.column("prompt_id").take(pa.array(rows)),
                                 live.column("sample_index").take(pa.array(rows)).cast(pa.int32())],
                                schema=BAND_ROWS)


def band_duplicates(t: pa.Table) -> pa.Table:
    """KEYS of the rows that are not the first of some band (t: BAND_ROWS, all rows of a band)."""
    if t.num_rows == 0:
        return KEYS.empty_table()
    return t.filter(pa.array(~_first_of(t, "band"))).select(KEYS.names)


def mark_near_and_best(t: pa.Table, near: pa.Table | None, filters: FiltersConfig) -> pa.Table:
    """Drop the near duplicates (`near`: their KEYS), then all but the best live row of each prompt
    (t: VERDICT rows, all of their prompts)."""
    if near is not None and near.num_rows:
        dup = set(zip(near.column("prompt_id").to_pylist(), near.column("sample_index").to_pylist()))
        mask = np.asarray([k in dup for k in zip(t.column("prompt_id").to_pylist(),
                                                  t.column("sample_index").to_pylist())], bool)
        t = _drop(t, mask, "near duplicates")
    if filters.best_of_n is not None:
        live = pc.is_null(t.column("dropped")).to_numpy(zero_copy_only=False)
        idx = np.nonzero(live)[0]
        if len(idx):
            sub = t.take(pa.array(idx))
            order = pc.sort_indices(sub, sort_keys=[("prompt_id", "ascending"), ("score", "descending"),
                                                    ("sample_index", "ascending")]).to_numpy()
            p = np.asarray(sub.column("prompt_id").take(pa.array(order)).to_pylist(), dtype=object)
            best = np.ones(len(p), bool)
            best[1:] = p[1:] != p[:-1]
            keep = np.zeros(len(idx), bool)
            keep[order] = best
            mask = np.zeros(t.num_rows, bool)
            mask[idx[~keep]] = True
            t = _drop(t, mask, "best-of-n")
    return t


def reports(dropped: dict[str | None, int], rows_in: int, filters: FiltersConfig) -> list[FilterReport]:
    """What each filter that ran dropped, in order, from the count of rows per `dropped` value."""
    bounds = f"[{filters.min_output_tokens}, {filters.max_output_tokens if filters.max_output_tokens is not None else '∞'}] tokens"
    steps = [("generation errors", True, ""), ("truncated (length)", filters.drop_truncated, ""),
             ("output length", True, bounds),
             ("answer check", filters.answer_check is not None, f"{filters.answer_check} on labelled rows"),
             ("exact duplicates", filters.exact_dedup, ""),
             ("near duplicates", filters.near_dedup,
              f"MinHash LSH, Jaccard >= {filters.near_dedup_threshold}, {filters.near_dedup_num_perm} permutations"),
             ("best-of-n", filters.best_of_n is not None,
              f"one row per prompt, {'min' if (filters.best_of_n or '').startswith('-') else 'max'} "
              f"{(filters.best_of_n or '').lstrip('-')}")]
    out, before = [], rows_in
    for name, ran, detail in steps:
        if ran:
            out.append(FilterReport(name, before, dropped.get(name, 0), detail))
            before -= dropped.get(name, 0)
    return out


def apply_filters(t: pa.Table, filters: FiltersConfig, references: dict[str, str]) -> tuple[pa.Table, list[FilterReport]]:
    """Rows kept, and what each filter dropped, for generation rows in memory (plus `prompt_key`,
    a string identifying the prompt's content): the export's Dataset operations on one partition."""
    pids = list(dict.fromkeys(t.column("prompt_id").to_pylist()))
    keys = dict(zip(t.column("prompt_id").to_pylist(), t.column("prompt_key").to_pylist()))
    prompts = pa.table({"prompt_id": pids, "prompt_key": [keys[p] for p in pids],
                        "reference": [references.get(p) for p in pids]}, schema=PROMPT_INFO)
    v = verdicts(t, prompts, filters)
    if filters.exact_dedup:
        v = mark_exact(v)
    v = mark_near_and_best(v, band_duplicates(band_rows(v)) if filters.near_dedup else None, filters)
    dropped = v.column("dropped").to_pylist()
    counts: dict = {}
    for d in dropped:
        counts[d] = counts.get(d, 0) + 1
    return t.filter(pa.array([d is None for d in dropped])), reports(counts, t.num_rows, filters)


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


FILES = pa.schema([("name", pa.string()), ("rows", pa.int64()), ("bytes", pa.int64()), ("tokens", pa.int64()),
                   ("first", pa.string())])
ROWS_PER_PARTITION = {"sft": 20_000, "kd": 2_000}  # a partition's rows in memory: top-k lists are heavy


def _write_partition(block: pa.Table, *, schemas: dict, out: Location, kd: bool, teacher: str, fmt: str,
                     rows_per_file: int) -> pa.Table:
    """Build one partition's export rows from its generations, prompts and kept keys, and write them
    in files of at most `rows_per_file` rows, named by their keys; returns FILES rows."""
    from cousins.run.dataops import split
    from cousins.run.ledger import batch_key

    sides = split(block, schemas)
    keep = set(zip(sides["keep"].column("prompt_id").to_pylist(), sides["keep"].column("sample_index").to_pylist()))
    gens = sides["gen"]
    gens = gens.filter(pa.array([k in keep for k in zip(gens.column("prompt_id").to_pylist(),
                                                        gens.column("sample_index").to_pylist())], pa.bool_()))
    gens = gens.sort_by([("prompt_id", "ascending"), ("sample_index", "ascending")])
    table = _rows(gens, sides["prompt"], kd, teacher)
    files = []
    for start in range(0, table.num_rows, rows_per_file):
        part = table.slice(start, rows_per_file)
        name = f"part-{batch_key(part)}.{fmt}"
        data = _encode(part, fmt)
        out.join(name).write_bytes_atomic(data)
        files.append({"name": name, "rows": part.num_rows, "bytes": len(data),
                      "tokens": int(pc.sum(part.column("output_tokens")).as_py() or 0),
                      "first": f"{part.column('prompt_id')[0].as_py()}\0{part.column('sample_index')[0].as_py():09d}"})
    return pa.Table.from_pylist(files, schema=FILES)


def _verdict_partition(block: pa.Table, *, schemas: dict, filters: FiltersConfig) -> pa.Table:
    from cousins.run.dataops import split

    sides = split(block, schemas)
    return verdicts(sides["gen"], sides["prompt"], filters)


def _near_and_best_partition(block: pa.Table, *, schemas: dict, filters: FiltersConfig) -> pa.Table:
    from cousins.run.dataops import split

    sides = split(block, schemas)
    return mark_near_and_best(sides["state"], sides.get("near"), filters)


def _count_dropped(t: pa.Table) -> pa.Table:
    """Rows per verdict in a batch ("" for kept): a handful of rows back to the driver."""
    d = pc.fill_null(t.column("dropped"), "")
    counts = pc.value_counts(d)
    return pa.table({"dropped": counts.field("values"), "rows": counts.field("counts").cast(pa.int64())})


def _kept_keys(t: pa.Table) -> pa.Table:
    return t.filter(pc.is_null(t.column("dropped"))).select(KEYS.names)


def _filtered(run, model: str, filters: FiltersConfig, rows_in: int):
    """The VERDICT Dataset of the model's generations after every filter (materialized: a few
    dozen bytes a row, in the object store)."""
    from cousins.run.dataops import co_partition, materialize_counted, partitions_for, read_stage

    layout = run.layout
    parts = partitions_for(rows_in, 20_000)
    light = ["prompt_id", "sample_index", "output_text", "finish_reason", "output_tokens", "error"]
    score = (filters.best_of_n or "").lstrip("-")
    if score in DERIVED:
        light.append("output_logprobs")
    elif score and score not in light:
        light.append(score)
    gens = read_stage(layout.generations(model), light)
    prompts = read_stage(layout.prompts, ["prompt_id", "messages", "reference"]).map_batches(
        prompt_info, batch_format="pyarrow", num_cpus=0.1)
    gen_schema = pa.schema([f for f in schema.GENERATIONS if f.name in light])
    schemas = {"gen": gen_schema, "prompt": PROMPT_INFO}
    state = co_partition({"gen": gens, "prompt": prompts}, schemas, "prompt_id", parts).map_batches(
        _verdict_partition, fn_kwargs={"schemas": schemas, "filters": filters}, batch_size=None,
        batch_format="pyarrow")
    if filters.exact_dedup:
        state = state.repartition(parts, keys=["dedup_key"]).map_batches(mark_exact, batch_size=None,
                                                                          batch_format="pyarrow")
    if filters.near_dedup or filters.best_of_n is not None:
        near = None
        if filters.near_dedup:
            with Bar("export verdicts", rows_in) as bar:
                state = materialize_counted(state, bar)  # read twice: for its bands and to mark them
            near = state.map_batches(band_rows, batch_format="pyarrow", num_cpus=0.1).repartition(
                parts, keys=["band"]).map_batches(band_duplicates, batch_size=None, batch_format="pyarrow")
        schemas = {"state": VERDICT, **({"near": KEYS} if near is not None else {})}
        state = co_partition({"state": state, "near": near}, schemas, "prompt_id", parts).map_batches(
            _near_and_best_partition, fn_kwargs={"schemas": schemas, "filters": filters}, batch_size=None,
            batch_format="pyarrow")
    with Bar("export filters", rows_in) as bar:
        return materialize_counted(state.select_columns(["prompt_id", "sample_index", "dropped"]), bar)


def export(cfg: ExportConfig) -> ExportResult:
    """Export a committed run's generations of one model as SFT (or KD) data on the connected Ray
    (a local one when none is: cfg.ray). ExportError on bad input, before any Ray work."""
    from cousins.run.dataops import co_partition, read_stage
    from cousins.run.runtime import init_ray

    if cfg.format not in ("parquet", "jsonl"):
        raise ExportError(f"format {cfg.format!r} must be parquet or jsonl")
    if cfg.rows_per_file < 1:
        raise ExportError(f"rows_per_file must be >= 1, got {cfg.rows_per_file}")
    if cfg.log.progress_s <= 0:
        raise ExportError(f"log.progress_s must be > 0, got {cfg.log.progress_s}")
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
    problems = check_filters(cfg.filters, numeric_fields(schema.GENERATIONS))
    if problems:
        raise ExportError("invalid export filters:\n" + "\n".join(f"  - {p}" for p in problems))

    init_ray(cfg.ray, cfg.log)
    rows_in = Run(layout, "committed").count(layout.generations(model))  # from the Parquet footers
    state = _filtered(run, model, cfg.filters, rows_in)
    counts: dict = {}
    for r in state.map_batches(_count_dropped, batch_format="pyarrow", num_cpus=0.1).take_all():
        counts[r["dropped"] or None] = counts.get(r["dropped"] or None, 0) + r["rows"]
    kept = state.map_batches(_kept_keys, batch_format="pyarrow", num_cpus=0.1)
    kept_rows = counts.get(None, 0)

    kind = "kd" if cfg.kd else "sft"
    out = resolve(cfg.out, **cfg.storage.options) if cfg.out else layout.run.join("distill", kind)
    out.remove_tree()
    columns = GEN_COLUMNS + (KD_COLUMNS if cfg.kd else [])
    schemas = {"gen": pa.schema([f for f in schema.GENERATIONS if f.name in columns]),
               "prompt": pa.schema([f for f in schema.PROMPTS if f.name in ("prompt_id", "messages", "reference")]),
               "keep": KEYS}
    sides = {"gen": read_stage(layout.generations(model), columns),
             "prompt": read_stage(layout.prompts, ["prompt_id", "messages", "reference"]), "keep": kept}
    # as few partitions (files) as the rows need: a small export stays one file
    parts = max(1, -(-kept_rows // min(cfg.rows_per_file, ROWS_PER_PARTITION[kind])))
    writes = co_partition(sides, schemas, "prompt_id", parts).map_batches(
        _write_partition, batch_size=None, batch_format="pyarrow",
        fn_kwargs={"schemas": schemas, "out": out, "kd": cfg.kd, "teacher": model, "fmt": cfg.format,
                   "rows_per_file": cfg.rows_per_file})
    written = []
    with Bar("export write", kept_rows) as bar:
        for f in writes.iter_rows():
            written.append(f)
            bar.add(f["rows"], tokens=f["tokens"])
    files = [{k: f[k] for k in ("name", "rows", "bytes")} for f in sorted(written, key=lambda f: f["first"])]
    tokens = sum(f["tokens"] for f in written)
    if not files:  # nothing kept: one empty file, so readers find the schema
        name = f"part-00000.{cfg.format}"
        data = _encode((KD if cfg.kd else SFT).empty_table(), cfg.format)
        out.join(name).write_bytes_atomic(data)
        files = [{"name": name, "rows": 0, "bytes": len(data)}]
    rows_out = sum(f["rows"] for f in files)
    size = sum(f["bytes"] for f in files)
    topk = manifest["sampling"].get("logprobs") if cfg.kd else None
    result = ExportResult(out_url=out.url, files=files, rows_in=rows_in, rows_out=rows_out,
                          filters=reports(counts, rows_in, cfg.filters), output_tokens=tokens,
                          bytes_per_output_token=size / tokens if tokens else None, topk=topk)
    mark_done(out, encode(ExportDone(rows=rows_out, files=[ExportFile(**f) for f in files])))
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
