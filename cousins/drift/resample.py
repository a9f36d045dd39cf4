"""The bootstrap where the rows are: a Poisson bootstrap over prompts whose resample weights each
worker derives from the prompt id alone, so a worker turns its prompts' sums into one total and
one resampled total per resample, and the driver adds them up: B x figures numbers a cousin,
whatever the run's size. No prompt's sums reach the driver.

- Weights: prompt p's weight in resample b is a Poisson(1) draw made from a 64-bit hash of
  (seed, p) and b (a counter-based generator: splitmix64's finaliser, then Poisson(1)'s inverse
  CDF), so the same prompt gets the same weight in every worker, every cousin and every figure.
  Poisson(1) weights are the bootstrap of a sample whose size is itself resampled; for the ratio
  figures of the summary (Σ w·num / Σ w·den) their percentile CIs agree with the multinomial
  bootstrap's within its Monte Carlo error (docs/metrics.md shows it on the demo).
- Sums: per figure column, Σ over prompts (`total`) and Σ w_b·x over prompts for each resample
  (`boot`, B x columns). A ratio figure's value is total_num / total_den, its CI the percentiles
  of boot_num / boot_den. Differences (accuracy_delta) are linear, so they resample as well.
- Slices by category: the same sums of a few columns per category, over the first
  CATEGORY_RESAMPLES resamples.
- The rank correlation of a prompt's mean option KL and its flip rate (Spearman's): a sparse
  2-D histogram of (KL on a log grid in 0.1% steps, flip rate) counts; ranks are the histogram's
  midranks, so the figure equals scipy's spearmanr wherever no two prompts' KLs share a bucket.
- The homogenisation pairs: each worker keeps the HOMOGENISATION_PROMPTS prompts (with a sample
  0) of smallest hash, the driver the smallest of those; pairs are drawn among them. Up to that
  many prompts it is every prompt, as before.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass

import numpy as np

from cousins.drift.sketch import LogGrid

CATEGORY_SUMS = ("n", "flip", "labelled", "ctok", "otok", "kld", "T", "same")
CATEGORY_RESAMPLES = 200
HOMOGENISATION_PROMPTS = 4000
SPEARMAN_GRID = LogGrid(1e-9, 1e3, 1.001)  # a prompt's mean option KL (nats)

_POISSON1_CDF = np.cumsum([math.exp(-1.0) / math.factorial(k) for k in range(20)])
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def prompt_hashes(prompt_ids, seed: int, salt: bytes = b"") -> np.ndarray:
    """A 64-bit hash of (seed, prompt id) per prompt (uint64)."""
    key = salt + str(int(seed)).encode()
    return np.fromiter((int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8, key=key).digest(), "little")
                        for p in prompt_ids), dtype=np.uint64, count=len(prompt_ids))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, element-wise on uint64 (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def poisson_weights(prompt_ids, resamples: int, seed: int) -> np.ndarray:
    """(resamples, prompts) Poisson(1) weights; a prompt's column depends on (seed, its id) only,
    and resample b's row is the same whatever the number of resamples drawn."""
    h = prompt_hashes(list(prompt_ids), seed)
    if not len(h) or resamples <= 0:
        return np.zeros((max(resamples, 0), len(h)))
    b = np.arange(1, resamples + 1, dtype=np.uint64)[:, None]
    with np.errstate(over="ignore"):
        u = (_mix(h[None, :] + b * _GOLDEN) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    return np.searchsorted(_POISSON1_CDF, u, side="right").astype(np.float64)


@dataclass(frozen=True)
class Stat:
    """One column's sum over prompts and its sum in each resample."""

    total: float
    boot: np.ndarray

    def __sub__(self, other: "Stat") -> "Stat":
        return Stat(self.total - other.total, self.boot - other.boot)


@dataclass
class Sums:
    """Σ over prompts of named columns (`total`) and their Poisson-resampled sums (`boot`,
    resamples x columns), over `prompts` prompts; partials add."""

    names: tuple
    total: np.ndarray
    boot: np.ndarray
    prompts: int = 0

    @classmethod
    def of(cls, names, values: np.ndarray, weights: np.ndarray) -> "Sums":
        """values: (prompts, columns); weights: (resamples, prompts)."""
        return cls(tuple(names), values.sum(axis=0), weights @ values, int(values.shape[0]))

    def add(self, other: "Sums") -> "Sums":
        return Sums(self.names, self.total + other.total, self.boot + other.boot, self.prompts + other.prompts)

    def __getitem__(self, name: str) -> Stat:
        j = self.names.index(name)
        return Stat(float(self.total[j]), self.boot[:, j])


def interval(stats: np.ndarray, level: float) -> list[float] | None:
    stats = stats[np.isfinite(stats)]
    if not len(stats):
        return None
    a = (1 - level) / 2
    lo, hi = np.quantile(stats, [a, 1 - a])
    return [float(lo), float(hi)]


def ratios(figures: dict[str, tuple], level: float) -> dict[str, dict]:
    """{name: (num Stat, den Stat[, transform])} -> {name: {value, ci}} of transform(Σ num / Σ den),
    every figure over the same resamples."""
    out = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for name, (num, den, *rest) in figures.items():
            f = rest[0] if rest and rest[0] is not None else (lambda x: x)
            if den.total == 0:
                out[name] = {"value": None, "ci": None}
                continue
            out[name] = {"value": float(f(num.total / den.total)), "ci": interval(f(num.boot / den.boot), level)}
    return out


# --- Spearman's rank correlation from a sparse histogram ------------------------------------------

def spearman_counts(kl: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """(cells, 3) rows of (KL bucket, flip rate, prompts) for prompts' mean option KL and flip rate."""
    if not len(kl):
        return np.zeros((0, 3))
    cells = np.column_stack([SPEARMAN_GRID.index(kl).astype(np.float64), np.asarray(flips, dtype=np.float64)])
    uniq, counts = np.unique(cells, axis=0, return_counts=True)
    return np.column_stack([uniq, counts.astype(np.float64)])


def merge_counts(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is None or not len(a):
        return b
    if b is None or not len(b):
        return a
    both = np.concatenate([a, b])
    uniq, at = np.unique(both[:, :2], axis=0, return_inverse=True)
    return np.column_stack([uniq, np.bincount(at.reshape(-1), weights=both[:, 2])])


def _midranks(keys: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The midrank of each distinct key (sorted) counted `weights` times: ranks 1..N, ties averaged."""
    uniq, at = np.unique(keys, return_inverse=True)
    per = np.bincount(at.reshape(-1), weights=weights)
    before = np.cumsum(per) - per
    return (before + (per + 1) / 2)[at.reshape(-1)]


def spearman(counts: np.ndarray | None) -> dict:
    """Spearman's rho (Pearson's r of midranks) and its two-sided p-value (Student's t with n−2
    degrees of freedom, as scipy's spearmanr), over the prompts counted."""
    n = int(round(counts[:, 2].sum())) if counts is not None and len(counts) else 0
    none = {"value": None, "ci": None, "prompts": n}
    if n < 3:
        return none
    w = counts[:, 2]
    rx, ry = _midranks(counts[:, 0], w), _midranks(counts[:, 1], w)
    mx, my = (w @ rx) / n, (w @ ry) / n
    sxx, syy, sxy = w @ (rx - mx) ** 2, w @ (ry - my) ** 2, w @ ((rx - mx) * (ry - my))
    if sxx <= 0 or syy <= 0:  # constant: no ranking to correlate
        return none
    r = float(max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy))))
    from scipy.stats import t as student_t

    if abs(r) >= 1.0:
        p = 0.0
    else:
        t = r * math.sqrt((n - 2) / ((1.0 - r) * (1.0 + r)))
        p = float(2 * student_t.sf(abs(t), n - 2))
    return {"value": r, "ci": None, "p": p, "prompts": n}


# --- the homogenisation's prompts: the smallest hashes ----------------------------------------------

def smallest(prompt_ids, seed: int, k: int = HOMOGENISATION_PROMPTS) -> list[tuple[int, str]]:
    """The k (hash, prompt id) pairs of smallest hash, smallest first."""
    ids = list(prompt_ids)
    h = prompt_hashes(ids, seed, salt=b"pairs")
    return heapq.nsmallest(k, zip(h.tolist(), ids))


def merge_smallest(a: list, b: list, k: int = HOMOGENISATION_PROMPTS) -> list:
    return heapq.nsmallest(k, [*a, *b])
