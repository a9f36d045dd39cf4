"""The export's filters, each a pure function over Arrow tables, and the order they run in:
generation errors, truncated outputs (finish reason `length`), output length bounds, the answer
check on labelled prompts, exact duplicates, near-duplicates (MinHash LSH over word shingles,
datasketch's signatures and bands), best-of-n per prompt. It owns the checks of the filter
settings, the verdict row of every generation (the filter that dropped it, its exact-dedup key,
best-of-n score and LSH band keys), the marking of duplicates and of all but the best row of a
prompt over partitions of verdict rows, and the report of what each filter dropped;
`cousins.export.write` runs these steps as Ray Data operations, and `apply_filters` runs them on one
table in memory (tests on crafted tables).
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cousins.drift.answers import CHECKERS, correct
from cousins.drift.metrics import normalise_answer
from cousins.export.config import FilterReport, FiltersConfig


def numeric_fields(s: pa.Schema) -> list[str]:
    """The fields best-of-n may rank by: the numeric ones, and the derived logprob figures."""
    return sorted({f.name for f in s if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)} | set(DERIVED))


def check_filters(filters: FiltersConfig, available: list[str]) -> list[str]:
    """Problems with the filter settings, all at once (fields named against the available ones)."""
    problems = []
    if filters.best_of_n is not None and filters.best_of_n.lstrip("-") not in available:
        problems.append(f"filters.best_of_n: no field {filters.best_of_n.lstrip('-')!r}; available fields: "
                        f"{', '.join(available)}")
    if filters.answer_check is not None and (filters.answer_check not in CHECKERS or filters.answer_check == "mcq"):
        problems.append(f"filters.answer_check {filters.answer_check!r} must be null or one of "
                        f"{', '.join(c for c in CHECKERS if c != 'mcq')}")
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


def _answer_ok(text: str, reference: str, filters: FiltersConfig, choices: list[str] | None = None) -> bool:
    """The row's final answer is right (cousins/drift/answers.py); a reference the checker cannot
    read keeps the row (it is not judged)."""
    regex = {"pattern": filters.answer_regex, "group": 1, "which": "first"} if filters.answer_check == "regex" else {}
    return correct(text or "", reference, filters.answer_check, choices, **regex) is not False


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


# --- the filters as Dataset operations --------------------------------------------------------------
#
# Every generation row gets a verdict row (VERDICT: its key, the filter that dropped it or null, its
# exact-dedup key, best-of-n score and LSH band keys), computed where its prompt row meets it (the
# partitioning itself is the export's, in cousins/export/write.py).
# Exact duplicates: verdicts hash-partitioned by dedup key; in each key the first row in (prompt_id,
# sample_index) order is kept. Near duplicates: one (band key, row) pair per band of each live row,
# hash-partitioned by band key; in each band the first row is kept and every other one dropped, so
# a row goes when it is not the first of any band it is in. (A sequential LSH would keep a row whose
# only near-twin was itself dropped; here such chains collapse to their first row.) Best-of-n: per
# prompt, the live row with the highest score (the first on ties). Counts come back per filter.

VERDICT = pa.schema([("prompt_id", pa.string()), ("sample_index", pa.int32()), ("dropped", pa.string()),
                     ("dedup_key", pa.string()), ("score", pa.float64()), ("bands", pa.list_(pa.string()))])
PROMPT_INFO = pa.schema([("prompt_id", pa.string()), ("prompt_key", pa.string()), ("reference", pa.string()),
                         ("choices", pa.list_(pa.string()))])
KEYS = pa.schema([("prompt_id", pa.string()), ("sample_index", pa.int32())])


def prompt_info(prompts: pa.Table) -> pa.Table:
    """A prompt's identity for deduplication (its messages as canonical JSON), its reference and
    its choices (multiple choice)."""
    keys = [json.dumps(m, sort_keys=True) for m in prompts.column("messages").to_pylist()]
    choices = prompts.column("choices") if "choices" in prompts.column_names else pa.nulls(prompts.num_rows)
    return pa.Table.from_arrays([prompts.column("prompt_id"), pa.array(keys, pa.string()),
                                 prompts.column("reference"), choices.cast(pa.list_(pa.string()))], schema=PROMPT_INFO)


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
    info = {p: (k, r, c) for p, k, r, c in zip(*(prompts.column(c).to_pylist() for c in PROMPT_INFO.names))}
    if filters.best_of_n is not None and filters.best_of_n.lstrip("-") not in gens.column_names:
        gens = _derived(gens)
    d = {c: gens.column(c).to_pylist() for c in ("prompt_id", "output_text", "finish_reason", "output_tokens", "error")}
    lo, hi = filters.min_output_tokens, filters.max_output_tokens
    dropped, keys, bands = [], [], []
    for pid, text, finish, n, err in zip(*d.values()):
        prompt_key, reference, choices = info.get(pid, (None, None, None))
        why = None
        if err is not None or pid not in info:
            why = "generation errors"
        elif filters.drop_truncated and finish == "length":
            why = "truncated (length)"
        elif not (lo <= (n or 0) and (hi is None or (n or 0) <= hi)):
            why = "output length"
        elif filters.answer_check is not None and reference is not None and not _answer_ok(text, reference, filters,
                                                                                            choices):
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
                        "reference": [references.get(p) for p in pids], "choices": [None] * len(pids)},
                       schema=PROMPT_INFO)
    v = verdicts(t, prompts, filters)
    if filters.exact_dedup:
        v = mark_exact(v)
    v = mark_near_and_best(v, band_duplicates(band_rows(v)) if filters.near_dedup else None, filters)
    dropped = v.column("dropped").to_pylist()
    counts: dict = {}
    for d in dropped:
        counts[d] = counts.get(d, 0) + 1
    return t.filter(pa.array([d is None for d in dropped])), reports(counts, t.num_rows, filters)

