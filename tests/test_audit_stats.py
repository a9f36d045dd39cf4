"""The audit's tests (cousins/audit/stats.py) on simulated samples: the MMD statistic against a
brute-force sum, the false-positive rate of each test when both sides are one model (at or below
alpha, within Monte Carlo error), their power against a cousin-like shift, and Holm's correction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cousins.audit.stats import PAD, holm, logprob_test, mcnemar_result, mmd_test, verdict


def _model(seed: int, prompts: int, vocab: int = 6) -> dict[str, np.ndarray]:
    """Per prompt, a next-token distribution per position (a toy 'model')."""
    rng = np.random.default_rng(seed)
    return {f"p{i}": rng.dirichlet(np.full(vocab, 0.7), size=8) for i in range(prompts)}


def _shifted(model: dict[str, np.ndarray], amount: float, seed: int) -> dict[str, np.ndarray]:
    """A cousin: each position's distribution mixed with another one by `amount`."""
    rng = np.random.default_rng(seed)
    return {p: (1 - amount) * d + amount * rng.dirichlet(np.full(d.shape[1], 0.7), size=d.shape[0])
            for p, d in model.items()}


def _sample(model: dict[str, np.ndarray], n: int, rng) -> dict[str, list[list[int]]]:
    return {p: [[int(rng.choice(d.shape[1], p=row)) for row in d] for _ in range(n)] for p, d in model.items()}


def _logprobs(model: dict[str, np.ndarray], n: int, rng, noise: float = 0.01, k: int = 4):
    """n queries a prompt: the first position's top-k log-probabilities, with numerical noise."""
    out = {}
    for p, d in model.items():
        lp = np.log(d[0])
        qs = []
        for _ in range(n):
            noisy = lp + rng.normal(0, noise, lp.size)
            top = np.argsort(-noisy)[:k]
            qs.append({int(t): float(noisy[t]) for t in top})
        out[p] = qs
    return out


def test_the_mmd_statistic_equals_the_brute_force_sum_over_pairs():
    rng = np.random.default_rng(1)
    a = {p: [list(rng.integers(0, 3, rng.integers(2, 6))) for _ in range(3)] for p in ("x", "y")}
    b = {p: [list(rng.integers(0, 3, rng.integers(2, 6))) for _ in range(4)] for p in ("x", "y")}
    length = 5

    def k(s, t):
        s, t = (list(s) + [PAD] * length)[:length], (list(t) + [PAD] * length)[:length]
        return sum(u == v for u, v in zip(s, t)) / length

    def within(side):
        pairs = [(s, t) for p in side for i, s in enumerate(side[p]) for j, t in enumerate(side[p]) if i != j]
        return sum(k(s, t) for s, t in pairs) / (2 * 3 * 2 if side is a else 2 * 4 * 3)

    across = sum(k(s, t) for p in a for s in a[p] for t in b[p]) / (2 * 3 * 4)
    got = mmd_test(a, b, length=length, permutations=50, resamples=20)
    assert math.isclose(got.statistic, within(a) + within(b) - 2 * across, abs_tol=1e-12)
    assert got.queries == 14 and 0 < got.p_value <= 1


@pytest.mark.parametrize("test", ["mmd", "logprobs"])
def test_one_model_against_itself_rejects_at_most_alpha_of_the_time(test):
    """200 audits of a model against itself (fresh samples each side): the rejection rate at
    alpha = 0.05 is within three standard errors of at most 5%."""
    rng = np.random.default_rng(7)
    rejected = 0
    audits = 200
    for i in range(audits):
        m = _model(i, prompts=10)
        if test == "mmd":
            r = mmd_test(_sample(m, 4, rng), _sample(m, 4, rng), length=8, permutations=199, seed=i, resamples=10)
        else:
            r = logprob_test(_logprobs(m, 3, rng), _logprobs(m, 3, rng), permutations=199, seed=i, resamples=10)
        rejected += r.p_value <= 0.05
    assert rejected / audits <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / audits), rejected


@pytest.mark.parametrize("test", ["mmd", "logprobs"])
def test_a_cousin_is_rejected_and_its_effect_interval_excludes_the_null(test):
    rng = np.random.default_rng(3)
    m = _model(11, prompts=30)
    c = _shifted(m, 0.5, seed=12)
    if test == "mmd":
        r = mmd_test(_sample(m, 6, rng), _sample(c, 6, rng), length=8, permutations=499)
    else:
        r = logprob_test(_logprobs(m, 3, rng), _logprobs(c, 3, rng), permutations=499)
    assert r.p_value <= 0.01 and r.effect_ci[0] > r.null_mean, r


def test_holm_rejects_step_down_and_the_verdict_marks_each_test():
    assert holm([0.01, 0.04, 0.03], 0.05) == [True, False, False]  # 0.01 <= 0.05/3; 0.03 > 0.05/2
    assert holm([0.01, 0.02, 0.03], 0.05) == [True, True, True]
    assert holm([None, 0.2], 0.05) == [False, False]
    def mcnemar(b: int, c: int, pairs: int):  # one prompt's correct->wrong, wrong->correct and pairs
        return mcnemar_result(np.array([[b, c, pairs]]), rng=np.random.default_rng(0), resamples=10)

    tests = [mcnemar(9, 0, 100), mcnemar(1, 1, 100)]
    assert verdict(tests, 0.05) == "differs" and [t.reject for t in tests] == [True, False]
    assert verdict([mcnemar(0, 0, 10)], 0.05) == "consistent"


def test_prompts_one_side_lacks_are_left_out_and_no_prompt_gives_no_p_value():
    a = {"x": [[1, 2], [1, 2]], "y": [[3], [3]]}
    b = {"x": [[1, 2], [2, 2]]}
    assert mmd_test(a, b, permutations=20, resamples=5).queries == 4
    empty = mmd_test(a, {}, permutations=20)
    assert empty.p_value is None and empty.queries == 0
    assert logprob_test({"x": [{1: -0.1}]}, {}, permutations=20).p_value is None
