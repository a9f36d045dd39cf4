"""Log-scale and linear histograms: mergeable (counts add up across workers), so quantiles of per-token values
need no more memory at a million prompts than at a hundred.

A grid has bucket 0 for values below `lo` (zeros included), buckets 1..K for [lo·r^(i−1), lo·r^i)
and bucket K+1 for values at or above `hi`. A quantile q is np.quantile's default (linear)
interpolation between the order statistics of ranks ⌊h⌋ and ⌊h⌋+1, h = q·(N−1), each read as the
geometric centre of the bucket that holds it (capped at the largest value seen). The stated error,
tested: where both order statistics lie in [lo, hi) the estimate is within a factor √r of
np.quantile's (r = 1.02: within 1%); an order statistic below `lo` reads as 0 (an absolute error
under `lo` = 1e-9 nats for KLD).

A linear grid (LinearGrid, for Δp = q(y_t) − p(y_t), signed in [−1, 1]) has buckets of width
`step` centred on lo, lo + step, …, hi; its quantiles are read the same way, each order
statistic as its bucket's centre clamped to [smallest, largest value seen]: within step/2 of
np.quantile's (the clamp only moves an estimate towards the true value). Values beyond the ends
count in the end buckets (Δp leaves [−1, 1] only by round-off).

Bootstrap CIs of a quantile use Poisson weights (resample.poisson_weights): each prompt's weight in
a resample depends on (seed, prompt id) alone, so a worker can weight its own prompts' tokens
without knowing the rest of the run, and the resampled histograms add up like the plain one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LogGrid:
    lo: float
    hi: float
    ratio: float

    @property
    def inner(self) -> int:
        return math.ceil(math.log(self.hi / self.lo) / math.log(self.ratio))

    @property
    def buckets(self) -> int:
        return self.inner + 2

    def index(self, values: np.ndarray) -> np.ndarray:
        v = np.asarray(values, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            i = np.floor(np.log(np.maximum(v, self.lo) / self.lo) / math.log(self.ratio)).astype(np.int64) + 1
        i = np.clip(i, 1, self.inner)
        return np.where(v < self.lo, 0, np.where(v >= self.hi, self.inner + 1, i))

    def counts(self, values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(self.index(values), weights=weights, minlength=self.buckets).astype(np.float64)

    def centre(self, i: int) -> float:
        if i <= 0:
            return 0.0
        if i > self.inner:
            return self.hi
        return self.lo * self.ratio ** (i - 1) * math.sqrt(self.ratio)

    def edges(self) -> np.ndarray:
        """Lower edges of buckets 1..K+1 (bucket 0 has none)."""
        return self.lo * self.ratio ** np.arange(self.inner + 1)

    def quantile(self, counts: np.ndarray, q: float, top: float | None = None) -> float | None:
        """The q-quantile of the values counted, interpolated like np.quantile's default (see the
        module's note on its error); `top` is the largest value seen, which caps the estimate."""
        return interpolated(counts, q, lambda i: self._value(i, top))

    def _value(self, i: int, top: float | None) -> float:
        v = self.centre(min(i, self.buckets - 1))
        return top if top is not None and (i > self.inner or v > top) else v


def interpolated(counts: np.ndarray, q: float, value) -> float | None:
    """The q-quantile of a histogram, interpolated between the two ranks around it as
    np.quantile's default does; `value(bucket)` is a bucket's representative value."""
    total = float(counts.sum())
    if total <= 0:
        return None
    h = q * max(total - 1, 0.0)
    k = math.floor(h)
    cum = np.cumsum(counts)
    lo, hi = (value(int(np.searchsorted(cum, r, side="right"))) for r in (k, min(k + 1, total - 1)))
    return lo + (h - k) * (hi - lo)


@dataclass(frozen=True)
class LinearGrid:
    lo: float
    hi: float
    step: float

    @property
    def buckets(self) -> int:
        return round((self.hi - self.lo) / self.step) + 1

    def index(self, values: np.ndarray) -> np.ndarray:
        v = np.asarray(values, dtype=np.float64)
        return np.clip(np.floor((v - self.lo) / self.step + 0.5), 0, self.buckets - 1).astype(np.int64)

    def counts(self, values: np.ndarray) -> np.ndarray:
        v = np.asarray(values, dtype=np.float64)
        return np.bincount(self.index(v[np.isfinite(v)]), minlength=self.buckets).astype(np.float64)

    def quantile(self, counts: np.ndarray, q: float, top: float | None = None,
                 bottom: float | None = None) -> float | None:
        """The q-quantile of the values counted (np.quantile's interpolation; within step/2 of
        it); `bottom`, `top`: the smallest and largest values seen, which clamp the estimate."""
        def value(i: int) -> float:
            v = self.lo + i * self.step
            return min(max(v, bottom if bottom is not None else v), top if top is not None else v)

        return interpolated(counts, q, value)


# Per-token KLD (nats): 1e-9 .. 1e3 in steps of 2% (1,400 buckets, 11 KiB a histogram); the
# bootstrap's resampled histograms use steps of 10.4% (r^5), so a CI endpoint is within 5%.
KLD_GRID = LogGrid(1e-9, 1e3, 1.02)
KLD_BOOT_GRID = LogGrid(1e-9, 1e3, 1.02 ** 5)
# Per-row length ratios (cousin tokens / original tokens), drawn within 1/32 .. 32.
LENGTH_GRID = LogGrid(1 / 32, 32.0, 1.02)
# Per-token Δp: steps of 1e-4 over [−1, 1] (20,001 buckets, 160 KiB a histogram before zstd),
# so a quantile is within 5e-5 (0.005 percentage points).
DP_GRID = LinearGrid(-1.0, 1.0, 1e-4)


def weighted_counts(grid: LogGrid, values: np.ndarray, groups: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(resamples, buckets) histograms of `values`, value i counted weights[b, groups[i]] times in
    resample b: the resampled histograms of one worker's tokens."""
    b, n = weights.shape[0], grid.buckets
    if not len(values):
        return np.zeros((b, n))
    flat = (grid.index(values)[None, :] + (np.arange(b) * n)[:, None]).ravel()
    return np.bincount(flat, weights=weights[:, groups].ravel(), minlength=b * n).reshape(b, n)
