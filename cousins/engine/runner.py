"""What every engine actor does around a batch: load its engine (a cousin that fails to load
becomes its rows' error, when tolerated), tell the stage's ledger each batch's start and end, and
survive an engine that breaks (the actor's process exits for a fresh engine; a batch that breaks
two engines becomes error rows). The actors themselves are in cousins/engine/actors.py and
cousins/engine/kld_actor.py.
"""

from __future__ import annotations

import os
import time

import pyarrow as pa

from cousins.engine.backend import EngineSpec
from cousins.engine.feeder import EngineBroken
from cousins.run.ledger import batch_key, peak_rss_bytes


def lora_request(backend, spec: EngineSpec):
    """The LoRA adapter request of `spec`'s engine, if it serves one (a backend without adapters: None)."""
    get = getattr(backend, "lora_request", None)
    return get(spec) if get is not None and spec.lora else None


def node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def load_engine(spec: EngineSpec, backend, ledger, tolerate_failure: bool):
    """(the engine, None), or (None, the reason) when loading fails and that is tolerated."""
    began = time.time()
    try:
        llm = backend.load(spec)
    except Exception as e:  # noqa: BLE001 - reported as the model's row errors when tolerated
        if not tolerate_failure:
            raise
        return None, f"engine failed to load {spec.model_name!r} from {spec.model_path}: {type(e).__name__}: {e}"[:2000]
    if ledger is not None:
        import ray

        ray.get(ledger.engine_started.remote(spec.model_name, began, time.time(), getattr(backend, "load_parts", None)))
    return llm, None


def begin_batch(ledger, name: str, batch: pa.Table, actor: str) -> str:
    """Tell the ledger a batch begins (retries and working windows); its key, for `end_batch`."""
    key = batch_key(batch)
    if ledger is not None:
        ledger.batch_started.remote(name, key, batch.num_rows, actor)
    return key


def end_batch(ledger, name: str, key: str | None, table: pa.Table, actor: str, tokens: int, engine_ran: bool) -> None:
    """Tell the ledger a batch is done: its rows, error rows and tokens (the stage's progress), and
    when an engine ran it, its working window and memory."""
    if ledger is None:
        return
    if engine_ran:
        ledger.batch_done.remote(name, peak_rss_bytes(), actor, tokens)
    ledger.rows_done.remote(name, key, table.num_rows, table.num_rows - table.column("error").null_count, tokens)


def exit_process(reason: str) -> None:
    """End this engine actor's process: Ray starts a fresh one (a fresh engine) and Ray Data sends
    it the batches this one had (max_restarts / max_task_retries of the actor pool)."""
    import sys

    print(f"engine actor {os.getpid()} exits for a fresh engine: {reason}", file=sys.stderr, flush=True)
    os._exit(1)


class EngineRunner:
    """What both engine actors do around a batch: the ledger, and an engine that breaks.

    An error raised while the engine steps (not a prompt it refuses: those are row errors) leaves
    the engine unusable. The first time a batch is in an engine that breaks, the actor exits: Ray
    restarts it with a fresh engine and Ray Data sends the batch again. A batch that broke an
    engine before runs alone on the fresh one; if it breaks that too, its rows become error rows
    with the engine's reason (the run goes on and counts them), and the actor exits before its
    next batch. Outside Ray (tests) `die` raises instead of exiting."""

    ledger = None
    retire = False  # this engine broke on a batch that then became error rows: no further batch here

    def _die(self, reason: str) -> None:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            exit_process(reason)
        raise RuntimeError(f"engine broken: {reason}")

    def _breaks(self, name: str, key: str, reason: str | None = None, stepping: bool = False) -> int:
        """How many engines broke with this batch in them (recording one more first when `reason`
        is given; `stepping`: this call ran the step that raised, so the engine is counted once):
        the ledger's count, shared by every actor of the pool and their restarts; a count of this
        process's own without a ledger."""
        import ray

        if self.ledger is not None:
            return ray.get(self.ledger.engine_broke.remote(name, key, reason, stepping) if reason is not None
                           else self.ledger.batch_breaks.remote(name, key))
        own = self.__dict__.setdefault("_own_breaks", {})
        if reason is not None:
            own[key] = own.get(key, 0) + 1
        return own.get(key, 0)

    def _broke(self, name: str, key: str, e: EngineBroken) -> str:
        """The reason for the batch's error rows when it broke an engine a second time (else exits).
        Every call that was in the engine records the break before any of them ends the process."""
        reason = f"{type(e.cause).__name__}: {e.cause}"[:1000]
        if not e.during:  # broken by another batch before this one came: a fresh engine takes it
            self._die(f"broken by an earlier batch ({reason})")
        breaks = self._breaks(name, key, reason, e.stepping)
        feeder = self.feeder  # (shared by a BothActor's two kinds of calls: one barrier for both)
        with feeder.recorded:
            feeder.records += 1
            feeder.recorded.notify_all()
        if breaks < 2:
            with feeder.recorded:  # a barrier: every call that was in the engine has recorded
                feeder.recorded.wait_for(lambda: feeder.records >= feeder.broken_with, timeout=30)
            self._die(reason)
        self.retire = True
        return f"the engine failed on this batch twice, the second time running it alone on a fresh engine: {reason}"

    def run_batch(self, name: str, batch: pa.Table, work, failed_rows) -> tuple[pa.Table, int]:
        """`work(batch, solo) -> (table, tokens)` with the ledger told; an engine break handled."""
        if self.retire:
            self._die("its engine broke on an earlier batch")
        key = begin_batch(self.ledger, name, batch, self.actor)
        solo = self.llm is not None and self._breaks(name, key) > 0
        try:
            table, tokens = work(batch, solo)
        except EngineBroken as e:
            table, tokens = failed_rows(batch, self._broke(name, key, e)), 0
        end_batch(self.ledger, name, key, table, self.actor, tokens, self.llm is not None)
        return table, tokens
