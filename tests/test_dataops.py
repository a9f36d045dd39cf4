"""The joins' building blocks on a real local Ray: a small input takes the one-block path (no
shuffle, no aggregator actors), a large one Ray Data's shuffle, sort and hash partitioning, and
both give the same rows."""

from __future__ import annotations

import pyarrow as pa
import pytest

from cousins.run import dataops
from cousins.run.corpus import _repeated_ids


def _ds(n: int, blocks: int = 3):
    import ray.data

    ids = [f"p{i % (n // 2 or 1)}" for i in range(n)]  # every id twice
    t = pa.table({"prompt_id": ids, "source": ["b" if i % 3 else "a" for i in range(n)], "source_row": list(range(n))})
    return ray.data.from_arrow([t.slice(k * n // blocks, n // blocks) for k in range(blocks)])


def _blocks(ds) -> list[pa.Table]:
    return [b for b in ds.map_batches(lambda b: b, batch_size=None, batch_format="pyarrow").iter_batches(
        batch_size=None, batch_format="pyarrow")]


@pytest.mark.integration
@pytest.mark.parametrize("partitions", [1, 3])
def test_by_key_puts_every_row_of_a_key_in_one_block(ray_local, partitions):
    blocks = [b for b in _blocks(dataops.by_key(_ds(60), "prompt_id", partitions)) if b.num_rows]
    assert sum(b.num_rows for b in blocks) == 60 and len(blocks) <= partitions
    owner: dict = {}
    for k, b in enumerate(blocks):
        for pid in b.column("prompt_id").to_pylist():
            assert owner.setdefault(pid, k) == k
    assert len(blocks) == 1 if partitions == 1 else len(blocks) > 1


@pytest.mark.integration
def test_partitions_are_one_for_a_small_input_and_at_least_a_cpu_each_above_it(ray_local):
    assert dataops.partitions_for(dataops.SMALL_ROWS, 10) == 1
    assert dataops.partitions_for(dataops.SMALL_ROWS + 1, 10**9) == 2  # the local Ray's CPUs
    assert dataops.partitions_for(100_000, 10_000) == 10


@pytest.mark.integration
@pytest.mark.parametrize("small", [True, False])
def test_shuffled_is_a_permutation_drawn_from_the_seed(ray_local, monkeypatch, small):
    if not small:
        monkeypatch.setattr(dataops, "SMALL_ROWS", 0)
    order = lambda seed: [r["source_row"] for r in dataops.shuffled(_ds(60), 60, seed).take_all()]  # noqa: E731
    a, b, c = order(7), order(7), order(8)
    assert sorted(a) == list(range(60)) and a == b and a != c and a != list(range(60))


@pytest.mark.integration
def test_first_by_equals_ray_datas_sort_and_limit(ray_local, monkeypatch):
    small = dataops.first_by(_ds(60), 60, ["source", "source_row"], 25).take_all()
    monkeypatch.setattr(dataops, "SMALL_ROWS", 0)
    large = dataops.first_by(_ds(60), 60, ["source", "source_row"], 25).take_all()
    assert small == large and len(small) == 25 and [r["source"] for r in small] == ["a"] * 20 + ["b"] * 5


def test_repeated_ids_are_the_ids_held_twice():
    t = pa.table({"prompt_id": ["a", "b", "a", "c", "b", "a"]})
    assert sorted(_repeated_ids(t).column("prompt_id").to_pylist()) == ["a", "b"]
    assert _repeated_ids(t.slice(0, 0)).num_rows == 0
