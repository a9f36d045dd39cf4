"""A small Ray actor that counts what the engine stage did, retries included.

Engine actors report each start and each batch they begin. A batch begun twice was retried (its
actor died, or its task failed and Ray ran it again); an engine started more often than the pool
has actors was restarted. The run's summary and manifest say so.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import pyarrow as pa

from cousins.schema import row_keys


def batch_key(batch: pa.Table) -> str:
    """The identity of a batch: the hash of its (prompt_id, sample_index) keys."""
    h = hashlib.sha256()
    for key in row_keys(batch):
        h.update(f"{key}\n".encode())
    return h.hexdigest()[:24]


class Ledger:
    def __init__(self):
        self.starts: Counter = Counter()
        self.batches: Counter = Counter()
        self.rows: dict[str, int] = {}

    def engine_started(self, model: str) -> None:
        self.starts[model] += 1

    def batch_started(self, model: str, key: str, rows: int) -> None:
        self.batches[(model, key)] += 1
        self.rows[(model, key)] = rows

    def report(self, model: str) -> dict:
        retried = [k for k, n in self.batches.items() if k[0] == model and n > 1]
        return {
            "engine_starts": self.starts[model],
            "batches": sum(1 for k in self.batches if k[0] == model),
            "batches_retried": len(retried),
            "rows_retried": sum(self.rows[k] for k in retried),
        }


def new_ledger():
    import ray

    return ray.remote(num_cpus=0)(Ledger).remote()
