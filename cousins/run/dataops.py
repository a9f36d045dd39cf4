"""Ray Data building blocks the filters and joins share: bringing the rows of
several datasets that share a key into the same partition (a hash-partitioned join without a
join library: each side padded to one union schema, tagged, `repartition(keys=...)`, split back in
the worker). Nothing here reads rows into the driver.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

SIDE = "_side"


def union_schema(sides: dict[str, pa.Schema]) -> pa.Schema:
    fields: dict[str, pa.Field] = {}
    for s in sides.values():
        for f in s:
            if f.name in fields and not fields[f.name].type.equals(f.type):
                raise TypeError(f"column {f.name!r} is {fields[f.name].type} on one side and {f.type} on another")
            fields.setdefault(f.name, f.with_nullable(True))
    return pa.schema([*fields.values(), pa.field(SIDE, pa.string())])


def _pad(batch: pa.Table, *, side: str, schema: pa.Schema) -> pa.Table:
    n = batch.num_rows
    cols = [pa.array([side] * n, pa.string()) if f.name == SIDE else
            (batch.column(f.name).cast(f.type) if f.name in batch.column_names else pa.nulls(n, f.type))
            for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def co_partition(sides: dict, schemas: dict[str, pa.Schema], key: str, partitions: int):
    """One Dataset whose partitions each hold every side's rows of their keys (split them with
    `split`). sides: name -> Dataset (or None: no rows); schemas: name -> the side's columns."""
    schema = union_schema(schemas)
    tagged = [ds.map_batches(_pad, fn_kwargs={"side": name, "schema": schema}, batch_format="pyarrow",
                             num_cpus=0.1) for name, ds in sides.items() if ds is not None]
    union = tagged[0].union(*tagged[1:]) if len(tagged) > 1 else tagged[0]
    return by_key(union, key, partitions)


def by_key(ds, key: str, partitions: int):
    """`ds` hash-partitioned by `key` into `partitions` blocks; one partition is one block without
    a shuffle: a hash shuffle starts aggregator actors (seconds each on a small machine), which
    a run small enough for one partition would spend more time on than on its rows."""
    return ds.repartition(partitions, keys=[key]) if partitions > 1 else ds.repartition(1)


def split(block: pa.Table, schemas: dict[str, pa.Schema]) -> dict[str, pa.Table]:
    """A co-partitioned block back into its sides, each with its own columns and types."""
    out = {}
    for name, s in schemas.items():
        rows = block.filter(pc.equal(block.column(SIDE), name)) if block.num_rows else block
        out[name] = pa.Table.from_arrays([rows.column(f.name).cast(f.type) for f in s], schema=s)
    return out


SMALL_ROWS = 4096  # rows one task joins and judges in less time than a shuffle takes to start


def _permuted(block: pa.Table, *, seed: int) -> pa.Table:
    import numpy as np

    return block.take(np.random.default_rng(seed).permutation(block.num_rows))


def shuffled(ds, rows: int, seed: int):
    """`ds`'s rows in an order drawn from `seed`: a small input (at most SMALL_ROWS `rows`)
    permuted in one block, a larger one by Ray Data's random shuffle."""
    if rows <= SMALL_ROWS:
        return ds.repartition(1).map_batches(_permuted, fn_kwargs={"seed": seed}, batch_size=None,
                                             batch_format="pyarrow", num_cpus=0.1)
    return ds.random_shuffle(seed=seed)


def _first_by(block: pa.Table, *, keys: list[str], n: int) -> pa.Table:
    return block.sort_by([(k, "ascending") for k in keys]).slice(0, n)


def first_by(ds, rows: int, keys: list[str], n: int):
    """The `n` first rows of `ds` (`rows` of them) in the order of `keys`: a small input sorted
    in one block, a larger one by Ray Data's sort."""
    if rows <= SMALL_ROWS:
        return ds.repartition(1).map_batches(_first_by, fn_kwargs={"keys": keys, "n": n}, batch_size=None,
                                             batch_format="pyarrow", num_cpus=0.1)
    return ds.sort(keys).limit(n)


def partitions_for(rows: int, per_partition: int) -> int:
    """Partitions for `rows` rows: one for a small input (at most SMALL_ROWS), else at least one
    per CPU of the cluster and at most `per_partition` rows each."""
    import ray

    if rows <= SMALL_ROWS:
        return 1
    return max(int(ray.cluster_resources().get("CPU", 1)), -(-rows // per_partition), 1)


def node_slots(num_cpus: float) -> list[str | None]:
    """Where `spread_blocks` may run tasks of `num_cpus` CPUs: one entry per such task an alive
    node can hold, nodes interleaved (A, B, A, B, A for a 3-slot A and a 2-slot B). On a cluster
    with no CPU node yet (an autoscaler still adding workers) a few entries of None: no placement,
    the tasks' demand scales it up."""
    import ray

    slots = {n["NodeID"]: int(n["Resources"].get("CPU", 0) // num_cpus)
             for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= num_cpus}
    out: list[str | None] = []
    for k in range(max(slots.values(), default=0)):
        out += [node for node, n in slots.items() if k < n]
    return out or [None] * 2


QUEUED_PER_SLOT = 2


def _on_arrow(block, rows: tuple[int, int] | None, fn, fn_kwargs: dict):
    from ray.data.block import BlockAccessor

    table = BlockAccessor.for_block(block).to_arrow()
    return fn(table.slice(rows[0], rows[1] - rows[0]) if rows else table, **fn_kwargs)


def spread_blocks(ds, fn, *, num_cpus: float, fn_kwargs: dict, fetch: bool = True):
    """`fn(table, **fn_kwargs)` on each block of `ds` (as a pyarrow Table) in one Ray task each,
    yielding the results as they finish (not `fetch`: their object references, for a consumer
    other than the driver). Unlike `map_batches(scheduling_strategy="SPREAD")`, whose
    short tasks can reuse one leased worker and all land on one node, each task is placed: the
    first ones over the nodes' CPU slots in turn, each later one on the node whose task just
    finished (soft affinity: a node that died is replaced by any other). At most QUEUED_PER_SLOT
    tasks per slot are submitted (one runs, the next waits on its node, so no slot idles while the
    driver merges a result), and blocks are pulled from `ds` only as slots free up, so the Dataset
    upstream stays backpressured. Empty blocks are skipped."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(_on_arrow)
    free = node_slots(num_cpus) * QUEUED_PER_SLOT
    running: dict = {}

    def finished():
        [done], _ = ray.wait(list(running), num_returns=1)
        free.append(running.pop(done))
        return ray.get(done) if fetch else done

    for bundle in ds.iter_internal_ref_bundles():
        for entry, piece in zip(bundle.blocks, bundle.slices or [None] * len(bundle.blocks)):
            rows = (piece.start_offset, piece.end_offset) if piece is not None else None
            if (rows[1] - rows[0] if rows else entry.metadata.num_rows) == 0:
                continue
            while not free:
                yield finished()
            node = free.pop(0)
            options = {"num_cpus": num_cpus} if node is None else {
                "num_cpus": num_cpus, "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=True)}
            running[task.options(**options).remote(entry.ref, rows, fn, fn_kwargs)] = node
    while running:
        yield finished()


def _slice_block(block, start: int, end: int) -> pa.Table:
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(block).to_arrow().slice(start, end - start)


def materialize_counted(ds, bar):
    """`ds.materialize()` that adds each block's rows to the progress `bar` as it is computed
    (its blocks stay in the object store; the driver holds their references)."""
    import ray
    import ray.data

    refs = []
    for bundle in ds.iter_internal_ref_bundles():
        for entry, piece in zip(bundle.blocks, bundle.slices or [None] * len(bundle.blocks)):
            if piece is None:
                refs.append(entry.ref)
                bar.add(entry.metadata.num_rows or 0)
            else:
                refs.append(ray.remote(_slice_block).options(num_cpus=0.1).remote(
                    entry.ref, piece.start_offset, piece.end_offset))
                bar.add(piece.end_offset - piece.start_offset)
    return ray.data.from_arrow_refs(refs) if refs else ds.materialize()
