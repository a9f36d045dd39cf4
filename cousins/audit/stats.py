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
- `mcnemar_result`: on labelled prompts, paired correctness (cousins.drift.summary.mcnemar_p).

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


def mmd_prompt(reference: list, target: list, *, length: int, permutations: int,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One prompt's part of the MMD test (each side's samples as token-id lists, or texts compared
    character by character): its kernel sums and pair counts [6] and, for each permutation of
    the labels within the prompt, its kernel sums [permutations, 3]. Both add up over prompts."""
    as_ids = [[ord(c) for c in s] if isinstance(s, str) else s for s in (*reference, *target)]
    m, n = len(reference), len(target)
    k = _hamming(_as_array(as_ids, length))
    own = _mmd_sums(k, (np.arange(m + n) < m)[None, :])[0]
    return np.concatenate([own, [m * (m - 1), n * (n - 1), m * n]]), _mmd_sums(k, _labels(rng, m, m + n, permutations))


def mmd_result(own: np.ndarray, null: np.ndarray, queries: int, *, rng: np.random.Generator, resamples: int = 500,
               level: float = 0.95) -> TestResult:
    """The MMD test from its prompts' parts: `own` [prompts, 6] and the nulls summed over prompts;
    `queries`: the samples both sides gave it."""
    if own.shape[0] == 0:
        return TestResult("mmd_hamming", float("nan"), None, None, None, 0)
    pairs = own[:, 3:].sum(axis=0)
    stat = float(_mmd(own[:, :3].sum(axis=0), pairs))
    null_stats = _mmd(null, pairs)
    ci = _ci(own, lambda rows: _mmd(rows[:, :3].sum(0), rows[:, 3:].sum(0)), rng, resamples, level)
    return TestResult("mmd_hamming", stat, _p_value(stat, null_stats), ci, float(null_stats.mean()), queries)


def mmd_test(reference: dict[str, list], target: dict[str, list], *, length: int = 32,
             permutations: int = 1000, seed: int = 0, resamples: int = 500, level: float = 0.95) -> TestResult:
    """The MMD test on the prompts both sides sampled (each side's completions of a prompt as
    token-id lists or texts). Prompts with fewer than two samples on a side do not count."""
    rng = np.random.default_rng(seed)
    prompts = [p for p in reference if len(reference[p]) >= 2 and len(target.get(p, ())) >= 2]
    rows, null = [], np.zeros((permutations, 3))
    for p in prompts:
        row, perm = mmd_prompt(reference[p], target[p], length=length, permutations=permutations, rng=rng)
        rows.append(row)
        null += perm
    queries = sum(len(reference[p]) + len(target[p]) for p in prompts)
    return mmd_result(np.array(rows).reshape(-1, 6), null, queries, rng=rng, resamples=resamples, level=level)


# --- top-k log-probabilities -----------------------------------------------------------------------

def _vectors(queries: list[dict[int, float]], tokens: list[int]) -> np.ndarray:
    out = np.empty((len(queries), len(tokens)))
    for i, q in enumerate(queries):
        floor = min(q.values()) if q else 0.0
        out[i] = [q.get(t, floor) for t in tokens]
    return out


def logprob_prompt(reference: list[dict[int, float]], target: list[dict[int, float]], *, permutations: int,
                   rng: np.random.Generator, tolerance: float = 0.0) -> tuple[float, np.ndarray]:
    """One prompt's part of the top-k log-probability test: the distance between the sides' mean
    vectors (the mean absolute difference over the tokens either side listed, less `tolerance`,
    at least 0) and the same for each permutation of the labels within the prompt [permutations]."""
    tokens = sorted({t for q in reference + target for t in q})
    v = _vectors(reference + target, tokens)
    m = len(reference)
    labels = np.concatenate([(np.arange(len(v)) < m)[None, :], _labels(rng, m, len(v), permutations)])
    a = labels.astype(float)
    mean_a = a @ v / m
    mean_b = (1 - a) @ v / (len(v) - m)
    dist = np.maximum(np.abs(mean_a - mean_b).mean(axis=1) - tolerance, 0.0)
    return float(dist[0]), dist[1:]


def logprob_result(own: np.ndarray, null: np.ndarray, queries: int, *, rng: np.random.Generator,
                   resamples: int = 500, level: float = 0.95) -> TestResult:
    """The top-k log-probability test from its prompts' distances `own` [prompts] and their
    permutations' summed over prompts [permutations]; the statistic is the mean over prompts."""
    if own.size == 0:
        return TestResult("topk_logprobs", float("nan"), None, None, None, 0)
    stat = float(own.mean())
    null_stats = null / own.size
    ci = _ci(own[:, None], lambda rows: rows[:, 0].mean(), rng, resamples, level)
    return TestResult("topk_logprobs", stat, _p_value(stat, null_stats), ci, float(null_stats.mean()), queries)


def logprob_test(reference: dict[str, list[dict[int, float]]], target: dict[str, list[dict[int, float]]], *,
                 permutations: int = 1000, seed: int = 0, resamples: int = 500, level: float = 0.95,
                 tolerance: float = 0.0) -> TestResult:
    """The top-k log-probability test: per prompt, each query's {token id: logprob} of the same
    output position on both sides. The statistic is the mean over prompts of the mean absolute
    difference between the sides' mean vectors (less `tolerance`: differences a deterministic
    engine's numerics make under another batching are not a model's). Every prompt with a query
    on each side counts."""
    rng = np.random.default_rng(seed)
    prompts = [p for p in reference if reference[p] and target.get(p)]
    own, null = np.zeros(len(prompts)), np.zeros(permutations)
    for j, p in enumerate(prompts):
        own[j], perm = logprob_prompt(reference[p], target[p], permutations=permutations, rng=rng, tolerance=tolerance)
        null += perm
    queries = sum(len(reference[p]) + len(target[p]) for p in prompts)
    return logprob_result(own, null, queries, rng=rng, resamples=resamples, level=level)


# --- paired correctness and the verdict ----------------------------------------------------------

def mcnemar_result(own: np.ndarray, *, rng: np.random.Generator, resamples: int = 500,
                   level: float = 0.95) -> TestResult:
    """McNemar's exact test over every pair of samples (sample i of each side) of the labelled
    prompts, `own` [prompts, 3] (correct->wrong, wrong->correct, pairs). Under H0 the two sides'
    samples of a prompt are independent draws of one distribution, so each discordant pair is
    either way with probability 1/2 whatever the prompt: the exact test holds with several
    samples a prompt. The statistic (the net share of pairs the target gets wrong) has a CI from
    resampling prompts (pairs of one prompt are not independent for the effect's spread)."""
    from cousins.drift.summary import mcnemar_p

    b, c, n = (int(x) for x in own.sum(axis=0))
    p = mcnemar_p(b, c)  # None without a discordant pair: no evidence either way
    ci = _ci(own.astype(float), lambda rows: (rows[:, 0].sum() - rows[:, 1].sum()) / max(rows[:, 2].sum(), 1),
             rng, resamples, level)
    return TestResult("mcnemar", (b - c) / n, 1.0 if p is None else p, ci, 0.0, 2 * n)


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
