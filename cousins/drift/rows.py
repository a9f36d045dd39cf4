"""Drift rows as a Ray Data computation: every model's generations and scores of a prompt meet in
one worker, which computes that prompt's drift rows for every cousin and publishes them.

The original's generations and scores, each cousin's, and the prompts' references are read as one
union of tagged rows (`UNION`), hash-partitioned by prompt_id (`repartition(keys=...)`, the shuffle
Ray Data's own `map_groups` uses: a partition holds all rows of its prompts), and each partition is
joined locally by (prompt_id, sample_index) with `compare.compare`. Drift rows are written as part
files under drift/cousin={name}/, named by their keys. No row reaches the driver: it gets each
partition's aggregates (drift/aggregate.py) and merges them as they stream in.
"""

from __future__ import annotations

import os
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from cousins.contract import schema
from cousins.drift import aggregate
from cousins.drift.answers import Rule
from cousins.drift import compare as cmp
from cousins.run.layout import RunLayout, part_files, part_path, partition_name, read_batches, read_rows
from cousins.run.storage import Location

KEYS = ["prompt_id", "sample_index"]
PROMPTS_PER_PARTITION = 256  # prompts a diff task works on: enough to amortise, small enough to spread
SMALL_DIFF_ROWS = 1024  # drift rows one task computes in less time than the shuffle takes to start
SHUFFLE_INPUT_BYTES = 64 << 20
ACCUMULATE_FROM = 16  # partitions from which an actor, not the driver, merges their aggregates
MERGES_QUEUED = 8  # partitions' aggregates waiting for that actor at most

_G = {f.name: f.type for f in schema.GENERATIONS}
_S = {f.name: f.type for f in schema.SCORES}
UNION = pa.schema([
    ("prompt_id", pa.string()), ("sample_index", pa.int32()), ("model", pa.string()),
    ("part", pa.string()),  # prompt | gen | score
    ("reference", pa.string()),  # part=prompt
    ("choices", pa.list_(pa.string())),  # part=prompt (multiple choice)
    ("checker", pa.string()),  # part=prompt: the row's own answer checker
    *[(c, _G[c]) for c in cmp.GEN_COLUMNS if c not in ("prompt_id", "sample_index", "error")],
    *[(c, _S[c]) for c in cmp.SCORE_COLUMNS if c not in ("prompt_id", "sample_index", "error")],
    ("kld_tokens", pa.list_(pa.float32())),  # part=kld (drift.kld=exact)
    ("rkld_tokens", pa.list_(pa.float32())),
    ("tail_mass_tokens", pa.list_(pa.float32())),
    ("error", pa.string()),
])
KLD_COLUMNS = ["prompt_id", "sample_index", *cmp.EXACT_COLUMNS]
_K = {f.name: f.type for f in schema.KLD}


def _tag(batch: pa.Table, *, model: str, part: str) -> pa.Table:
    """A stage's rows in the union's shape: its own columns, the others null."""
    n = batch.num_rows
    cols = {"model": pa.array([model] * n, pa.string()), "part": pa.array([part] * n, pa.string())}
    return pa.table({f.name: cols[f.name] if f.name in cols else
                     (batch.column(f.name).cast(f.type) if f.name in batch.column_names else pa.nulls(n, f.type))
                     for f in UNION}, schema=UNION)


_TOKENIZERS: dict[str, object] = {}


def _tokenizer(path: str):
    """The original's tokenizer (the `tokenizers` library: light to load); None without a local
    tokenizer.json. One per process."""
    if path not in _TOKENIZERS:
        file = os.path.join(path, "tokenizer.json")
        if os.path.isfile(file):
            from tokenizers import Tokenizer

            _TOKENIZERS[path] = Tokenizer.from_file(file)
        else:
            _TOKENIZERS[path] = None
    return _TOKENIZERS[path]


def decoder(path: str) -> Callable[[list[int]], str] | None:
    """Token ids -> text, to place divergent tokens in the texts; None without a tokenizer."""
    tok = _tokenizer(path)
    return None if tok is None else (lambda ids: tok.decode(ids, skip_special_tokens=True))


def counter(path: str) -> Callable[[str], int] | None:
    """Text -> its token count, to place the end of a thinking span; None without a tokenizer."""
    tok = _tokenizer(path)
    return None if tok is None else (lambda text: len(tok.encode(text, add_special_tokens=False).ids))


def _pick(block: pa.Table, part: str, model: str, columns: list[str], types: dict) -> pa.Table:
    sel = pc.and_(pc.equal(block.column("part"), part), pc.equal(block.column("model"), model))
    t = block.filter(sel).select(columns)
    t = pa.table({c: t.column(c).cast(types[c]) for c in columns})
    return t.sort_by([(k, "ascending") for k in KEYS])


def diff_partition(block: pa.Table, *, original: str, cousins: list[tuple[str, bool]], original_scored: bool,
                   rule: Rule, tokenizer_path: str, exact_kld: bool = False) -> pa.Table:
    """The drift rows (schema.DRIFT) of every cousin for the prompts of one partition.
    cousins: (name, compared token by token); exact_kld: their KLD rows replace the top-k bound."""
    prompts = block.filter(pc.equal(block.column("part"), "prompt"))
    references = {p: r for p, r in zip(prompts.column("prompt_id").to_pylist(),
                                       prompts.column("reference").to_pylist()) if r is not None}
    choices = {p: c for p, c in zip(prompts.column("prompt_id").to_pylist(),
                                    prompts.column("choices").to_pylist()) if c}
    checkers = {p: c for p, c in zip(prompts.column("prompt_id").to_pylist(),
                                     prompts.column("checker").to_pylist()) if c}
    og = _pick(block, "gen", original, cmp.GEN_COLUMNS, _G)
    so = _pick(block, "score", original, cmp.SCORE_COLUMNS, _S) if original_scored else None
    decode, count = decoder(tokenizer_path), counter(tokenizer_path)
    out = [schema.DRIFT.empty_table()]
    for name, token_level in cousins:
        cg = _pick(block, "gen", name, cmp.GEN_COLUMNS, _G)
        sc = _pick(block, "score", name, cmp.SCORE_COLUMNS, _S) if token_level else None
        ex = _pick(block, "kld", name, KLD_COLUMNS, _K) if token_level and exact_kld else None
        out.append(cmp.compare(name, og, cg, so if token_level else None, sc, rule=rule,
                               references=references, choices=choices, checkers=checkers, decode=decode, exact_kld=ex,
                               count_tokens=count))
    return pa.concat_tables(out)


def diff_and_publish(block: pa.Table, *, layout: RunLayout, original: str, cousins: list[tuple[str, bool]],
                     original_scored: bool, rule: Rule, tokenizer_path: str, worst_n: int, seed: int,
                     resamples: int, quantile_resamples: int, exact_kld: bool = False) -> pa.Table:
    """One partition's work: its drift rows (diff_partition), published one part per cousin and
    named by the rows' keys (a retried task rewrites the same names), and returned only as
    aggregates (aggregate.PARTIALS, one row per cousin)."""
    from cousins.run.ledger import batch_key
    from cousins.run.storage import write_parquet_atomic

    import ray

    rows = diff_partition(block, original=original, cousins=cousins, original_scored=original_scored,
                          rule=rule, tokenizer_path=tokenizer_path, exact_kld=exact_kld)
    node = ray.get_runtime_context().get_node_id()
    parts = []
    for cousin, token_level in cousins:
        part = rows.filter(pc.equal(rows.column("cousin"), cousin))
        if part.num_rows:
            write_parquet_atomic(part, part_path(layout.drift(cousin), batch_key(part)))
        parts.append(aggregate.partial(cousin, part, token_level=token_level, worst_n=worst_n, seed=seed,
                                       resamples=resamples, quantile_resamples=quantile_resamples, node=node))
    return aggregate.to_rows(parts)


def load_error(stage: Location) -> str | None:
    """The engine's load error when every row of a model failed with it ("no generations" when the
    stage holds none); streams the error column, stopping at the first row that did not fail so."""
    first, seen = None, 0
    for batch in read_batches(stage, ["error"]):
        for e in batch.column(0).to_pylist():
            if e is None or not e.startswith("engine failed to load"):
                return None
            first, seen = first or e, seen + 1
    return first if seen else "no generations"


def _tag_file(table: pa.Table, path: str, *, part: str) -> pa.Table:
    return _tag(table, model=partition_name(path), part=part)


def _read(run, stages: list[Location], columns: list[str], part: str, read_schema: pa.Schema | None = None):
    """One read of several stages' parts, each file's rows tagged with its model and part; with
    `read_schema`, columns a part lacks (written before they existed) read as nulls."""
    return read_rows(stages, columns, tag=_tag_file, tag_kwargs={"part": part}, schema=read_schema)


def drift_rows(run, entries, token_level: dict[str, bool], *, rule: Rule, worst_n: int, seed: int, resamples: int,
               quantile_resamples: int, num_cpus: float = 1.0, exact_kld: bool = False) -> dict[str, aggregate.Merged]:
    """Compute and publish every cousin's drift rows on the connected Ray; returns per cousin the
    merged aggregates of its rows (rows written, nodes that wrote them, sums, histograms, worst rows).
    `entries`: the run's models, the original first; `token_level`: per cousin, whether it is
    compared token by token (not text-only, and its engine loaded)."""
    import ray

    from cousins.run.dataops import by_key, spread_blocks
    from cousins.run.progress import Bar

    layout, original = run.layout, entries[0]

    # One read per kind of stage (prompts, generations, scores), the model taken from each file's
    # path: a handful of operators whatever the number of cousins.
    gens = [layout.generations(e.name) for e in entries]
    scores = [layout.scores(e.name) for e in entries if e.is_original or token_level[e.name]]
    parts = [_read(run, [layout.prompts], ["prompt_id", "reference", "choices", "checker"], "prompt",
                   schema.PROMPTS),
             _read(run, gens, cmp.GEN_COLUMNS, "gen", schema.GENERATIONS),  # older runs: no thinking columns
             _read(run, scores, cmp.SCORE_COLUMNS, "score")]
    if exact_kld:
        parts.append(_read(run, [layout.kld(e.name) for e in entries[1:] if token_level[e.name]], KLD_COLUMNS,
                           "kld", schema.KLD))
    original_scored = bool(part_files(layout.scores(original.name)))
    parts = [p for p in parts if p is not None]
    for e in entries[1:]:
        run.restart(layout.drift(e.name))  # an earlier diff's parts never mix with this one's
    n_prompts = run.count(layout.prompts)
    cousins = [(e.name, token_level[e.name]) for e in entries[1:]]
    drift_rows_todo = run.count(layout.generations(original.name)) * len(cousins)
    # a small diff in one task (no shuffle to start); else at least a partition per CPU
    partitions = 1 if drift_rows_todo <= SMALL_DIFF_ROWS else max(
        int(ray.cluster_resources().get("CPU", 1)), -(-n_prompts // PROMPTS_PER_PARTITION))
    union = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    # the shuffle's map side takes its input as it streams in (Ray's default buffers up to 1 GiB
    # per node first, which puts a small run's whole shuffle in one task on one node)
    ray.data.DataContext.get_current().shuffle_input_batch_bytes = SHUFFLE_INPUT_BYTES
    # One task per partition, placed over every node of the cluster (dataops.spread_blocks)
    kwargs = {"layout": layout, "original": original.name, "cousins": cousins, "original_scored": original_scored,
              "rule": rule, "tokenizer_path": original.path, "worst_n": worst_n, "seed": seed,
              "resamples": resamples, "quantile_resamples": quantile_resamples, "exact_kld": exact_kld}
    # Streamed: each partition's aggregates are merged as they arrive, then dropped. From
    # ACCUMULATE_FROM partitions on, an actor on this node merges them (aggregate.Accumulator): the
    # driver gets two counts per partition and the merged state once, so its memory does not grow
    # with the run; below, the driver merges them (an actor's start would cost a small diff seconds).
    names = {name: not tl for name, tl in cousins}
    blocks = by_key(union, "prompt_id", partitions)
    with Bar("diff", drift_rows_todo, unit="drift rows") as bar:
        if partitions < ACCUMULATE_FROM:
            return aggregate.merge_all(_fetched(spread_blocks(blocks, diff_and_publish, num_cpus=num_cpus,
                                                              fn_kwargs=kwargs), bar), names, worst_n)
        return _accumulated(spread_blocks(blocks, diff_and_publish, num_cpus=num_cpus, fn_kwargs=kwargs, fetch=False),
                            names, worst_n, bar)


def _accumulated(refs, names: dict[str, bool], worst_n: int, bar) -> dict[str, aggregate.Merged]:
    """The PARTIALS batches behind `refs` merged by an aggregate.Accumulator actor on this node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    acc = ray.remote(aggregate.Accumulator).options(num_cpus=0, scheduling_strategy=here).remote(names, worst_n)
    try:
        pending = []
        for ref in refs:
            pending.append(acc.add.remote(ref))
            # merges still to do hold their partials in the object store: at most MERGES_QUEUED
            pending = _counted(pending, bar, keep=MERGES_QUEUED)
        _counted(pending, bar, keep=0)
        return ray.get(acc.result.remote())
    finally:
        ray.kill(acc)


def _fetched(batches, bar):
    """PARTIALS batches, their drift rows and error rows added to `bar` as they pass."""
    for batch in batches:
        bar.add(pc.sum(batch.column("rows")).as_py() or 0, errors=pc.sum(batch.column("error_rows")).as_py() or 0)
        yield batch


def _counted(pending: list, bar, *, keep: int) -> list:
    """Add the finished merges' drift rows and error rows to `bar`, after waiting until at most
    `keep` are unfinished; returns those."""
    import ray

    if not pending:
        return []
    done = []
    if len(pending) > keep:
        done, pending = ray.wait(pending, num_returns=len(pending) - keep)
    if pending:  # and whatever else has finished
        more, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
        done += more
    for rows, errors in ray.get(done):
        bar.add(rows, errors=errors)
    return pending


def _sample0_of(batch: pa.Table, *, wanted: dict[str, list[str]]) -> pa.Table:
    keep = pc.and_(pc.equal(batch.column("sample_index"), 0), pc.is_null(batch.column("error")))
    batch = batch.filter(keep)
    mask = pa.array([False] * batch.num_rows)
    for name, ids in wanted.items():
        if ids:
            mask = pc.or_(mask, pc.and_(pc.equal(batch.column("cousin"), name),
                                        pc.is_in(batch.column("prompt_id"), pa.array(ids, pa.string()))))
    return batch.filter(mask).select(["cousin", "prompt_id", "original_text", "cousin_text"])


def first_texts(run, wanted: dict[str, list[str]]) -> dict[str, dict[str, tuple[str, str]]]:
    """For each cousin, the (original, cousin) texts of sample 0 of the prompts asked for (a few
    thousand at most: the homogenisation pairs), read from its drift rows on the connected Ray."""
    out: dict[str, dict[str, tuple[str, str]]] = {name: {} for name in wanted}
    ds = read_rows([run.layout.drift(name) for name in wanted if wanted[name]],
                   ["cousin", "prompt_id", "sample_index", "error", "original_text", "cousin_text"])
    if ds is None:
        return out
    ds = ds.map_batches(_sample0_of, fn_kwargs={"wanted": wanted}, batch_format="pyarrow", num_cpus=0.1)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for c, p, o, t in zip(*(batch.column(k).to_pylist() for k in
                                ("cousin", "prompt_id", "original_text", "cousin_text"))):
            out[c][p] = (o or "", t or "")
    return out
