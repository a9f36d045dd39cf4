"""One engine fed by several batches at once (used by the engine actors in cousins/engine/actors.py,
whose engines come from the vLLM boundary, cousins/engine/backend.py).

Ray Data hands an engine actor its next batch while the current one is still generating
(`BATCHES_IN_FLIGHT` calls run in the actor's threads). The feeder lets each call enqueue its
requests while whichever call holds the lock steps the engine for everybody, so the engine's batch
stays full across Ray Data's batch boundaries. It needs an object with vLLM's `LLM` surface:
`enqueue(prompts, params, use_tqdm=False)` returning request ids, and `llm_engine.step()` /
`llm_engine.has_unfinished_requests()`; no vLLM import here, so a fake engine tests it in the
fast tier (tests/fake_engine.py).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any

# Batches an engine actor works on at once (see Feeder): two keep its engine full across batch
# boundaries; more would only queue rows in the actor.
BATCHES_IN_FLIGHT = 2


class Gate:
    """The lock around an engine's steps and enqueues, and how many callers wait for it. Engines
    whose cores run in one process must share one: vLLM keeps the forward context (each attention
    layer's metadata, by layer name) in a module global, so two engines stepping at once in two
    threads of one process read each other's metadata and return wrong numbers."""

    def __init__(self):
        self.lock, self.count = threading.Lock(), threading.Lock()
        self.arriving = 0  # callers waiting for the lock; a thread that holds it yields to them
        self.shared = False  # more than one engine steps under it: steppers queue as callers do

    def waiting(self) -> bool:
        return self.arriving > 0

    @contextmanager
    def turn(self):
        with self.count:
            self.arriving += 1
        try:
            self.lock.acquire()
        finally:
            with self.count:
                self.arriving -= 1
        try:
            yield
        finally:
            self.lock.release()


class EngineBroken(RuntimeError):
    """The engine raised while stepping; it is unusable from then on. `during`: this call's
    requests were in the engine at that step (False: the engine was already broken when the call
    came); `stepping`: this call's thread ran the step that raised (one call per broken engine);
    `cause`: what the engine raised."""

    def __init__(self, cause: BaseException, during: bool, stepping: bool = False):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause, self.during, self.stepping = cause, during, stepping


class Feeder:
    """One vLLM engine fed by several batches at once. Ray Data hands an actor its next batch
    while the current one is still generating (`BATCHES_IN_FLIGHT` calls run in the actor's
    threads); each call enqueues its requests, and whichever call holds the lock steps the engine
    for everybody, so the engine's batch stays full across Ray Data's batch boundaries (one
    batch's stragglers share steps with the next batch's prompts) and one batch's Arrow
    conversion overlaps the next one's generation. Each step's time is split evenly over the
    calls with requests in it: `run` returns the engine seconds its batch was charged."""

    def __init__(self, llm, gate: Gate | None = None, lora=None):
        """`gate`: one shared with the feeders of other engines whose cores run in this process
        (see Gate); they then step one at a time. `lora`: the adapter request every call carries
        (an engine that serves a LoRA cousin)."""
        self.lora = lora
        self.gate = gate or Gate()
        if gate is not None:
            gate.shared = True
        self.llm, self.lock = llm, self.gate.lock
        self.finished: dict[str, Any] = {}  # request id -> its final output, until its call takes it
        self.owner: dict[str, object] = {}  # request id -> the call that enqueued it
        self.pending: dict[object, int] = {}  # call -> its requests not finished yet
        self.charged: dict[object, float] = {}  # call -> engine seconds so far
        self.most_calls = 0  # the most calls seen in the engine at once
        self.broken: BaseException | None = None  # what the engine raised while stepping, once it did
        self.broken_with = 0  # the calls in the engine when it broke
        self.recorded, self.records = threading.Condition(), 0  # how many of those have told the ledger
        self.solo: object | None = None  # the call that has the engine to itself (see run)

    def turn(self):
        """The engine lock for work between steps: enqueueing, and the actor's own tokenizing (the
        engine detokenizes inside step() with stop strings, and HF fast tokenizers are not safe to
        share across threads). A thread stepping the engine lets such a caller in before its next
        step; Python's lock is not fair, and the stepping thread would otherwise win it back."""
        return self.gate.turn()

    def run(self, prompts: list, params, solo: bool = False) -> tuple[list, float]:
        """(RequestOutputs in the order of `prompts`, engine seconds charged to this call).
        `solo`: wait until no other call is in the engine and keep it to this call (a batch that
        broke an engine before is retried alone, so a second break is its own). EngineBroken if
        the engine raises while stepping, for every call in it then and every call after."""
        if not prompts:
            return [], 0.0
        me = object()
        while True:
            with self.turn():  # vLLM aborts what it added if one prompt is refused, and raises
                if self.broken is not None:
                    raise EngineBroken(self.broken, during=False)
                if self.solo is None and not (solo and self.pending):
                    # outputs carry the LLM's own request ids; enqueue returns the engine's ("<id>-<8 random>")
                    ids = [i.rsplit("-", 1)[0] for i in self.llm.enqueue(prompts, params, use_tqdm=False,
                                                                         lora_request=self.lora)]
                    self.owner.update((i, me) for i in ids)
                    self.pending[me], self.charged[me] = len(ids), 0.0
                    self.most_calls = max(self.most_calls, len(self.pending))
                    if solo:
                        self.solo = me
                    break
            time.sleep(0.01)  # another call has the engine to itself, or this one waits for it to empty
        try:
            while True:
                # A shared gate: this call's steps queue behind the other engines' like a caller's.
                with (self.gate.turn() if self.gate.shared else self.lock):
                    if self.broken is not None:
                        raise EngineBroken(self.broken, during=True)
                    if not self.pending[me]:
                        return [self.finished.pop(i) for i in ids], self.charged[me]
                    engine = self.llm.llm_engine
                    if not engine.has_unfinished_requests():
                        raise RuntimeError("the engine dropped requests it had accepted")
                    active = [c for c, n in self.pending.items() if n]
                    t0 = time.perf_counter()
                    try:
                        outputs = engine.step()
                    except Exception as e:  # noqa: BLE001 - whatever it was, the engine is done for
                        self.broken, self.broken_with = e, len(self.pending)
                        raise EngineBroken(e, during=True, stepping=True) from e
                    share = (time.perf_counter() - t0) / len(active)
                    for c in active:
                        self.charged[c] += share
                    for out in outputs:
                        if out.finished and out.request_id in self.owner:
                            self.finished[out.request_id] = out
                            self.pending[self.owner.pop(out.request_id)] -= 1
                if self.gate.waiting():
                    time.sleep(0.0005)  # let the waiting caller take the lock
        finally:
            with self.lock:
                for d in (self.pending, self.charged):
                    d.pop(me, None)
                for i in ids:
                    self.finished.pop(i, None)
                    self.owner.pop(i, None)
                if self.solo is me:
                    self.solo = None
