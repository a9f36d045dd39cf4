"""Models' passes side by side where the cluster has room.

After the original's pass, the other models' passes (cousins, the noise floor) are independent: each
generates and scores the original's outputs on its own engines. `side_by_side` runs them in driver
threads, each its own Ray Data execution and placement, admitting a pass when what it holds (its
pool's CPUs and GPUs, `need`) fits in what the cluster has free, largest first, up to
`engine.max_parallel_models` at once. One CPU stays free for Ray Data's read, shuffle and write
tasks (the silent-hang rule). A pass that could never fit beside another runs alone; a pass that
cannot be admitted waits for one in flight to finish, so nothing waits forever on a placement. A pass
that raises does not stop the others: they finish and commit their stages, then the first error is
raised (a cousin that fails to load is not an error here: its rows are error rows).
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

from cousins.engine.backend import Placement
from cousins.engine.placement import gpus_per_engine

READ_WRITE_CPUS = 1.0  # kept free beside the engines for Ray Data's own tasks


@dataclass(frozen=True)
class Need:
    cpus: float
    gpus: float

    def fits(self, free: "Need") -> bool:
        return self.cpus <= free.cpus + 1e-9 and self.gpus <= free.gpus + 1e-9

    def __add__(self, other: "Need") -> "Need":
        return Need(self.cpus + other.cpus, self.gpus + other.gpus)

    def __sub__(self, other: "Need") -> "Need":
        return Need(self.cpus - other.cpus, self.gpus - other.gpus)


def need(where: Placement) -> Need:
    """What a pass's engine pool holds while it runs."""
    return Need(cpus=where.num_actors * where.cpus_per_actor,
                gpus=where.num_actors * where.gpus_per_actor * gpus_per_engine(where))


def capacity() -> Need:
    """What the connected cluster holds for engines: its CPUs less READ_WRITE_CPUS, its GPUs."""
    import ray

    total = ray.cluster_resources()
    return Need(cpus=max(0.0, total.get("CPU", 0.0) - READ_WRITE_CPUS), gpus=total.get("GPU", 0.0))


@dataclass
class Pass:
    name: str
    need: Need
    run: Callable[[], object]


def slots(each: Need, room: Need, passes: int, max_parallel: int | None = None) -> int:
    """How many passes of `each` run at once in `room` (at least one: a pass runs alone), at most
    `passes` and `max_parallel`."""
    fit = min([int(r // e + 1e-9) for r, e in ((room.cpus, each.cpus), (room.gpus, each.gpus)) if e > 0] or [passes])
    return max(1, min(fit, passes, max_parallel or passes))


def any_two_fit(passes: list[Pass], room: Need, max_parallel: int | None = None) -> bool:
    """Whether two of `passes` could ever run at once."""
    if len(passes) < 2 or max_parallel == 1:
        return False
    small = sorted(passes, key=lambda p: (p.need.gpus, p.need.cpus))[:2]
    return (small[0].need + small[1].need).fits(room)


def side_by_side(passes: list[Pass], room: Need, *, max_parallel: int | None = None,
                 on_start: Callable[[list[str]], None] | None = None) -> dict[str, object]:
    """Run `passes` (each `run()` in a thread) as many at once as `room` holds (see the module
    docstring); returns each pass's result by name. `on_start(names in flight)` is called as each
    one starts."""
    limit = max(1, max_parallel or len(passes) or 1)
    todo = sorted(passes, key=lambda p: (-p.need.gpus, -p.need.cpus))  # largest first (stable: config order)
    results: dict[str, object] = {}
    errors: list[BaseException] = []
    in_flight: dict[Future, Pass] = {}
    used = Need(0.0, 0.0)
    with ThreadPoolExecutor(max_workers=limit, thread_name_prefix="cousins-pass") as pool:
        while todo or in_flight:
            started = True
            while started and todo and len(in_flight) < limit:
                started = False
                for p in todo:
                    alone = not in_flight  # a pass larger than the room runs alone (it was checked to fit the cluster)
                    if alone or p.need.fits(room - used):
                        todo.remove(p)
                        used = used + p.need
                        in_flight[pool.submit(p.run)] = p
                        if on_start is not None:
                            on_start([q.name for q in in_flight.values()])
                        started = True
                        break
            done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            for f in done:
                p = in_flight.pop(f)
                used = used - p.need
                try:
                    results[p.name] = f.result()
                except BaseException as e:  # noqa: BLE001 - the others finish first; then it is raised
                    errors.append(e)
    if errors:
        raise errors[0]
    return results
