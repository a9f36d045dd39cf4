"""Engine hosts: engine actor processes kept across a run's passes, so that vLLM's import and the
actor's start are paid once per process, not once per model.

Ray Data makes an actor pool per execution, and a drift run is several (the original's pass, each
cousin's, the noise floor's, exact-KLD pairs). Inside `hosted()` (a run's engine passes), a pass's
pool is made of light forwarding actors (`HostedEngine`, no resources of their own); each claims
an `EngineHost`, a Ray actor that holds the engine's CPUs and GPUs, builds the mode's actor
(cousins/engine/pool.py MODES) inside it and runs its batches. When the pass ends its engines are
shut down and the hosts go back to the run's `HostPool`; the next pass of the same resource shape
builds its own engines in the same processes. Hosts for the passes that will run side by side may
be started ahead (`HostPool.prestart`: they import vLLM while the original's pass runs). Idle
hosts of another shape are ended before a pass starts new ones, and a pass's hosts are ended
instead of kept while another pass's host still waits for room, so hosts never hold what the
scheduler (cousins/orchestrate/schedule.py) counts as free for long.

Faults keep their meaning. An engine that breaks ends its host's process (EngineRunner); Ray starts
it again, empty, and the forwarding actor, finding its host gone or empty (`HostReset`), ends its
own process too: Ray Data restarts it, it claims its own host again (by its actor id, which a
restart keeps; a host Ray is still restarting is waited for), builds a fresh engine there and gets
the batches again. Engines of several GPUs (their own placement groups) are not hosted: their
passes start their engines as before.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from contextlib import contextmanager

from cousins.engine.backend import CORE_ENV
from cousins.engine.feeder import BATCHES_IN_FLIGHT

HOST_CONCURRENCY = BATCHES_IN_FLIGHT + 2  # the batches in flight, a load and a ping
UNLOAD_TIMEOUT_S = 120  # at a pass's end, for a batch still in a host (a host that overruns it is ended)
UNAVAILABLE_RETRIES = 3  # calls retried on a host that was briefly unreachable and is still the same process


class HostReset(RuntimeError):
    """The host holds no engine for this pool actor: it restarted (a fresh process) since the load."""


def _died(e: BaseException) -> bool:
    """The host's process is gone (Ray may be starting it again, empty)."""
    import ray

    return isinstance(e, ray.exceptions.RayActorError) and not _unavailable(e)


def _unavailable(e: BaseException) -> bool:
    import ray

    return isinstance(e, ray.exceptions.ActorUnavailableError)


class EngineHost:
    """One engine actor process kept across passes (a threaded Ray actor: calls run side by side,
    as Ray Data's own engine actors' do). It holds one mode's actor at a time."""

    def __init__(self):
        self.impl = None
        self.owner = None  # the pool actor this host serves in the current pass
        self.in_use = 0
        self.idle = threading.Condition()
        self.loading = threading.Lock()  # one load or unload at a time

    def prepare(self, backend=None) -> None:
        """vLLM imported before any model is asked for (a host started ahead of its pass does this
        while the pass before it runs). Only the import: each load sets its own engine's environment."""
        from cousins.engine.backend import VllmBackend

        if backend is None or isinstance(backend, VllmBackend):
            import vllm  # noqa: F401 - the import is the point (seconds of Python)

    def claim(self, owner: str, own_only: bool = False) -> bool:
        """Serve pool actor `owner` this pass: True if it is already its own (a restarted pool actor
        keeps its id) or, unless `own_only`, free (a restarted host is free)."""
        with self.idle:
            if self.owner == owner or (self.owner is None and not own_only):
                self.owner = owner
                return True
            return False

    def load(self, actor: type, kwargs: dict) -> int:
        """Build `actor(**kwargs)` here, ending the engine held before (after the batches still in
        it); returns this process's id."""
        with self.loading:
            self._unload(keep_owner=True, timeout=None)
            impl = actor(**kwargs)
            with self.idle:
                self.impl = impl
        return os.getpid()

    def call(self, batch):
        with self.idle:
            impl = self.impl
            if impl is None:
                raise HostReset(f"engine host {os.getpid()} holds no engine (it restarted, or its pass ended)")
            self.in_use += 1
        try:
            return impl(batch)
        finally:
            with self.idle:
                self.in_use -= 1
                self.idle.notify_all()

    def unload(self) -> bool:
        """End the engine(s) held (after any batch still in them, for up to UNLOAD_TIMEOUT_S) and
        free the host for the next pass. Returns whether the host is fit to keep: not when an engine
        ran its core in this process on a GPU (its CUDA context and allocator stay here)."""
        with self.loading:
            self._unload(keep_owner=False, timeout=UNLOAD_TIMEOUT_S)
        torch = sys.modules.get("torch")
        cuda = torch is not None and torch.cuda.is_initialized()
        return not (cuda and os.environ.get(CORE_ENV) == "0")

    def _unload(self, *, keep_owner: bool, timeout: float | None) -> None:
        """vLLM's engine core shut down and collected, so the next model's engine gets the memory."""
        with self.idle:
            if not self.idle.wait_for(lambda: self.in_use == 0, timeout=timeout):
                raise TimeoutError(f"engine host {os.getpid()}: batches still running after {timeout} s")
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
        if torch is not None and torch.cuda.is_initialized():
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
    forwards each batch to it. A host that died (or restarted since the load) ends this process
    too, so Ray Data restarts it and sends its batches again (see the module docstring)."""

    def __init__(self, *, hosts: list, actor: type, kwargs: dict):
        import ray

        me = ray.get_runtime_context().get_actor_id()
        wait = {"max_task_retries": -1}  # a host Ray is restarting is waited for, not given up on
        # its own host first (a restarted pool actor), else the first free one
        self.host = next((h for own in (True, False) for h in hosts
                          if ray.get(h.claim.options(**wait).remote(me, own_only=own))), None)
        if self.host is None:
            raise RuntimeError(f"no engine host free for pool actor {me}: the pass has {len(hosts)}")
        ray.get(self.host.load.options(**wait).remote(actor, kwargs))

    def __call__(self, batch):
        import ray

        from cousins.engine.runner import exit_process

        for _ in range(UNAVAILABLE_RETRIES):
            try:
                return ray.get(self.host.call.remote(batch))
            except Exception as e:
                if _died(e) or isinstance(e, HostReset):
                    exit_process(f"its engine host died or restarted: {type(e).__name__}")
                if not _unavailable(e):
                    raise
                # unreachable for a moment: the same process still holding the engine is asked again;
                # a restarted one holds none (HostReset)
                time.sleep(1.0)
        exit_process(f"its engine host stayed unreachable for {UNAVAILABLE_RETRIES} calls")


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
        self.starting: list = []  # each new host's first call: done once Ray has placed and started it

    def _new(self, where):
        from cousins.engine.backend import ENGINE_ENV
        from cousins.run.runtime import engine_env

        host = _remote(EngineHost).options(
            num_cpus=where.cpus_per_actor, num_gpus=where.gpus_per_actor, max_restarts=-1, max_task_retries=0,
            max_concurrency=HOST_CONCURRENCY, runtime_env={"env_vars": engine_env(ENGINE_ENV)}).remote()
        with self.lock:
            self.starting.append(host.pid.remote())
        return host

    def _someone_waits(self) -> bool:
        """Whether a host made for a pass is still waiting for room (a host kept idle would hold it)."""
        import ray

        with self.lock:
            refs = list(self.starting)
        if not refs:
            return False
        _, waiting = ray.wait(refs, num_returns=len(refs), timeout=0)
        with self.lock:
            self.starting = [r for r in self.starting if any(r == w for w in waiting)]
        return bool(waiting)

    def prestart(self, where, count: int, backend=None) -> int:
        """Start up to `count` hosts of `where`'s shape ahead of their passes (the idle ones there
        are count too), each importing vLLM at once (`EngineHost.prepare`), so the passes that
        follow find it done: what the cluster's free room can do while an earlier pass runs.
        Returns how many were started."""
        want = shape(where)
        with self.lock:
            new = max(0, count - sum(1 for s, _ in self.idle if s == want))
        started = [self._new(where) for _ in range(new)]
        for h in started:
            h.prepare.remote(backend)
        with self.lock:
            self.idle += [(want, h) for h in started]
        return new

    @contextmanager
    def lease(self, where):
        """`where.num_actors` hosts of `where`'s shape for one pass: idle ones first, new ones for
        the rest; back to the pool, their engines ended, when the pass is over (ended instead when
        the pass failed, when a host cannot end its engine, or when another pass's host still
        waits for room). Idle hosts of another shape are ended first: they hold resources this
        pass may need."""
        import ray

        want = shape(where)
        with self.lock:
            mine = [h for s, h in self.idle if s == want][:where.num_actors]
            ending = [h for s, h in self.idle if s != want]
            self.idle = [(s, h) for s, h in self.idle if s == want and all(h is not m for m in mine)]
        for h in ending:
            ray.kill(h)
        hosts = list(mine)
        try:
            hosts += [self._new(where) for _ in range(where.num_actors - len(mine))]
            yield hosts
        except BaseException:
            for h in hosts:  # a pass that failed may have left batches in them: not kept
                ray.kill(h)
            raise
        fit = [h.unload.remote() for h in hosts]  # every host's engine ended at once
        kept = []
        for h, ref in zip(hosts, fit):
            try:
                if ray.get(ref, timeout=UNLOAD_TIMEOUT_S + 30):
                    kept.append(h)
                    continue
            except Exception:  # noqa: BLE001 - a host that cannot end its engine is ended itself
                pass
            ray.kill(h)
        if kept and self._someone_waits():
            for h in kept:
                ray.kill(h)
            kept = []
        with self.lock:
            self.idle += [(want, h) for h in kept]

    def end_idle(self) -> None:
        """End every idle host (a pass that is not hosted, e.g. engines of several GPUs in placement
        groups of their own, may need what they hold); also what ends the pool."""
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
        pool.end_idle()


def active_pool() -> HostPool | None:
    return _ACTIVE[-1] if _ACTIVE else None
