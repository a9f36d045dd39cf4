"""The capability-against-cost plane (cousins/drift/plane.py): the accuracy interval (Wilson over a
prompt-clustered effective n), the frontier and its dominances, and the per-partition sums the
accounting sends for it. Synthetic numbers: the demo teacher answers almost nothing correctly."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from cousins.drift.answers import Rule
from cousins.drift import plane as pl
from cousins.contract.codec import decode, encode
from cousins.contract.summary import Plane


def test_wilson_matches_the_textbook_values():
    lo, hi = pl.wilson(0.5, 100, 0.95)
    assert (lo, hi) == pytest.approx((0.40383, 0.59617), abs=1e-5)
    lo, hi = pl.wilson(0.0, 10, 0.95)  # no successes: the interval still reaches up
    assert lo == 0.0 and hi == pytest.approx(0.27753, abs=1e-5)
    lo, hi = pl.wilson(1.0, 10, 0.95)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.27753, abs=1e-5)
    assert pl.wilson(0.2, 50, 0.99)[1] - pl.wilson(0.2, 50, 0.99)[0] > pl.wilson(0.2, 50, 0.9)[1] - pl.wilson(0.2, 50, 0.9)[0]


def _sums(counts: np.ndarray, labelled: np.ndarray) -> tuple:
    c, n = counts.astype(float), labelled.astype(float)
    return c.sum(), n.sum(), len(c), float((c * c).sum()), float((c * n).sum()), float((n * n).sum())


def test_the_clustered_standard_error_is_the_binomial_one_for_one_sample_and_grows_with_clustering():
    rng = np.random.default_rng(0)
    c = rng.random(400) < 0.3  # one sample per prompt: independent rows
    se = pl.accuracy_se(*_sums(c, np.ones(400)))
    p = c.mean()
    assert se == pytest.approx(math.sqrt(p * (1 - p) / 400 * 400 / 399), rel=1e-9)
    # four samples per prompt, all alike: the prompts are the sample, not the rows
    same = np.repeat(rng.random(100) < 0.3, 4).reshape(100, 4)
    se4 = pl.accuracy_se(*_sums(same.sum(1), np.full(100, 4)))
    p = same.mean()
    assert se4 == pytest.approx(math.sqrt(p * (1 - p) / 100 * 100 / 99), rel=1e-9)
    n_eff, basis = pl.effective_n(p, 400, 100, se4)
    assert basis == "prompts" and n_eff == pytest.approx(99, rel=1e-9)
    assert pl.accuracy_se(1, 4, 1, 1, 4, 16) is None  # one prompt: nothing to say


def test_effective_n_is_conservative_where_the_data_say_nothing_and_rows_only_for_old_runs():
    assert pl.effective_n(0.0, 400, 100, 0.0) == (100.0, "prompts")  # none correct: a prompt counts once
    assert pl.effective_n(1.0, 400, 100, 0.0) == (100.0, "prompts")
    assert pl.effective_n(0.3, 400, None, None) == (400.0, "rows")  # no per-prompt counts on record
    assert pl.effective_n(0.5, 40, 10, 1e-6)[0] == 40.0  # never more than the rows


def test_the_clustered_interval_covers_where_a_rows_interval_does_not():
    """Prompts of varying difficulty, 8 samples each: the per-row Wilson interval under-covers, the
    clustered one holds its level."""
    rng = np.random.default_rng(1)
    hits_rows = hits_clustered = 0
    sims, prompts, samples, truth = 400, 60, 8, 0.3
    for _ in range(sims):
        p_i = rng.beta(0.6, 1.4, prompts)  # mean 0.3, strong between-prompt spread
        c = rng.binomial(samples, p_i)
        n = np.full(prompts, samples)
        p = c.sum() / n.sum()
        se = pl.accuracy_se(*_sums(c, n))
        n_eff, _ = pl.effective_n(p, int(n.sum()), prompts, se)
        lo, hi = pl.wilson(p, n_eff, 0.95)
        hits_clustered += lo <= truth <= hi
        lo, hi = pl.wilson(p, float(n.sum()), 0.95)
        hits_rows += lo <= truth <= hi
    assert hits_clustered / sims > 0.92
    assert hits_rows / sims < 0.85


def _acct(correct: int, labelled: int, tpc: float | None, cost: float | None, *, prompts: int | None = None,
          se: float | None = None) -> dict:
    return {"labelled_rows": labelled, "correct_rows": correct, "tokens_per_correct": tpc,
            "cost_per_1m_output_tokens": cost, "labelled_prompts": labelled if prompts is None else prompts,
            "accuracy_se": se}


KINDS = {"orig": "original", "q8": "quantized", "q4": "quantized", "noise-floor": "noise", "broken": "other"}


def _plane(accounting: dict, **kw) -> dict:
    out = pl.plane(accounting, KINDS, level=0.95, currency="EUR", **kw)
    assert encode(decode(Plane, out)) == out  # declared in summary.py, reads back unchanged
    return out


def _by(p: dict) -> dict:
    return {m["name"]: m for m in p["models"]}


def test_the_frontier_on_point_estimates_with_every_axis():
    p = _by(_plane({
        "orig": _acct(800, 1000, 100.0, 2.0),
        "q8": _acct(790, 1000, 101.0, 1.0),   # cheaper per token, about as accurate: on the frontier
        "q4": _acct(600, 1000, 150.0, 1.5),   # worse than q8 on every axis: dominated, clearly (not by orig: dearer)
        "noise-floor": _acct(800, 1000, 100.0, 2.0),  # a reference, never placed
        "broken": _acct(0, 0, None, None),    # no labelled rows: not placed
    }))
    assert p["orig"]["frontier"] is True and p["q8"]["frontier"] is True
    assert p["q4"]["frontier"] is False
    assert p["q4"]["dominated_by"] == [{"model": "q8", "within_ci": False}]
    assert p["noise-floor"]["frontier"] is None and p["noise-floor"]["accuracy"]["value"] == 0.8
    assert p["broken"]["frontier"] is None and p["broken"]["accuracy"] == {"value": None, "ci": None}
    lo, hi = p["orig"]["accuracy"]["ci"]
    assert lo < 0.8 < hi
    t = p["orig"]["tokens_per_correct"]
    assert t["ci"] == pytest.approx([80.0 / hi, 80.0 / lo])  # 80 tokens per labelled answer / accuracy bounds


def test_a_dominance_inside_the_intervals_is_flagged():
    # q8 is as cheap and a hair more accurate on these few prompts: it dominates the original on
    # point estimates, but the intervals overlap: the data do not settle it
    p = _by(_plane({"orig": _acct(30, 50, 40.0, 1.0), "q8": _acct(31, 50, 39.0, 1.0)}))
    assert p["q8"]["frontier"] is True and p["orig"]["frontier"] is False
    assert p["orig"]["dominated_by"] == [{"model": "q8", "within_ci": True}]


def test_ties_are_both_on_the_frontier_and_no_price_drops_the_cost_axis():
    out = _plane({"orig": _acct(50, 100, 20.0, None), "q8": _acct(50, 100, 20.0, None),
                  "q4": _acct(50, 100, 30.0, None)})
    p = _by(out)
    assert out["axes"] == ["accuracy", "tokens_per_correct"]
    assert any("no price configured" in n for n in out["notes"])
    assert p["orig"]["frontier"] and p["q8"]["frontier"] and p["q4"]["frontier"] is False
    assert p["q4"]["cost_per_1m_output_tokens"] is None
    # with a cost, the token-hungry q4 is on the frontier if it is the cheapest per token
    p = _by(_plane({"orig": _acct(50, 100, 20.0, 2.0), "q4": _acct(50, 100, 30.0, 1.0)}))
    assert p["orig"]["frontier"] and p["q4"]["frontier"]


def test_a_model_without_correct_answers_spends_infinitely_many_tokens_per_answer():
    out = _plane({"orig": _acct(0, 40, None, 2.0, prompts=10), "q8": _acct(0, 40, None, 1.0, prompts=10),
                  "q4": _acct(2, 40, 150.0, 3.0, prompts=10)})
    p = _by(out)
    assert p["orig"]["tokens_per_correct"] == {"value": None, "ci": None}
    assert p["orig"]["accuracy"]["ci"][0] == 0.0
    assert p["orig"]["accuracy"]["ci"][1] == pytest.approx(pl.wilson(0.0, 10, 0.95)[1])  # n_eff: the prompts
    assert p["q8"]["frontier"] and p["q4"]["frontier"]  # cheapest; the only one with correct answers
    assert p["orig"]["dominated_by"] == [{"model": "q8", "within_ci": True}]  # equally useless, dearer
    assert not any("no model answered" in n for n in out["notes"])
    out = _plane({"orig": _acct(0, 40, None, 2.0), "q8": _acct(0, 40, None, 1.0)})
    assert any("no model answered a labelled prompt correctly" in n for n in out["notes"])


def test_no_labelled_prompts_places_nothing_and_says_so():
    out = _plane({"orig": _acct(0, 0, None, 1.0), "q8": _acct(0, 0, None, 1.0)})
    assert [m["frontier"] for m in out["models"]] == [None, None]
    assert out["notes"] == ["no labelled prompts: accuracy is not measured (prompts need a reference answer)"]


def test_an_older_run_without_per_prompt_counts_says_its_interval_is_per_row():
    old = {"labelled_rows": 100, "correct_rows": 40, "tokens_per_correct": 50.0, "cost_per_1m_output_tokens": None}
    out = _plane({"orig": old})
    assert out["models"][0]["interval_basis"] == "rows"
    assert out["models"][0]["accuracy"]["ci"] == pytest.approx(list(pl.wilson(0.4, 100, 0.95)))
    assert any("treat rows as independent" in n for n in out["notes"])


def test_the_accountings_partition_sums_cluster_by_prompt():
    from cousins.orchestrate.accounting import _efficiency_partition
    from cousins.run.dataops import SIDE, union_schema

    schemas = {"prompt": pa.schema([("prompt_id", pa.string()), ("reference", pa.string())]),
               "gen": pa.schema([("prompt_id", pa.string()), ("output_text", pa.string()),
                                 ("output_tokens", pa.int32()), ("error", pa.string())])}
    rows = [{"prompt_id": "a", "reference": "4", SIDE: "prompt"}, {"prompt_id": "b", "reference": "7", SIDE: "prompt"},
            {"prompt_id": "c", "reference": None, SIDE: "prompt"}]
    gens = [("a", "it is 4", 3, None), ("a", "it is 4", 3, None), ("a", "five", 1, None),
            ("b", "7", 1, None), ("b", "no", 1, None), ("b", None, 0, "engine died"), ("c", "x", 9, None)]
    rows += [{"prompt_id": p, "output_text": t, "output_tokens": n, "error": e, SIDE: "gen"} for p, t, n, e in gens]
    block = pa.Table.from_pylist(rows, schema=union_schema(schemas))
    out = _efficiency_partition(block, schemas=schemas, rule=Rule("contains")).to_pylist()[0]
    # a: 2 of 3 correct; b: 1 of 2 (its error row left out); c: unlabelled
    assert out == {"labelled_rows": 5, "correct_rows": 3, "labelled_output_tokens": 9, "labelled_prompts": 2,
                   "sum_c2": 5.0, "sum_cn": 8.0, "sum_n2": 13.0}


def test_the_drift_table_ends_with_the_plane_or_says_it_is_not_measured():
    from cousins.drift.table import drift_table

    summary = {"cousins": [], "noise_floor": None, "prompts": 3, "score_topk": 20,
               "bootstrap": {"level": 0.95, "resamples": 10}}
    assert "capability against cost" not in drift_table(summary)  # a summary made before the plane
    text = drift_table({**summary, "plane": _plane({"orig": _acct(0, 0, None, None)})})
    assert text.endswith("\ncapability against cost: not measured (no labelled prompts)")
    text = drift_table({**summary, "plane": _plane({"orig": _acct(30, 50, 40.0, None), "q4": _acct(10, 50, 90.0, None)})})
    lines = text[text.index("capability against cost"):].splitlines()
    assert "frontier on accuracy, tok/correct)" in lines[0] and "EUR" in lines[0]
    assert lines[3].split()[:4] == ["orig", "original", "30/50", "60.0%"] and lines[3].endswith("yes")
    assert lines[4].endswith("no: orig") and lines[4].split()[6] == "90.0"
    assert lines[5].startswith("note: no price configured")
