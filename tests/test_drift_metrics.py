"""Drift metrics against hand-computed values, and the top-k KLD estimate against its bound."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from cousins.contract import schema
from cousins.drift import metrics
from cousins.drift.compare import compare
from cousins.drift.summary import Bootstrap, BootstrapSpec, summarise

from drift_reference import full_kld, homogenisation_pairs


def _topk(logprobs: np.ndarray, k: int):
    ids = np.argsort(-logprobs, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(logprobs, ids, axis=1)


def _lsm(x: np.ndarray) -> np.ndarray:
    return x - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) - x.max(1, keepdims=True)


def test_kld_of_known_distributions_with_full_topk_is_exact():
    p = np.log(np.array([[0.5, 0.3, 0.2]]))
    q = np.log(np.array([[0.4, 0.4, 0.2]]))
    y = np.array([0])
    pi, pl = _topk(p, 3)
    qi, ql = _topk(q, 3)
    m = metrics.token_metrics(pi, pl, qi, ql, y, p[:, 0], q[:, 0])
    hand = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4)  # = 0.025268...
    assert m["kld"][0] == pytest.approx(hand, abs=1e-12)
    assert m["rest_mass"][0] == pytest.approx(0.0, abs=1e-12)
    assert m["dp"][0] == pytest.approx(0.4 - 0.5)
    assert m["nll_p"][0] == pytest.approx(-math.log(0.5))
    assert m["margin"][0] == pytest.approx(0.2)
    # argmax of q is a tie (0.4, 0.4) broken towards token 0 here: same top-1
    assert bool(m["same_top1"][0])


def test_identical_distributions_give_zero_and_full_agreement():
    rng = np.random.default_rng(0)
    logits = _lsm(rng.normal(size=(40, 100)) * 3)
    y = rng.integers(0, 100, size=40)
    ids, lps = _topk(logits, 5)
    py = logits[np.arange(40), y]
    m = metrics.token_metrics(ids, lps, ids, lps, y, py, py)
    assert np.all(m["kld"] == 0)
    assert m["same_top1"].all()
    assert np.all(m["dp"] == 0)


@pytest.mark.parametrize("k", [1, 3, 5, 20])
def test_topk_estimate_is_a_lower_bound_short_by_exactly_the_tail_term(k):
    rng = np.random.default_rng(k)
    T, V = 200, 64
    p = _lsm(rng.normal(size=(T, V)) * 2.5)
    q = _lsm(np.log(np.exp(p)) + rng.normal(size=(T, V)) * 0.5)  # a perturbed cousin
    y = np.array([rng.choice(V, p=np.exp(row)) for row in p])
    pi, pl = _topk(p, k)
    qi, ql = _topk(q, k)
    est = metrics.token_metrics(pi, pl, qi, ql, y, p[np.arange(T), y], q[np.arange(T), y])["kld"]
    full = full_kld(p, q)
    assert np.all(est <= full + 1e-9)
    # The documented gap: r_p * KL(p_rest || q_rest), with S = tokens known in both distributions.
    for t in range(T):
        known = (set(pi[t]) | {y[t]}) & (set(qi[t]) | {y[t]})
        rest = np.array([i for i in range(V) if i not in known])
        pr, qr = np.exp(p[t, rest]), np.exp(q[t, rest])
        gap = pr.sum() * float((pr / pr.sum() * np.log((pr / pr.sum()) / (qr / qr.sum()))).sum())
        assert full[t] - est[t] == pytest.approx(gap, abs=1e-9)


def test_same_top1_and_dp_on_a_disagreeing_pair():
    p = np.log(np.array([[0.7, 0.2, 0.1]]))
    q = np.log(np.array([[0.2, 0.7, 0.1]]))
    pi, pl = _topk(p, 2)
    qi, ql = _topk(q, 2)
    m = metrics.token_metrics(pi, pl, qi, ql, np.array([0]), p[:, 0], q[:, 0])
    assert not m["same_top1"][0]
    assert m["dp"][0] == pytest.approx(-0.5)
    # k=2 leaves token 2 in the rest bucket (0.1 in both): exact here, since the tail is one token.
    assert m["kld"][0] == pytest.approx(0.7 * math.log(0.7 / 0.2) + 0.2 * math.log(0.2 / 0.7), abs=1e-12)


def test_chrf_and_rouge_l_on_small_examples():
    assert metrics.chrf("the cat", "the cat") == 100.0
    assert metrics.chrf("", "") == 100.0 and metrics.chrf("x", "") == 0.0
    # hyp "ab", ref "abc": order 1 P=1 R=2/3 -> F2 = 10/14; order 2 P=1 R=1/2 -> F2 = 5/9; orders 3+ absent.
    # precision and recall averaged over orders 1-2 first (p = 1, r = (2/3 + 1/2) / 2), then F-beta 2
    assert metrics.chrf("ab", "abc") == pytest.approx(100 * 7 / 11)
    assert metrics.chrf("a b", "ab") == 100.0  # whitespace is ignored, as in sacreBLEU
    # LCS of "a b c d" and "a c d e" is "a c d": P = R = 3/4
    assert metrics.rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert metrics.rouge_l("x y", "z") == 0.0


def test_bit_parallel_lcs_equals_the_dynamic_programme():
    rng = np.random.default_rng(3)

    def dp(a, b):
        prev = [0] * (len(b) + 1)
        for x in a:
            cur = [0]
            for j, y in enumerate(b):
                cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
            prev = cur
        return prev[-1]

    for _ in range(300):
        a = rng.integers(0, 5, size=rng.integers(0, 40)).tolist()
        b = rng.integers(0, 5, size=rng.integers(0, 40)).tolist()
        assert metrics.lcs_length(a, b) == dp(a, b)


def test_first_divergence():
    assert metrics.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert metrics.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert metrics.first_divergence([1, 2], [1, 2, 3]) == 2


def test_answers_and_flips():
    from cousins.drift.answers import correct

    assert correct("The answer is 42.", "42", "contains")
    assert not correct("The answer is 421.", "42", "contains")
    assert correct("Buenos  Aires!", "buenos aires", "exact")
    with pytest.raises(ValueError, match="unknown answer checker"):
        correct("a", "a", "fuzzy")


def test_style_metrics():
    assert metrics.distinct_n("a a a a", 1) == pytest.approx(0.25)
    assert metrics.distinct_n("a b a b", 2) == pytest.approx(2 / 3)
    assert metrics.distinct_n("", 2) is None
    same = homogenisation_pairs(["x y z", "x y z", "x y z"])
    diff = homogenisation_pairs(["a b c", "d e f", "g h i"])
    assert same.mean() == 1.0 and diff.mean() == 0.0


def test_bootstrap_interval_covers_the_value_and_shrinks_with_data():
    spec = BootstrapSpec(resamples=400, level=0.95, seed=1)
    rng = np.random.default_rng(0)
    small = rng.normal(1.0, 1.0, size=30)
    big = rng.normal(1.0, 1.0, size=3000)
    a = Bootstrap(30, spec).mean(small, np.arange(30))
    b = Bootstrap(3000, spec).mean(big, np.arange(3000))
    assert a["ci"][0] <= a["value"] <= a["ci"][1]
    assert (b["ci"][1] - b["ci"][0]) < (a["ci"][1] - a["ci"][0]) / 5
    # About 1.96 standard errors each side for a mean.
    se = big.std(ddof=1) / math.sqrt(len(big))
    assert (b["ci"][1] - b["ci"][0]) == pytest.approx(2 * 1.96 * se, rel=0.2)


def _gen_rows(model, outs, finish="stop", category="arithmetic"):
    rows = []
    for i, (text, ids) in enumerate(outs):
        rows.append({"prompt_id": f"p{i}", "sample_index": 0, "model": model, "seed": 1, "category": category,
                     "prompt_text": "q", "output_text": text, "output_token_ids": ids, "finish_reason": finish,
                     "output_tokens": len(ids)})
    return pa.Table.from_pylist(rows, schema=schema.GENERATIONS)


def _score_rows(model, tables):
    rows = []
    for i, (ids, lps, tok) in enumerate(tables):
        rows.append({"prompt_id": f"p{i}", "sample_index": 0, "model": model, "topk_token_ids": ids,
                     "topk_logprobs": lps, "token_logprobs": tok})
    return pa.Table.from_pylist(rows, schema=schema.SCORES)


def test_compare_and_summary_on_a_crafted_pair():
    orig = _gen_rows("o", [("4 2", [4, 2]), ("7", [7])])
    cous = _gen_rows("c", [("4 3 3", [4, 3, 3]), ("7", [7])])
    lg = math.log
    so = _score_rows("o", [([[4, 1], [2, 3]], [[lg(.9), lg(.1)], [lg(.6), lg(.4)]], [lg(.9), lg(.6)]),
                           ([[7, 1]], [[lg(.8), lg(.2)]], [lg(.8)])])
    sc = _score_rows("c", [([[4, 1], [3, 2]], [[lg(.9), lg(.1)], [lg(.7), lg(.3)]], [lg(.9), lg(.3)]),
                           ([[7, 1]], [[lg(.8), lg(.2)]], [lg(.8)])])
    drift = compare("c", orig, cous, so, sc, references={"p0": "42", "p1": "7"},
                    decode=lambda ids: " ".join(map(str, ids)))
    r0, r1 = drift.to_pylist()
    assert r0["error"] is None and r0["tokens"] == 2
    assert r0["kld_tokens"][0] == pytest.approx(0.0)
    assert r0["kld_tokens"][1] == pytest.approx(.6 * lg(.6 / .3) + .4 * lg(.4 / .7), rel=1e-5)
    assert r0["same_top1_tokens"] == [True, False]
    assert r0["first_divergence"] == 1 and not r0["exact_match"]
    assert (r0["div_original_start"], r0["div_original_end"]) == (1, 3)  # " 2" in "4 2"
    assert r0["length_ratio"] == pytest.approx(1.5)
    assert r0["correct_original"] is False and r0["correct_cousin"] is False and r0["flip"] is False
    assert r1["exact_match"] and r1["first_divergence"] is None and r1["correct_cousin"] is True
    s = summarise("c", "quantized", drift, BootstrapSpec(resamples=50, level=0.95, seed=0))
    m = s["metrics"]
    assert s["tokens"] == 3 and s["error_rows"] == 0
    assert m["same_top1"]["value"] == pytest.approx(2 / 3)
    assert m["kld_mean"]["value"] == pytest.approx(sum(r0["kld_tokens"]) / 3, rel=1e-6)
    assert m["length_ratio"]["value"] == pytest.approx(4 / 3)
    assert m["exact_match"]["value"] == pytest.approx(0.5)
    assert m["ppl_ratio"]["value"] == pytest.approx(math.exp((lg(.6) - lg(.3)) / 3), rel=1e-6)
    assert m["rms_dp"]["value"] == pytest.approx(math.sqrt(0.3 ** 2 / 3), rel=1e-5)
    assert m["accuracy_original"]["value"] == 0.5 and m["flip_rate"]["value"] == 0.0
    assert set(s["slices"]["category"]) == {"arithmetic"}


def test_compare_makes_error_rows_and_keeps_the_rest():
    orig = _gen_rows("o", [("a", [1]), ("b", [2])])
    cous = _gen_rows("c", [("a", [1])])  # the cousin lost its second row
    drift = compare("c", orig, cous, None, None)
    rows = drift.to_pylist()
    assert rows[0]["error"] is None and rows[0]["exact_match"] and rows[0]["kld_tokens"] is None
    assert rows[1]["error"] == "cousin: no generation row"
    s = summarise("c", "other", drift, BootstrapSpec(resamples=20, level=0.95, seed=0), text_only=True)
    assert s["error_rows"] == 1 and "kld_mean" not in s["metrics"]


def test_chrf_equals_sacrebleus_sentence_chrf_on_random_and_text_pairs():
    """Parity with sacreBLEU's sentence-level CHRF() (its defaults) within 1e-6, on 1,500 pairs:
    random strings over small and large alphabets, with whitespace, and edits of real text."""
    import random

    from sacrebleu.metrics import CHRF

    ref = CHRF()
    rng = random.Random(0)
    words = open(metrics.__file__).read().split()
    pairs = []
    for _ in range(500):  # random characters, lengths 0-40, some spaces
        alphabet = rng.choice(["ab", "abc ", "abcdefgh ", "xyz0123456789 ,.;"])
        pairs.append(tuple("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in "hr"))
    for _ in range(1000):  # real words, the second an edit of the first (like a cousin's answer)
        a = rng.sample(words, rng.randint(1, 30))
        b = list(a)
        for _ in range(rng.randint(0, 5)):
            op, i = rng.random(), rng.randrange(len(b) + 1)
            if op < 0.4:
                b.insert(i, rng.choice(words))
            elif op < 0.7 and b:
                b.pop(min(i, len(b) - 1))
            elif b:
                b[min(i, len(b) - 1)] = rng.choice(words)
        pairs.append((" ".join(b), " ".join(a)))
    checked = 0
    for hyp, r in pairs:
        if not "".join(hyp.split()) and not "".join(r.split()):
            assert metrics.chrf(hyp, r) == 100.0  # the one documented difference: two empty outputs
            continue
        assert metrics.chrf(hyp, r) == pytest.approx(ref.sentence_score(hyp, [r]).score, abs=1e-6), (hyp, r)
        checked += 1
    assert checked >= 1400


def test_a_large_rest_mass_is_a_warning_in_the_summary_and_the_table():
    from cousins.drift.table import drift_table

    assert metrics.rest_mass_warning("q", 0.05, 20) is None and metrics.rest_mass_warning("q", None, 20) is None
    w = metrics.rest_mass_warning("q", 0.78, 20)
    assert w.startswith("q: the original puts 78.0% of its probability outside its top-20") and "lower bound" in w
    m = {"kld_mean": {"value": 0.1, "ci": [0.09, 0.11]}, "rest_mass_mean": {"value": 0.78, "ci": [0.7, 0.8]}}
    summary = {"cousins": [{"name": "q", "kind": "quantized", "error": None, "metrics": m}], "noise_floor": None,
               "prompts": 3, "score_topk": 20, "bootstrap": {"level": 0.95, "resamples": 10}, "warnings": [w]}
    text = drift_table(summary)
    assert text.splitlines()[0].split()[:6] == ["cousin", "kind", "KLD", "mean", "[CI]", "rest"]
    assert "78.0%" in text.splitlines()[2] and text.endswith(f"warning: {w}")


def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_pairs_and_the_table_shows_both_directions():
    from cousins.drift.summary import mcnemar_p
    from cousins.drift.table import drift_table

    assert mcnemar_p(10, 0) == pytest.approx(2 * 0.5 ** 10)
    assert mcnemar_p(5, 5) == pytest.approx(1.0) and mcnemar_p(0, 0) is None
    assert mcnemar_p(7, 1) == pytest.approx(2 * sum(math.comb(8, k) for k in (0, 1)) / 2 ** 8)
    m = {"kld_mean": {"value": 0.1, "ci": [0.09, 0.11]}, "flip_rate": {"value": 0.08, "ci": [0.04, 0.12]},
         "flip_correct_to_wrong": {"value": 0.07, "ci": [0.03, 0.1]},
         "flip_wrong_to_correct": {"value": 0.01, "ci": [0.0, 0.02]}, "flip_mcnemar_p": {"value": 0.0039, "ci": None}}
    summary = {"cousins": [{"name": "q", "kind": "quantized", "error": None, "metrics": m}], "noise_floor": None,
               "prompts": 100, "score_topk": 20, "bootstrap": {"level": 0.95, "resamples": 10}, "warnings": []}
    text = drift_table(summary)
    assert "q: 7.0% [3.0%, 10.0%] correct→wrong, 1.0% [0.0%, 2.0%] wrong→correct; McNemar p = 0.0039" in text


def test_thinking_is_measured_apart_from_the_answer():
    """The original thinks 3 tokens and answers 42; the cousin thinks 5 and is cut before answering."""
    orig = _gen_rows("o", [("<think>a b c</think> 42", [1, 2, 3, 4])])
    cous = _gen_rows("c", [("<think>a b c d e", [1, 2, 3, 5, 6])])
    drift = compare("c", orig, cous, None, None, references={"p0": "42"}, rule="auto",
                    count_tokens=lambda text: len(text.split()))
    (r,) = drift.to_pylist()
    assert (r["thinking_original_tokens"], r["thinking_cousin_tokens"]) == (3, 5)
    assert r["thinking_finished_original"] is True and r["thinking_finished_cousin"] is False
    assert (r["correct_original"], r["correct_cousin"], r["checker"]) == (True, False, "math")
    assert (r["answer_original"], r["answer_cousin"]) == ("42", None)
    assert r["chrf"] == metrics.chrf("", " 42")  # the answers, not the thinking, are compared
    m = summarise("c", "other", drift, BootstrapSpec(resamples=20, level=0.95, seed=0))["metrics"]
    assert m["thinking_length_ratio"]["value"] == pytest.approx(5 / 3)
    assert m["answer_length_ratio"]["value"] == pytest.approx(0.0)
    assert (m["unfinished_thinking_original"]["value"], m["unfinished_thinking_cousin"]["value"]) == (0.0, 1.0)
    assert (m["flip_correct_to_wrong"]["value"], m["flip_wrong_to_correct"]["value"]) == (1.0, 0.0)
    plain = compare("c", _gen_rows("o", [("42", [4])]), _gen_rows("c", [("42", [4])]), None, None)
    assert plain.to_pylist()[0]["thinking_original_tokens"] is None  # no span: nothing to measure


def test_unparsed_answers_are_counted_and_noted():
    from cousins.drift.table import drift_table

    orig = _gen_rows("o", [("The answer is 4", [4]), ("The answer is 5", [5])])
    cous = _gen_rows("c", [("The answer is \\frac{{{", [9]), ("The answer is 5", [5])])
    drift = compare("c", orig, cous, None, None, references={"p0": "4", "p1": "5"}, rule="math")
    assert [r["unparsed_cousin"] for r in drift.to_pylist()] == [True, False]
    s = summarise("c", "other", drift, BootstrapSpec(resamples=20, level=0.95, seed=0))
    assert s["metrics"]["unparsed_answers_cousin"]["value"] == 1 and s["metrics"]["unparsed_answers_original"]["value"] == 0
    summary = {"cousins": [s], "noise_floor": None, "prompts": 2, "score_topk": 20,
               "bootstrap": {"level": 0.95, "resamples": 20}, "warnings": []}
    assert "note: c: math-verify could not parse 0 of the original's and 1 of the cousin's final answers" in drift_table(summary)


def test_options_by_likelihood_kl_margin_acc_and_acc_norm():
    """The option columns of a drift row (cousins/drift/options.py) from two models' log-likelihoods."""
    import math

    from cousins.drift.options import option_row

    lo, lc = [math.log(0.7), math.log(0.2), math.log(0.1)], [math.log(0.3), math.log(0.6), math.log(0.1)]
    r = option_row({"choice_logprobs": lo, "choice_chars": [1, 10, 1]}, {"choice_logprobs": lc}, "A",
                   ["a", "long option b", "c"])
    p, q = [0.7, 0.2, 0.1], [0.3, 0.6, 0.1]
    assert r["option_kl"] == pytest.approx(sum(x * math.log(x / y) for x, y in zip(p, q)))
    assert r["option_margin"] == pytest.approx(0.5) and (r["option_original"], r["option_cousin"]) == ("A", "B")
    assert r["mc_correct_original"] and not r["mc_correct_cousin"] and r["mc_flip"]
    # per character, the long option B (log-likelihood -1.6 over 10 characters) comes first: acc_norm is not acc
    assert r["mc_correct_norm_original"] is False
    assert option_row({"choice_logprobs": lo}, {"choice_logprobs": None}, "A", ["a", "b", "c"]) == {}
    same = option_row({"choice_logprobs": lo}, {"choice_logprobs": list(lo)}, "2", ["a", "b", "c"])
    assert same["option_kl"] == 0 and same["mc_flip"] is False and same["mc_correct_original"] is False
