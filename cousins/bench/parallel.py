"""drift_parallel: the same drift run (the config's cousins and the noise floor) on local clusters of
N nodes x 1 logical GPU, one model at a time (engine.max_parallel_models=1) and side by side, and
one at a time with every pass starting its own engine actors (engine.keep_processes=false).

For each cluster: the wall time of both runs and its ratio, the engine passes' wall (the original's
pass and the others'), start-up's share of the engine passes (each pass's time before its first
batch over its wall, summed over passes), start-up by part (the engines' ledgers: actor start,
vLLM import, model fetch, engine init, warm-up), and whether the two runs' rows are identical.

On one machine every "node" shares its cores: engines side by side also take turns on them, which
the measured ratio shows and a cluster of separate accelerators would not. The projection says what
the schedule itself gives: each pass's wall measured one at a time, placed as `side_by_side`
places them (largest first, a free slot each) on this cluster's slots and on 8.
"""

from __future__ import annotations

import copy
import heapq
import os
import time

from cousins.contract.config import Config


def _lead_ins(stats) -> tuple[float, float, dict[str, float]]:
    """(sum over passes of the time before the first batch, sum of their walls, start-up by part summed)."""
    lead = wall = 0.0
    parts: dict[str, float] = {}
    for s in stats:
        r = s.retries or {}
        if r.get("first_batch_at_s") is not None:
            lead, wall = lead + r["first_batch_at_s"], wall + s.wall_s
        for k, v in (r.get("startup_s") or {}).items():
            parts[k] = parts.get(k, 0.0) + v
    return lead, wall, parts


def projected_wall(first: float, others: list[float], slots: int) -> float:
    """The original's pass, then the others `slots` at a time, longest first, each on the slot
    that frees first (what `side_by_side` does when every pass needs one slot)."""
    free = [0.0] * max(1, slots)
    for t in sorted(others, reverse=True):
        heapq.heappush(free, heapq.heappop(free) + t)
    return first + max(free)


def _rows(root, run_id: str, models: list[str]):
    """Each model's generation rows of a (small, benchmark-sized) run, sorted by key, without the
    columns that say where and how fast they ran."""
    from cousins.run.lifecycle import committed

    run = committed(root, run_id)
    out = {}
    for m in models:
        t = run.read(run.layout.generations(m))
        t = t.drop_columns([c for c in ("engine_time_s", "engine_node") if c in t.column_names])
        out[m] = t.sort_by([("prompt_id", "ascending"), ("sample_index", "ascending")])
    return out


def _one_cluster(cfg: Config, limit: int, tag: str, nodes: int) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from cousins.orchestrate.pipeline import run_drift
    from cousins.run.storage import resolve

    cores = sorted(os.sched_getaffinity(0))
    bind = lambda i: {"VLLM_CPU_OMP_THREADS_BIND": str(cores[i % len(cores)])}  # noqa: E731 - a core a node
    # one CPU per node for its engine, and one more on the head for Ray Data's reads and writes
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 1, "object_store_memory": 256 << 20, "env_vars": bind(0)})
    for i in range(1, nodes):
        cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=128 << 20, env_vars=bind(i))
    out: dict = {"nodes": nodes}
    runs = {}
    try:
        ray.init(address=cluster.address)
        # fresh: one at a time, each pass starting its own engine actors (engine.keep_processes=false)
        for mode, cap, keep in (("fresh", 1, False), ("sequential", 1, True), ("parallel", None, True)):
            c = copy.deepcopy(cfg)
            c.corpus.limit, c.run.run_id = limit, f"bench-{tag}-par{nodes}-{mode}"
            c.engine.num_actors, c.engine.gpus_per_actor, c.engine.cpus_per_actor = 1, 1, 1
            c.engine.max_parallel_models, c.engine.keep_processes = cap, keep
            c.drift.noise_floor = True
            t0 = time.perf_counter()
            result, summary = run_drift(c)
            wall = time.perf_counter() - t0
            lead, passes, parts = _lead_ins(result.models)
            out[mode] = {"wall_s": wall, "engine_passes_s": summary["timings"]["generate_s"],
                         "startup_share": lead / passes if passes else None, "startup_by_part_s": parts,
                         "pass_wall_s": {s.model: s.wall_s for s in result.models}, "run_id": c.run.run_id}
            runs[mode] = result
            print(f"drift on {nodes} x 1 GPU, {mode}: {wall:.1f} s (engine passes "
                  f"{out[mode]['engine_passes_s']:.1f} s, start-up {100 * (out[mode]['startup_share'] or 0):.0f}%)",
                  flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    seq, par = out["sequential"], out["parallel"]
    out["speedup"] = seq["wall_s"] / par["wall_s"]
    out["kept_speedup"] = out["fresh"]["wall_s"] / seq["wall_s"]  # what keeping engine processes gives
    out["parallel_over_fresh"] = out["fresh"]["wall_s"] / par["wall_s"]
    out["engine_passes_speedup"] = seq["engine_passes_s"] / par["engine_passes_s"]
    models = [s.model for s in runs["sequential"].models]
    root = resolve(cfg.storage.root, **cfg.storage.options)
    a, b, f = (_rows(root, out[mode]["run_id"], models) for mode in ("sequential", "parallel", "fresh"))
    out["rows_identical"] = all(a[m].equals(b[m]) and a[m].equals(f[m]) for m in models)
    walls = list(seq["pass_wall_s"].values())
    for slots in (nodes, 8):
        out[f"projected_speedup_{slots}_slots"] = sum(walls) / projected_wall(walls[0], walls[1:], slots)
    return out


def drift_parallel(cfg: Config, limit: int, tag: str, node_counts: list[int]) -> dict:
    """`_one_cluster` for each of `node_counts` (each its own local cluster; nothing else on Ray)."""
    if not cfg.cousins:
        raise ValueError("bench.drift_parallel compares the config's cousins: add them (e.g. cousins=demo)")
    return {f"nodes_{n}": _one_cluster(cfg, limit, tag, n) for n in node_counts}
