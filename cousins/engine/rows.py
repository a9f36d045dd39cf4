"""Engine-stage rows: what goes into an engine actor and what comes out, as Arrow.

Expanded prompt rows (`expand_samples`: each prompt x sample with its own seed, `row_seed`); the
one-row-out-per-row-in rule (`check_rows`); vLLM's logprobs as typed top-k columns
(`topk_columns`); and the shapes in which a model's generation rows and its scoring rows travel
together to one engine (`as_input`, `as_output`, column TASK).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cousins.contract import schema
from cousins.run.ledger import batch_key


class EngineContractError(RuntimeError):
    """An engine actor broke the one-row-out-per-row-in rule: a bug, never a row's error."""


def check_rows(model: str, batch: pa.Table, out: pa.Table) -> pa.Table:
    """`out` if it holds exactly one row per row of `batch`, keys in the same order."""
    if out.num_rows != batch.num_rows or schema.row_keys(out) != schema.row_keys(batch):
        raise EngineContractError(f"model {model!r}, batch {batch_key(batch)}: {out.num_rows} rows out for "
                                  f"{batch.num_rows} in (or in another order); an engine stage returns one "
                                  f"row per input row")
    return out


def row_seed(base_seed: int, prompt_id: str, sample_index: int) -> int:
    """The seed of one (prompt, sample): independent of batching, order and sharding."""
    digest = hashlib.sha256(f"{base_seed}:{prompt_id}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def expand_samples(batch: pa.Table, *, samples: int, base_seed: int) -> pa.Table:
    """Each prompt row -> `samples` rows with sample_index and seed (Arrow in, Arrow out)."""
    n = batch.num_rows
    take = np.repeat(np.arange(n), samples)
    out = batch.take(pa.array(take))
    sample_index = np.tile(np.arange(samples, dtype=np.int32), n)
    ids = out.column("prompt_id").to_pylist()
    seeds = [row_seed(base_seed, pid, int(s)) for pid, s in zip(ids, sample_index)]
    return out.append_column("sample_index", pa.array(sample_index, pa.int32())).append_column(
        "seed", pa.array(seeds, pa.int64()))


class Columns:
    """Accumulates GENERATIONS rows column by column, typed, without per-row dicts."""

    def __init__(self):
        self.cols: dict[str, list] = {f.name: [] for f in schema.GENERATIONS}

    def add(self, **values: Any) -> None:
        for name, col in self.cols.items():
            col.append(values.get(name))

    def table(self) -> pa.Table:
        return pa.Table.from_pydict(self.cols, schema=schema.GENERATIONS)


def rank_entries(entries, k: int) -> tuple[list[int], list[float]]:
    """The k best of one position's (token id, rank, logprob) entries by vLLM's rank (1 = best),
    a token listed twice (the position's own token, and again in the top-k) counted once."""
    best = {tid: (rank, lp) for tid, rank, lp in entries}
    ranked = sorted(best.items(), key=lambda kv: (kv[1][0], kv[0]))[:k]
    return [tid for tid, _ in ranked], [v[1] for _, v in ranked]


def position_topk(position_logprobs: dict, k: int) -> tuple[list[int], list[float]]:
    """The k best (token id, logprob) of one position given as vLLM's dict of Logprob."""
    return rank_entries(((tid, lp.rank, lp.logprob) for tid, lp in position_logprobs.items()), k)


def topk_columns(logprobs, k: int, tokens: list[int], start: int = 0) -> tuple[list, list, list]:
    """Per position start.. of a vLLM logprobs result, one per token of `tokens` (the sampled or
    teacher-forced token there): the k best token ids and logprobs by vLLM's rank, and the token's
    own logprob. `logprobs` is a dict per position, or vLLM's FlatLogprobs (flat_logprobs=True),
    where each position holds the position's token first, then ranks 1.. in order: read by slicing,
    with no dict or sort per position (a tenth of the engine actor's time at top-20 on CPU)."""
    if not hasattr(logprobs, "start_indices"):
        positions = logprobs[start:start + len(tokens)]
        pairs = [position_topk(pos, k) for pos in positions]
        return [p[0] for p in pairs], [p[1] for p in pairs], [pos[t].logprob for pos, t in zip(positions, tokens)]
    first, last, ids, lps, ranks = (logprobs.start_indices, logprobs.end_indices, logprobs.token_ids,
                                    logprobs.logprobs, logprobs.ranks)
    top_ids, top_lps, own = [], [], []
    for i, t in enumerate(tokens, start):
        a, b = first[i], last[i]
        if ids[a] != t or (b > a + 1 and ranks[a + 1] != 1):  # not the layout above: rank them
            best_ids, best_lps = rank_entries(zip(ids[a:b], ranks[a:b], lps[a:b]), k)
            top_ids.append(best_ids), top_lps.append(best_lps)
            own.append(lps[a + ids[a:b].index(t)])
            continue
        top_ids.append(ids[a + 1:min(b, a + 1 + k)]), top_lps.append(lps[a + 1:min(b, a + 1 + k)])
        own.append(lps[a])
    return top_ids, top_lps, own


TASK = "_task"  # BothActor's input and output: "gen" rows to generate, "score" rows to score
SCORE_INPUT = ["prompt_id", "sample_index", "prompt_text", "output_token_ids", "error"]
BOTH_OUT = pa.schema([f.with_nullable(True) for f in (
    *schema.GENERATIONS, *[f for f in schema.SCORES if f.name not in schema.GENERATIONS.names],
    pa.field(TASK, pa.string()))])


_G = {f.name: f.type for f in schema.GENERATIONS}
BOTH_IN = pa.schema([f.with_nullable(True) for f in (
    *schema.PROMPTS, pa.field("sample_index", pa.int32()), pa.field("seed", pa.int64()),
    *[pa.field(c, _G[c]) for c in SCORE_INPUT if c not in ("prompt_id", "sample_index")],
    pa.field(TASK, pa.string()))])


def as_input(batch: pa.Table, *, task: str) -> pa.Table:
    """Expanded prompt rows ("gen") or the original's generation rows ("score") in BOTH_IN's shape,
    so both kinds travel in one Dataset to a BothActor."""
    n = batch.num_rows
    return pa.Table.from_arrays([pa.array([task] * n, pa.string()) if f.name == TASK else
                                 (batch.column(f.name).cast(f.type) if f.name in batch.column_names
                                  else pa.nulls(n, f.type)) for f in BOTH_IN], schema=BOTH_IN)


def as_output(table: pa.Table, task: str) -> pa.Table:
    n = table.num_rows
    return pa.Table.from_arrays([pa.array([task] * n, pa.string()) if f.name == TASK else
                                 (table.column(f.name).cast(f.type) if f.name in table.column_names
                                  else pa.nulls(n, f.type)) for f in BOTH_OUT], schema=BOTH_OUT)


def trim_topk(column: pa.ChunkedArray, k: int) -> pa.Array:
    """Each position's top-k list (list<list<...>>) cut to its first k (they are in rank order)."""
    outer = column.combine_chunks()
    if isinstance(outer, pa.ChunkedArray):  # (an all-null column of no chunks)
        outer = pa.nulls(0, column.type)
    inner = pc.list_slice(outer.flatten(), 0, k)
    return pa.ListArray.from_arrays(outer.offsets, inner, type=column.type, mask=outer.is_null())


def teacher_forced_inputs(rows: list[dict], load_error: str | None, encode_prompts,
                          max_model_len: int) -> tuple[list[int], list[list[int]], list[str | None]]:
    """What a teacher-forced pass runs of the original's generation rows (SCORE_INPUT, as dicts):
    (the indices of the rows it runs, their prompt + output token ids, every row's error). A row is
    an error when the engine failed to load (`load_error`), when the original has no output there,
    or when prompt + output leave no room in the context. `encode_prompts(texts)` gives the
    original's rendered prompts as ids (the same ids as this model's own render: check_templates)."""
    errors: list[str | None] = [None] * len(rows)
    todo = []
    for i, row in enumerate(rows):
        if load_error is not None:
            errors[i] = load_error
        elif row["error"] is not None or not row["output_token_ids"]:
            errors[i] = "the original has no output here to score"
        else:
            todo.append(i)
    fits, inputs = [], []
    for i, prompt_ids in zip(todo, encode_prompts([rows[i]["prompt_text"] for i in todo]) if todo else []):
        ids = prompt_ids + list(rows[i]["output_token_ids"])
        if len(ids) + 1 > max_model_len:
            errors[i] = f"prompt + output is {len(ids)} tokens; scoring needs engine.max_model_len > that"
        else:
            fits.append(i), inputs.append(ids)
    return fits, inputs, errors
