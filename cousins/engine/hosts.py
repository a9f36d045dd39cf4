"""Engine hosts: engine actor processes kept across a run's passes, so that vLLM's import and the
actor's start are paid once per process, not once per model.

Ray Data makes an actor pool per execution, and a drift run is several (the original's pass, each
cousin's, the noise floor's, exact-KLD pairs). Inside `hosted()` (a run's engine passes), a pass's
pool is made of light forwarding actors (`HostedEngine`, no resources of their own); each binds to
an `EngineHost`, a Ray actor that holds the engine's CPUs and GPUs, builds the mode's actor
(cousins/engine/pool.py MODES) inside it and runs its batches. When the pass ends its engines are
shut down and the hosts go back to the run's `HostPool`; the next pass of the same resource shape
builds its own engines in the same processes. A pass of another shape gets hosts of its own, and
idle hosts that no pass took are ended before new ones start, so what hosts hold is what the passes
in flight hold (the scheduler's room, cousins/orchestrate/schedule.py, stays true).

Faults keep their meaning. An engine that breaks ends its host's process (EngineRunner); Ray starts
it again, empty, and the forwarding actor, finding its host gone, ends its own process too: Ray Data
restarts it, it binds to the same host (by its actor id, which a restart keeps), builds a fresh
engine there and gets the batches again. Engines of several GPUs (their own placement groups) are
not hosted: their passes start their engines as before.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
from contextlib import contextmanager

from cousins.engine.feeder import BATCHES_IN_FLIGHT

HOST_CONCURRENCY = BATCHES_IN_FLIGHT + 2  # the batches in flight, a load and a ping
UNLOAD_TIMEOUT_S = 120


def _dead(e: BaseException) -> bool:
    import ray

    return isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError))


class EngineHost:
    """One engine actor process kept across passes (a threaded Ray actor: calls run side by side,
    as Ray Data's own engine actors' do). It holds one mode's actor at a time."""

    def __init__(self):
        self.impl = None
        self.owner = None  # the pool actor this host serves in the current pass
        self.in_use = 0
        self.idle = threading.Condition()

    def prepare(self, spec, backend=None) -> None:
        """vLLM imported (and the engine's environment set) before any model is asked for: a host
        started ahead of its pass does this while the pass before it runs."""
        from cousins.engine.backend import backend_for

        prepare = getattr(backend_for(spec, backend), "prepare", None)
        if prepare is not None:
            prepare(spec)

    def claim(self, owner: str) -> bool:
        """Serve pool actor `owner` this pass: True if free or already its own (a restarted actor
        keeps its id; a restarted host is free)."""
        with self.idle:
            if self.owner in (None, owner):
                self.owner = owner
                return True
            return False

    def load(self, actor: type, kwargs: dict) -> int:
        """Build `actor(**kwargs)` here, ending the engine held before; returns this process's id."""
        self.unload(keep_owner=True)
        self.impl = actor(**kwargs)
        return os.getpid()

    def call(self, batch):
        impl = self.impl
        if impl is None:
            raise RuntimeError("this engine host holds no engine (its pass ended)")
        with self.idle:
            self.in_use += 1
        try:
            return impl(batch)
        finally:
            with self.idle:
                self.in_use -= 1
                self.idle.notify_all()

    def unload(self, keep_owner: bool = False) -> None:
        """End the engine(s) held (after any batch still in them): vLLM's engine core is shut down and
        collected, so the next model's engine gets the memory. The host is free for the next pass
        unless `keep_owner`."""
        with self.idle:
            self.idle.wait_for(lambda: self.in_use == 0, timeout=UNLOAD_TIMEOUT_S)
            impl, self.impl = self.impl, None
            if not keep_owner:
                self.owner = None
        if impl is None:
            return
        for llm in engines_of(impl):
            shutdown_engine(llm)
        del impl
        gc.collect()
        torch = sys.modules.get("torch")  # an engine core in this process on a GPU: its cached blocks
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # go back, so the next engine's memory check sees them free

    def pid(self) -> int:
        return os.getpid()


def engines_of(impl) -> list:
    """The engines a mode's actor holds (each once)."""
    found = []
    for part in (impl, getattr(impl, "gen", None)):  # a BothActor's engine is its generation part's
        for name in ("llm", "reference"):
            llm = getattr(part, name, None) if part is not None else None
            if llm is not None and all(llm is not f for f in found):
                found.append(llm)
    return found


def shutdown_engine(llm) -> None:
    """Shut vLLM's engine core down (its own process, or its executor in this one); other engines
    (a served model's client, the tests' fakes) have nothing to end."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


class HostedEngine:
    """Ray Data's pool actor for a hosted pass: claims a host, builds the mode's actor there and
    forwards each batch to it. A host that dies ends this process too (see the module docstring)."""

    def __init__(self, *, hosts: list, actor: type, kwargs: dict):
        import ray

        from cousins.engine.runner import exit_process

        me = ray.get_runtime_context().get_actor_id()
        try:
            self.host = next((h for h in hosts if ray.get(h.claim.remote(me))), None)
        except Exception as e:
            if _dead(e):  # a host restarting: this actor restarts and claims again
                exit_process(f"its engine host died before it was claimed: {e}")
            raise
        if self.host is None:
            raise RuntimeError(f"no engine host free for pool actor {me}: the pass has {len(hosts)}")
        try:
            ray.get(self.host.load.remote(actor, kwargs))
        except Exception as e:
            if _dead(e):
                exit_process(f"its engine host died while loading: {e}")
            raise

    def __call__(self, batch):
        import ray

        from cousins.engine.runner import exit_process

        try:
            return ray.get(self.host.call.remote(batch))
        except Exception as e:
            if _dead(e):
                exit_process(f"its engine host died: {type(e).__name__}")
            raise


_REMOTE: dict[type, object] = {}


def _remote(cls: type):
    """`cls` as a Ray actor class (made once per process)."""
    import ray

    if cls not in _REMOTE:
        _REMOTE[cls] = ray.remote(cls)
    return _REMOTE[cls]


def shape(where) -> tuple:
    """What a host holds: a pass's hosts are reused by a later pass of the same shape only."""
    return (float(where.cpus_per_actor), float(where.gpus_per_actor))


class HostPool:
    """A run's engine hosts between passes (driver side; passes in threads lease them)."""

    def __init__(self):
        self.idle: list[tuple[tuple, object]] = []
        self.lock = threading.Lock()

    def _new(self, where):
        from cousins.engine.backend import ENGINE_ENV
        from cousins.run.runtime import engine_env

        return _remote(EngineHost).options(
            num_cpus=where.cpus_per_actor, num_gpus=where.gpus_per_actor, max_restarts=-1, max_task_retries=0,
            max_concurrency=HOST_CONCURRENCY, runtime_env={"env_vars": engine_env(ENGINE_ENV)}).remote()

    def prestart(self, where, count: int, spec, backend=None) -> int:
        """Start up to `count` hosts of `where`'s shape ahead of their passes (the idle ones there
        are count too), each importing vLLM at once (`EngineHost.prepare`), so the passes that
        follow find it done: what the cluster's free room can do while an earlier pass runs.
        Returns how many were started."""
        want = shape(where)
        with self.lock:
            new = max(0, count - sum(1 for s, _ in self.idle if s == want))
            started = [self._new(where) for _ in range(new)]
            for h in started:
                h.prepare.remote(spec, backend)
            self.idle += [(want, h) for h in started]
        return new

    @contextmanager
    def lease(self, where):
        """`where.num_actors` hosts of `where`'s shape for one pass: idle ones first, new ones for
        the rest; back to the pool, their engines ended, when the pass is over. Idle hosts of
        another shape are ended first: they hold resources this pass may need."""
        import ray

        want = shape(where)
        with self.lock:
            mine = [h for s, h in self.idle if s == want][:where.num_actors]
            ending = [h for s, h in self.idle if s != want]
            self.idle = [(s, h) for s, h in self.idle if s == want and all(h is not m for m in mine)]
        for h in ending:
            ray.kill(h)
        hosts = mine + [self._new(where) for _ in range(where.num_actors - len(mine))]
        try:
            yield hosts
        except BaseException:
            for h in hosts:  # a pass that failed may have left batches in them: not kept
                ray.kill(h)
            raise
        else:
            kept = []
            for h in hosts:
                try:
                    ray.get(h.unload.remote(), timeout=UNLOAD_TIMEOUT_S)
                    kept.append(h)
                except Exception:  # noqa: BLE001 - a host that cannot end its engine is ended itself
                    ray.kill(h)
            with self.lock:
                self.idle += [(want, h) for h in kept]

    def close(self) -> None:
        import ray

        with self.lock:
            idle, self.idle = self.idle, []
        for _, h in idle:
            ray.kill(h)


_ACTIVE: list[HostPool] = []


@contextmanager
def hosted(enabled: bool = True):
    """Engine passes inside share engine hosts (HostPool); they are ended on exit. Nested: the
    outer pool. Not `enabled` (engine.keep_processes=false): every pass starts its own actors."""
    if not enabled:
        yield None
        return
    if _ACTIVE:
        yield _ACTIVE[-1]
        return
    pool = HostPool()
    _ACTIVE.append(pool)
    try:
        yield pool
    finally:
        _ACTIVE.remove(pool)
        pool.close()


def active_pool() -> HostPool | None:
    return _ACTIVE[-1] if _ACTIVE else None
