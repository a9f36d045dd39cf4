"""Engine pools: a stage's rows through Ray Data `map_batches` on a pool of engine actors, one
table of the modes an engine stage runs in (MODES: its actor, the ledger tasks its batches count,
the shape of its rows out). cousins/orchestrate/stages.py runs every mode the same way.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from cousins.engine.actors import BothActor, EngineActor, ScoreActor, SelfScoringActor
from cousins.engine.backend import ENGINE_ENV, Placement
from cousins.engine.feeder import BATCHES_IN_FLIGHT
from cousins.engine.hosts import HostedEngine
from cousins.engine.kld_actor import KldActor
from cousins.engine.placement import pool_args
from cousins.run.ledger import GENERATE, KLD, SCORE
from cousins.run.runtime import engine_env


@dataclass(frozen=True)
class Mode:
    """One kind of engine stage."""

    actor: type
    tasks: tuple[str, ...]  # the ledger tasks its batches count (cousins.run.ledger), the first one's tokens shown
    both: bool  # rows out are BOTH_OUT (generations and scores, column TASK says which), else one stage's rows


MODES = {
    # expanded prompt rows -> generations (schema.GENERATIONS)
    "generate": Mode(EngineActor, (GENERATE,), both=False),
    # expanded prompt rows and the original's generation rows (TASK "gen"/"score") -> both, one engine
    "generate_and_score": Mode(BothActor, (GENERATE, SCORE), both=True),
    # the original's expanded prompt rows -> its generations and its own scores from the same pass
    "self_scored": Mode(SelfScoringActor, (GENERATE,), both=True),
    # the original's generation rows -> a model's teacher-forced scores (schema.SCORES)
    "score": Mode(ScoreActor, (SCORE,), both=False),
    # the original's generation rows -> exact per-token KLD against the original (schema.KLD)
    "kld": Mode(KldActor, (KLD,), both=False),
}


def engine_pool(rows, mode: str, placement: Placement, *, hosts: list | None = None, **kwargs):
    """`rows` through a pool of `mode`'s engine actors (MODES), lazily: each actor is built with
    `kwargs` (its engine spec(s), sampling, top-k, ledger, backend, ...). With `hosts` (a hosted
    pass: cousins/engine/hosts.py), the pool's actors forward to those engine hosts, which build
    the mode's actors and hold the resources."""
    from ray.data import ActorPoolStrategy

    actor = MODES[mode].actor
    resources = {**pool_args(placement), "runtime_env": {"env_vars": engine_env(ENGINE_ENV)}}
    if hosts is not None:
        actor, kwargs = HostedEngine, {"hosts": hosts, "actor": actor, "kwargs": kwargs}
        resources = {"num_cpus": 0, "num_gpus": 0}
    with warnings.catch_warnings():
        # ray_remote_args_fn (an engine of several GPUs: its placement group) is deprecated for Ray
        # 2.64 and is how ray.data.llm places such engines in the Ray this project pins.
        warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.*")
        out = rows.map_batches(
            actor,
            fn_constructor_kwargs=kwargs,
            batch_size=placement.batch_size,
            batch_format="pyarrow",
            # Two batches run in each actor's threads at once, feeding its one engine (see
            # cousins.engine.feeder), and no more are queued on it: Ray Data's default (twice that) let one
            # engine hold batches another one had nothing to do for, at the end of a stage above all.
            compute=ActorPoolStrategy(size=placement.num_actors, max_concurrent_calls_per_actor=BATCHES_IN_FLIGHT,
                                      max_tasks_in_flight_per_actor=BATCHES_IN_FLIGHT,
                                      enable_true_multi_threading=True),
            **resources,  # CPUs and GPUs, or (several GPUs an engine) its placement group; none when hosted
        )
    # Every engine of the pool starts (loads its model) before the first batch is sent: otherwise
    # Ray Data hands the first actor ready as many batches as it takes, and on a small run an
    # engine that starts later (another node, an autoscaled one) may get nothing.
    out.context.wait_for_min_actors_s = placement.start_timeout_s
    return out
