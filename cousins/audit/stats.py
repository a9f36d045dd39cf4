"""The audit's tests of H0 "the target's outputs are distributed as the reference's, prompt by
prompt", on samples both sides gave to the same prompts.

- `mmd_test`: text only. The Maximum Mean Discrepancy between the two sides' completions with a
  Hamming kernel that is zero across different prompts (Gao, Liang, Guestrin, "Model Equality
  Testing", arXiv 2410.20247): completions are token-id sequences compared position by position
  over their first `length` tokens (a sequence that ended reads as padding there).
- `logprob_test`: where the target returns top-k log-probabilities. Each query gives the top-k
  of one output position (the first, for a one-token query); per prompt, the distance between
  the two sides' mean log-probability vectors over the tokens either side listed (a token a query
  did not list reads as that query's smallest listed value: it was below its top k).
- `mcnemar_test`: on labelled prompts, paired correctness (cousins.drift.summary.mcnemar_p).

The two distribution tests are permutation tests: each side's labels are permuted within each
prompt (both sides keep their number of samples per prompt), and the p-value is
(1 + permutations at least as extreme) / (1 + permutations), never 0. Their effect is the
statistic with a percentile CI from resampling prompts. `verdict` applies Holm's correction across
the tests. The null is exact under exchangeability; how a real endpoint's batching and numerics
bend it is what an audit's A/A run (the reference against itself) measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD = -1  # a position after a completion's end


@dataclass
class TestResult:
    name: str
    statistic: float
    p_value: float | None
    effect_ci: tuple[float, float] | None  # of the statistic, resampling prompts
    null_mean: float | None  # the statistic's mean over the permutations
    queries: int  # samples (requests) both sides spent on it
    reject: bool = False  # set by `verdict`


def _p_value(observed: float, null: np.ndarray) -> float:
    return float((1 + np.count_nonzero(null >= observed - 1e-12)) / (1 + null.size))


def _labels(rng: np.random.Generator, n_a: int, n: int, permutations: int) -> np.ndarray:
    """`permutations` boolean rows of length n, each with n_a True (side A) in random places."""
    keys = rng.random((permutations, n))
    return np.argsort(keys, axis=1) < n_a


def _ci(per_prompt: np.ndarray, stat, rng: np.random.Generator, resamples: int, level: float) -> tuple[float, float]:
    """A percentile CI of `stat(rows)` over prompts resampled with replacement."""
    n = per_prompt.shape[0]
    draws = np.array([stat(per_prompt[rng.integers(0, n, n)]) for _ in range(resamples)])
    lo, hi = np.nanpercentile(draws, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


# --- MMD with a Hamming kernel -------------------------------------------------------------------

def _as_array(samples: list[list[int]], length: int) -> np.ndarray:
    out = np.full((len(samples), length), PAD, dtype=np.int64)
    for i, s in enumerate(samples):
        s = list(s)[:length]
        out[i, :len(s)] = s
    return out


def _hamming(z: np.ndarray) -> np.ndarray:
    """The kernel between every two rows: the share of the `length` positions where they agree."""
    return (z[:, None, :] == z[None, :, :]).mean(axis=2)


def _mmd_sums(k: np.ndarray, a: np.ndarray) -> np.ndarray:
    """(Σ_{i≠j in A} k, Σ_{i≠j in B} k, Σ_{i in A, j in B} k) for label rows `a` (permutations x n)."""
    k0 = k - np.diag(np.diag(k))
    a = a.astype(float)
    b = 1.0 - a
    aa = np.einsum("pi,ij,pj->p", a, k0, a)
    bb = np.einsum("pi,ij,pj->p", b, k0, b)
    ab = np.einsum("pi,ij,pj->p", a, k0, b)  # (the diagonal is never across sides)
    return np.stack([aa, bb, ab], axis=-1)


def _mmd(sums: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """MMD² (unbiased) from per-prompt kernel sums summed over prompts: sums [..., 3] and the
    matching pair counts [..., 3] (within A, within B, across)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums[..., 0] / pairs[..., 0] + sums[..., 1] / pairs[..., 1] - 2 * sums[..., 2] / pairs[..., 2]


def mmd_test(reference: dict[str, list[list[int]]], target: dict[str, list[list[int]]], *, length: int = 32,
             permutations: int = 1000, seed: int = 0, resamples: int = 500, level: float = 0.95) -> TestResult:
    """The MMD test on the prompts both sides sampled (each side's completions of a prompt as
    token-id lists). Prompts with fewer than two samples on a side do not count."""
    rng = np.random.default_rng(seed)
    prompts = [p for p in reference if len(reference[p]) >= 2 and len(target.get(p, ())) >= 2]
    if not prompts:
        return TestResult("mmd_hamming", float("nan"), None, None, None, 0)
    observed, null = np.zeros(3), np.zeros((permutations, 3))
    per_prompt = []  # each prompt's sums and pair counts, for the CI
    queries = 0
    for p in prompts:
        m, n = len(reference[p]), len(target[p])
        queries += m + n
        k = _hamming(np.concatenate([_as_array(reference[p], length), _as_array(target[p], length)]))
        own = _mmd_sums(k, (np.arange(m + n) < m)[None, :])[0]
        observed += own
        null += _mmd_sums(k, _labels(rng, m, m + n, permutations))
        per_prompt.append(np.concatenate([own, [m * (m - 1), n * (n - 1), m * n]]))
    per_prompt = np.array(per_prompt)
    pairs = per_prompt[:, 3:].sum(axis=0)
    stat = float(_mmd(observed, pairs))
    null_stats = _mmd(null, pairs)
    ci = _ci(per_prompt, lambda rows: _mmd(rows[:, :3].sum(0), rows[:, 3:].sum(0)), rng, resamples, level)
    return TestResult("mmd_hamming", stat, _p_value(stat, null_stats), ci, float(null_stats.mean()), queries)


# --- top-k log-probabilities -----------------------------------------------------------------------

def _vectors(queries: list[dict[int, float]], tokens: list[int]) -> np.ndarray:
    out = np.empty((len(queries), len(tokens)))
    for i, q in enumerate(queries):
        floor = min(q.values()) if q else 0.0
        out[i] = [q.get(t, floor) for t in tokens]
    return out


def logprob_test(reference: dict[str, list[dict[int, float]]], target: dict[str, list[dict[int, float]]], *,
                 permutations: int = 1000, seed: int = 0, resamples: int = 500, level: float = 0.95) -> TestResult:
    """The top-k log-probability test: per prompt, each query's {token id: logprob} of the same
    output position on both sides. The statistic is the mean over prompts of the mean absolute
    difference between the sides' mean vectors. Every prompt with a query on each side counts."""
    rng = np.random.default_rng(seed)
    prompts = [p for p in reference if reference[p] and target.get(p)]
    if not prompts:
        return TestResult("topk_logprobs", float("nan"), None, None, None, 0)
    own, null = np.zeros(len(prompts)), np.zeros((permutations, len(prompts)))
    queries = 0
    for j, p in enumerate(prompts):
        ref, tgt = reference[p], target[p]
        queries += len(ref) + len(tgt)
        tokens = sorted({t for q in ref + tgt for t in q})
        v = _vectors(ref + tgt, tokens)
        m = len(ref)
        labels = np.concatenate([(np.arange(len(v)) < m)[None, :], _labels(rng, m, len(v), permutations)])
        a = labels.astype(float)
        mean_a = a @ v / m
        mean_b = (1 - a) @ v / (len(v) - m)
        dist = np.abs(mean_a - mean_b).mean(axis=1)
        own[j], null[:, j] = dist[0], dist[1:]
    stat = float(own.mean())
    null_stats = null.mean(axis=1)
    ci = _ci(own[:, None], lambda rows: rows[:, 0].mean(), rng, resamples, level)
    return TestResult("topk_logprobs", stat, _p_value(stat, null_stats), ci, float(null_stats.mean()), queries)


# --- paired correctness and the verdict ----------------------------------------------------------

def mcnemar_test(correct_to_wrong: int, wrong_to_correct: int, queries: int) -> TestResult:
    """Paired correctness on labelled prompts (one reference and one target answer per prompt):
    McNemar's exact test; the statistic is the net share of prompts the target gets wrong."""
    from cousins.drift.summary import mcnemar_p

    b, c = correct_to_wrong, wrong_to_correct
    share = (b - c) / queries if queries else float("nan")
    return TestResult("mcnemar", share, mcnemar_p(b, c), None, 0.0, queries)


def holm(p_values: list[float | None], alpha: float) -> list[bool]:
    """Holm's step-down rejections at family-wise level `alpha` (a test without a p-value never rejects)."""
    order = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    reject = [False] * len(p_values)
    for rank, (p, i) in enumerate(order):
        if p > alpha / (len(order) - rank):
            break
        reject[i] = True
    return reject


def verdict(results: list[TestResult], alpha: float) -> str:
    """`differs` when any test rejects after Holm's correction (each result's `reject` set), else `consistent`."""
    for r, rejected in zip(results, holm([r.p_value for r in results], alpha)):
        r.reject = rejected
    return "differs" if any(r.reject for r in results) else "consistent"
