"""Where engines of several GPUs go: checked against the cluster's shape, then one placement group each.

An engine of tensor_parallel_size x pipeline_parallel_size = N > 1 GPUs runs as Ray's own LLM stages
run one (`ray.data.llm`): the engine actor holds no GPU; a placement group of N bundles of one GPU
each (the first also holding the actor's CPUs) is made for it, the actor is scheduled into it with
its child tasks captured, and vLLM's Ray executor, finding itself in that group, puts one worker on
each GPU bundle. Without this, the actor asks for a GPU and vLLM's workers for N more: N + 1 GPUs
for one engine, and on a node of exactly N the engine waits forever for the last one.

Tensor-parallel workers talk at every layer, so an engine with pipeline_parallel_size = 1 is kept to
one node (STRICT_PACK); with pipeline stages it may span nodes (PACK: together where they fit).

Before a stage starts, `check_fits` compares the request with the cluster's nodes (any node, when
an autoscaler serves the cluster); a request no node shape can hold is refused at once, naming the
shape, instead of a pool that waits for resources that never come. The groups are made before Ray
Data starts, waited for up to engine.start_timeout_s, handed to the pool's actors one each, and
removed when the stage ends, so the next stage's engines find the GPUs free.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

from cousins.engine.backend import Placement

log = logging.getLogger(__name__)


class PlacementError(RuntimeError):
    """An engine pool the cluster cannot hold, said before any engine starts."""


@dataclass(frozen=True)
class NodeShape:
    gpus: float
    cpus: float
    count: int | None = 1  # nodes of this shape; None: as many as an autoscaler adds
    autoscaled: bool = False


def gpus_per_engine(where: Placement) -> int:
    return where.tensor_parallel_size * where.pipeline_parallel_size


def uses_groups(where: Placement) -> bool:
    """An engine of several GPUs: one placement group per engine actor."""
    return where.gpus_per_actor > 0 and gpus_per_engine(where) > 1


def bundles(where: Placement) -> list[dict]:
    """One bundle per GPU worker; the first also holds the engine actor's CPUs."""
    first = {"GPU": 1.0, **({"CPU": float(where.cpus_per_actor)} if where.cpus_per_actor > 0 else {})}
    return [first] + [{"GPU": 1.0} for _ in range(gpus_per_engine(where) - 1)]


def strategy(where: Placement) -> str:
    return "STRICT_PACK" if where.pipeline_parallel_size == 1 else "PACK"


def engines_on(shape: NodeShape, where: Placement) -> int:
    """Engines (or, with pipeline stages, tensor-parallel groups) one node of `shape` holds."""
    per = where.tensor_parallel_size if uses_groups(where) else where.gpus_per_actor
    by_gpu = int(shape.gpus // per + 1e-9) if per > 0 else 0
    by_cpu = int(shape.cpus // where.cpus_per_actor + 1e-9) if where.cpus_per_actor > 0 else by_gpu
    return min(by_gpu, by_cpu)


def check_fits(where: Placement, shapes: list[NodeShape]) -> str:
    """Refuse (PlacementError) a GPU engine pool that no node shape can hold, or one larger than
    the cluster when nothing can be added; returns how the engines will be placed, in words."""
    if where.gpus_per_actor <= 0:
        return "CPU engines"
    n, tp, pp = gpus_per_engine(where), where.tensor_parallel_size, where.pipeline_parallel_size
    what = (f"{where.num_actors} engine(s) of tensor_parallel_size={tp} x pipeline_parallel_size={pp} "
            f"({n} GPU(s) each{', on one node' if pp == 1 and n > 1 else ''}, and {where.cpus_per_actor:g} CPU)"
            if n > 1 else f"{where.num_actors} engine(s) of {where.gpus_per_actor:g} GPU and "
                          f"{where.cpus_per_actor:g} CPU")
    nodes = [s for s in shapes if not s.autoscaled]
    grow = [s for s in shapes if s.autoscaled and engines_on(s, where) > 0]
    per_node = [engines_on(s, where) for s in nodes for _ in range(s.count or 0)]
    now = sum(per_node) // (pp if n > 1 else 1)
    kinds = Counter((s.gpus, s.cpus) for s in nodes for _ in range(s.count or 0))
    seen = ", ".join(f"{g:g} GPU/{c:g} CPU" + (f" x{k}" if k > 1 else "") for (g, c), k in kinds.items()) or "none"
    hint = "; lower engine.num_actors, engine.tensor_parallel_size or engine.cpus_per_actor, or add GPU nodes"
    if now >= where.num_actors:
        return f"{what}: the cluster's nodes hold {now}"
    if grow:
        return f"{what}: the cluster's nodes hold {now}; the autoscaler may add nodes for the rest"
    if now == 0 and not any(engines_on(s, where) > 0 for s in shapes):
        need = (f"a node of at least {tp} GPUs" if n > 1 else f"a node with {where.gpus_per_actor:g} GPU")
        raise PlacementError(f"{what} cannot be placed: it needs {need} and {where.cpus_per_actor:g} CPU, and no "
                             f"node of the cluster (nodes: {seen}) or node type its autoscaler may add has that{hint}")
    raise PlacementError(f"{what} do not fit the cluster: its nodes ({seen}) hold {now} such engine(s), and no "
                         f"autoscaling node type adds more{hint} (engine.num_actors={max(now, 1)} fits)")


def cluster_shapes() -> list[NodeShape]:
    """The alive nodes' resources, and any node an autoscaler serving the cluster may add."""
    import ray

    shapes = [NodeShape(gpus=n["Resources"].get("GPU", 0.0), cpus=n["Resources"].get("CPU", 0.0))
              for n in ray.nodes() if n.get("Alive")]
    if _autoscaler_running():
        shapes.append(ANY_NODE)  # its node types are not published (Ray 2.60's autoscalers do not)
    return shapes


# A node type an autoscaler may add whose resources are not known: no request is refused for it.
ANY_NODE = NodeShape(gpus=1e6, cpus=1e6, count=None, autoscaled=True)


MONITOR_WAIT_S = 15  # a new cluster's monitor publishes its first report within seconds (every 5 s by default)


def _autoscaler_running(wait_s: float = MONITOR_WAIT_S) -> bool:
    """An autoscaler with node types serves this cluster: Ray's v1 monitor publishes its report in
    the GCS, naming each node's type; a monitor that only watches the nodes there are (a local or
    `ray start` cluster without an autoscaling config: its read-only provider) names each node's
    type after the node itself. v2 is switched on by RAY_enable_autoscaler_v2 on the head (as
    KubeRay sets it). A cluster too new to have a report is waited for; without one, True."""
    import json
    import os
    import time

    if os.environ.get("RAY_enable_autoscaler_v2") == "1":
        return True
    try:
        from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
        from ray.experimental.internal_kv import _internal_kv_get

        deadline = time.monotonic() + wait_s
        while (status := _internal_kv_get(DEBUG_AUTOSCALING_STATUS)) is None and time.monotonic() < deadline:
            time.sleep(0.5)
        report = (json.loads(status) if status else {}).get("autoscaler_report")
        if report is None:
            return True
        types = report.get("node_type_mapping") or {}
        return any(kind != f"node_{node}" for node, kind in types.items())
    except Exception as e:  # an internal API: when it cannot tell, nothing is refused up front (the
        log.debug("no autoscaler status: %s", e)  # pool then fails after engine.start_timeout_s instead)
        return True


@contextmanager
def engine_groups(where: Placement, what: str):
    """The pool's placement: `where` itself for engines of one GPU or none (after the fit check),
    else `where` with the remote args that put each engine actor into its own placement group;
    the groups are made (and waited for) on entry and removed on exit."""
    import ray

    check_fits(where, cluster_shapes())
    if not uses_groups(where):
        yield where
        return
    from ray.util.placement_group import placement_group, remove_placement_group

    groups = [placement_group(bundles(where), strategy=strategy(where), name=f"cousins-engine-{i}")
              for i in range(where.num_actors)]
    try:
        try:
            ray.get([g.ready() for g in groups], timeout=where.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise PlacementError(
                f"the engine pool of {what} ({where.num_actors} engines of {gpus_per_engine(where)} GPUs, "
                f"{strategy(where)}) could not reserve its GPUs within engine.start_timeout_s="
                f"{where.start_timeout_s}: other work holds them, or the autoscaler could not add nodes in time"
            ) from None
        yield dataclasses.replace(where, remote_args_fn=_Handout(groups))
    finally:
        for g in groups:
            remove_placement_group(g)


class _Handout:
    """Ray Data calls this (in the driver) once per engine actor it creates: each gets its own
    group, in turn. An actor that dies is restarted by Ray with its remote args, so in its group."""

    def __init__(self, groups):
        self.groups, self.next = groups, 0

    def __call__(self) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = self.groups[self.next % len(self.groups)]
        self.next += 1
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            group, placement_group_capture_child_tasks=True)}


def pool_args(where: Placement) -> dict:
    """map_batches' resource arguments for an engine pool of `where`."""
    if where.remote_args_fn is None:
        return {"num_cpus": where.cpus_per_actor, "num_gpus": where.gpus_per_actor}
    return {"num_cpus": where.cpus_per_actor, "num_gpus": 0, "ray_remote_args_fn": where.remote_args_fn}
