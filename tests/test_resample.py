"""The bootstrap on the workers (cousins/drift/resample.py): Poisson(1) weights drawn from the
prompt id alone, resampled sums that add across partitions, Spearman's correlation from a sparse
histogram against scipy's on every prompt, and the homogenisation's prompts by smallest hash."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from cousins.drift.resample import (Sums, merge_counts, merge_smallest, poisson_weights, ratios, smallest, spearman,
                                    spearman_counts)


def test_poisson_weights_are_poisson_1_and_depend_on_the_id_and_the_resample_only():
    ids = [f"prompt-{i}" for i in range(3000)]
    w = poisson_weights(ids, 300, seed=11)
    assert w.shape == (300, 3000) and w.min() == 0 and np.all(w == np.round(w))
    assert w.mean() == pytest.approx(1.0, abs=0.01) and w.var() == pytest.approx(1.0, abs=0.02)
    for k in range(4):  # P(W = k) = e^-1 / k!
        assert (w == k).mean() == pytest.approx(math.exp(-1) / math.factorial(k), abs=0.005)
    # a prompt's weights: the same whoever draws them, in whatever order, for however many resamples
    assert np.array_equal(poisson_weights(ids[::-1][:10], 300, seed=11), w[:, ::-1][:, :10])
    assert np.array_equal(poisson_weights(ids[:5], 40, seed=11), w[:40, :5])
    assert not np.array_equal(poisson_weights(ids[:5], 40, seed=12), w[:40, :5])
    # resamples are independent of each other: no correlation between rows or between prompts
    assert abs(np.corrcoef(w[0], w[1])[0, 1]) < 0.06 and abs(np.corrcoef(w[:, 0], w[:, 1])[0, 1]) < 0.15


def test_resampled_sums_add_across_partitions_and_give_the_ratio_with_its_interval():
    rng = np.random.default_rng(0)
    ids = [f"p{i}" for i in range(500)]
    values = np.column_stack([rng.poisson(3, 500), rng.integers(1, 20, 500)]).astype(float)
    whole = Sums.of(("num", "den"), values, poisson_weights(ids, 400, seed=1))
    parts = [Sums.of(("num", "den"), values[s], poisson_weights([ids[i] for i in range(500)[s]], 400, seed=1))
             for s in (slice(0, 120), slice(120, 121), slice(121, 500))]
    merged = parts[0].add(parts[1]).add(parts[2])
    assert merged.prompts == 500 and np.allclose(merged.boot, whole.boot) and np.allclose(merged.total, whole.total)
    r = ratios({"x": (merged["num"], merged["den"]), "d": (merged["num"] - merged["num"], merged["den"])}, 0.95)["x"]
    assert r["value"] == pytest.approx(values[:, 0].sum() / values[:, 1].sum())
    lo, hi = r["ci"]
    # the multinomial bootstrap's interval over the same prompts: the same within Monte Carlo error
    g = np.random.default_rng(5).integers(0, 500, size=(2000, 500))
    mult = values[g, 0].sum(axis=1) / values[g, 1].sum(axis=1)
    mlo, mhi = np.quantile(mult, [0.025, 0.975])
    assert abs(lo - mlo) < 0.25 * (mhi - mlo) and abs(hi - mhi) < 0.25 * (mhi - mlo)
    empty = Sums.of(("num", "den"), np.zeros((0, 2)), poisson_weights([], 10, seed=1))  # a partition without prompts
    assert ratios({"x": (empty["num"], empty["den"])}, 0.95)["x"] == {"value": None, "ci": None}


@pytest.mark.parametrize("samples", [1, 3])
def test_spearman_from_merged_histograms_equals_scipy_on_every_prompt(samples):
    rng = np.random.default_rng(samples)
    n = 2000
    kl = np.exp(rng.normal(-4, 2, n)) * np.where(rng.random(n) < 0.05, 0.0, 1.0)  # some exact zeros: ties
    flips = rng.binomial(samples, np.clip(0.3 + kl, 0, 1)) / samples  # weak enough that p stays far above underflow
    counts = None
    for part in np.array_split(np.arange(n), 7):
        counts = merge_counts(counts, spearman_counts(kl[part], flips[part]))
    got, want = spearman(counts), spearmanr(kl, flips)
    assert got["prompts"] == n
    assert got["value"] == pytest.approx(want.statistic, abs=2e-4)
    assert got["p"] == pytest.approx(want.pvalue, rel=0.01) and 0 < got["p"] < 0.5
    assert spearman(spearman_counts(kl[:2], flips[:2]))["value"] is None  # fewer than 3 prompts
    assert spearman(spearman_counts(kl, np.zeros(n)))["value"] is None  # nothing flipped: no ranking
    assert spearman(None) == {"value": None, "ci": None, "prompts": 0}


def test_the_homogenisation_prompts_are_the_smallest_hashes_whatever_the_partitions():
    ids = [f"q{i:05d}" for i in range(10_000)]
    whole = smallest(ids, seed=3, k=500)
    merged = []
    for part in np.array_split(np.asarray(ids, dtype=object), 9):
        merged = merge_smallest(merged, smallest(part.tolist(), seed=3, k=500), k=500)
    assert merged == whole and len(whole) == 500
    assert smallest(ids[:40], seed=3, k=500) == sorted(smallest(ids[:40], seed=3, k=500))
    assert {i for _, i in smallest(ids[:40], seed=3)} == set(ids[:40])  # a small run: every prompt
    assert smallest(ids, seed=4, k=500) != whole
