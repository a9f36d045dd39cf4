"""A small Ray actor that counts what the engine stage did, retries included.

Engine actors report each start and each batch they begin. A batch begun twice was retried (its
actor died, or its task failed and Ray ran it again); an engine started more often than the pool
has actors was restarted. The run's summary and manifest say so. Each batch's end comes with its
tokens, so the ledger also knows each actor's working window (first batch begun to last done):
the steady-state rate the benchmark reports, start-up excluded. With each engine's load (from the
call that loads it to ready) and the ledger's own creation (just before the stage's pool starts),
the report splits a stage's wall time into the lead-in before its first batch, each engine's load,
and the working window.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter

import pyarrow as pa

from cousins.contract.schema import row_keys


# What a model's engine batches do, as the ledger counts them apart: its own generation, its scoring
# of the original's outputs, its exact KLD against the original.
GENERATE, SCORE, KLD = "generate", "score", "kld"


def ledger_key(model: str, task: str = GENERATE) -> str:
    """The ledger's name for one model's batches of one task: the model's own name for its
    generation, `score:NAME` for its scoring, `kld:NAME` for its exact KLD."""
    if task == GENERATE:
        return model
    if task not in (SCORE, KLD):
        raise ValueError(f"unknown engine task {task!r}")
    return f"{task}:{model}"


def batch_key(batch: pa.Table) -> str:
    """The identity of a batch: the hash of its (prompt_id, sample_index) keys."""
    h = hashlib.sha256()
    for key in row_keys(batch):
        h.update(f"{key}\n".encode())
    return h.hexdigest()[:24]


class Ledger:
    def __init__(self):
        self.created = time.time()  # the stage's pool is about to start
        self.load_parts: dict[str, list[dict]] = {}  # model -> each engine's load, by part (s)
        self.starts: Counter = Counter()
        self.loads: dict[str, list[tuple[float, float]]] = {}  # model -> (load began, ready) per engine
        self.batches: Counter = Counter()
        self.rows: dict[str, int] = {}
        self.peak_rss: Counter = Counter()  # model -> the largest engine process RSS seen (bytes)
        self.first_start: dict[str, float] = {}  # model -> when its first batch began (epoch s)
        self.last_end: dict[str, float] = {}  # model -> when its last batch ended
        self.actor_start: dict[tuple, float] = {}  # (model, actor) -> when its first batch began
        self.actor_end: dict[tuple, float] = {}  # (model, actor) -> when its last batch ended
        self.actor_tokens: Counter = Counter()  # (model, actor) -> tokens its batches produced
        self.finished: dict[tuple, tuple[int, int, int]] = {}  # (model, batch key) -> (rows, errors, tokens)
        self.progressed: dict[str, list[int]] = {}  # model -> [rows, error rows, tokens] of finished batches
        self.broke: Counter = Counter()  # (model, batch key) -> engines that broke with it in them
        self.engines_broken: Counter = Counter()  # model -> engines that raised while stepping
        self.break_reasons: dict[str, str] = {}  # model -> the last reason an engine broke

    def engine_started(self, model: str, began: float | None = None, ready: float | None = None,
                       parts: dict | None = None) -> None:
        """An engine is loaded; `began`/`ready`: when its load was called and returned (epoch s);
        `parts`: what each part of the load took (the backend's `load_parts`)."""
        self.starts[model] += 1
        if began is not None and ready is not None:
            self.loads.setdefault(model, []).append((began, ready))
        if parts:
            self.load_parts.setdefault(model, []).append(dict(parts))

    def batch_started(self, model: str, key: str, rows: int, actor: str | None = None) -> None:
        now = time.time()
        self.first_start.setdefault(model, now)
        self.actor_start.setdefault((model, actor), now)
        self.batches[(model, key)] += 1
        self.rows[(model, key)] = rows

    def batch_done(self, model: str, peak_rss_bytes: int, actor: str | None = None, tokens: int = 0) -> None:
        """An engine finished a batch (an engine that failed to load does not: `rows_done` only)."""
        self.peak_rss[model] = max(self.peak_rss[model], peak_rss_bytes)
        self.last_end[model] = self.actor_end[(model, actor)] = time.time()
        self.actor_tokens[(model, actor)] += tokens

    def rows_done(self, model: str, key: str, rows: int, errors: int, tokens: int) -> None:
        """A batch's rows are done (engine or error rows): the stage's progress."""
        total = self.progressed.setdefault(model, [0, 0, 0])
        before = self.finished.get((model, key), (0, 0, 0))  # a retried batch counts once
        self.finished[(model, key)] = (rows, errors, tokens)
        for i, (new, old) in enumerate(zip((rows, errors, tokens), before)):
            total[i] += new - old

    def engine_broke(self, model: str, key: str, reason: str, stepping: bool = False) -> int:
        """An engine raised while stepping with this batch in it (`stepping`: told by the call that
        ran the step, once per engine); how many have with this batch so far."""
        self.broke[(model, key)] += 1
        self.engines_broken[model] += stepping
        self.break_reasons[model] = reason
        return self.broke[(model, key)]

    def batch_breaks(self, model: str, key: str) -> int:
        """How many engines broke with this batch in them (engine_broke counts them)."""
        return self.broke[(model, key)]

    def progress(self, model: str) -> tuple[int, int, int]:
        """(rows, error rows, output tokens) of the model's batches finished so far."""
        rows, errors, tokens = self.progressed.get(model, (0, 0, 0))
        return rows, errors, tokens

    def report(self, model: str) -> dict:
        retried = [k for k, n in self.batches.items() if k[0] == model and n > 1]
        actors = {a: {"window_s": end - self.actor_start[(m, a)], "tokens": self.actor_tokens[(m, a)]}
                  for (m, a), end in self.actor_end.items() if m == model}
        return {
            "engine_starts": self.starts[model],
            "batches": sum(1 for k in self.batches if k[0] == model),
            "batches_retried": len(retried),
            "rows_retried": sum(self.rows[k] for k in retried),
            # engines that raised while stepping (each replaced by a fresh one), and the batches
            # that broke two and became error rows
            "engine_breaks": self.engines_broken[model],
            "batches_failed_by_engine": sum(1 for k, n in self.broke.items() if k[0] == model and n >= 2),
            "engine_break_reason": self.break_reasons.get(model),
            "peak_rss_mib": round(self.peak_rss[model] / (1 << 20), 1),  # per engine actor process
            # first batch begun to last batch done: the engines' working window, start-up excluded
            "busy_window_s": (self.last_end[model] - self.first_start[model]) if model in self.last_end else None,
            # each engine actor's own window and tokens; the pool's steady-state rate is the sum of
            # the actors' rates (an actor that started late does not count as idle time of the others)
            "actors": actors,
            "steady_tokens_per_s": (sum(a["tokens"] / a["window_s"] for a in actors.values())
                                    if actors and all(a["window_s"] > 0 for a in actors.values()) else None),
            **self.timeline(model),
        }

    def timeline(self, model: str) -> dict:
        """Where the stage's time before and around the working window went, in seconds from the
        ledger's creation (the pool about to start): each engine's load began and ready (the lead
        before a load is Ray's scheduling and the actor's process start), the first batch begun and
        the last done. A few numbers per engine."""
        t0 = self.created
        loads = sorted(self.loads.get(model, []), key=lambda x: x[1])
        out = {"engine_load_s": [round(r - b, 2) for b, r in loads],
               "engine_ready_at_s": [round(r - t0, 2) for _, r in loads],
               "engine_load_began_at_s": [round(b - t0, 2) for b, _ in loads]}
        parts = self.load_parts.get(model) or []
        if loads:  # start-up by part, the mean over the stage's engines: the actor's start (Ray
            # Data's pool and Ray's scheduling, the process) up to its load, then the load's parts
            out["startup_s"] = {"actor_start_s": round(sum(b - t0 for b, _ in loads) / len(loads), 2),
                                **{k: round(sum(p.get(k, 0.0) for p in parts) / len(parts), 2)
                                   for k in (parts[0] if parts else {})}}
        if model in self.first_start:
            out["first_batch_at_s"] = round(self.first_start[model] - t0, 2)
        if model in self.last_end:
            out["last_batch_done_at_s"] = round(self.last_end[model] - t0, 2)
        return out


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def new_ledger():
    import ray

    return ray.remote(num_cpus=0)(Ledger).remote()
