"""The diff's mergeable aggregates: log histograms whose quantiles keep their stated error, and
per-partition partials that merge into the same summary (figures and CIs) as resampling every
drift row in one process (tests/summary_reference.py, the code the aggregates replaced)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from cousins.drift import aggregate
from cousins.drift.resample import poisson_weights
from cousins.drift.sketch import DP_GRID, KLD_GRID, LENGTH_GRID
from cousins.drift.summary import BootstrapSpec, summarise, summary_of
from cousins.contract.schema import DRIFT

import summary_reference as reference
from drift_reference import homogenisation_pairs

SPEC = BootstrapSpec(resamples=300, level=0.95, seed=7)


@pytest.mark.parametrize("n", [1, 2, 7, 1_000, 200_000])
def test_quantiles_are_within_the_stated_error_of_numpys(n):
    rng = np.random.default_rng(n)
    data = {
        "lognormal": np.exp(rng.normal(-9, 3, n)),  # spans 1e-13 .. 1e-5 and beyond: both sides of lo
        "exponential": rng.exponential(0.01, n),
        "with zeros": np.where(rng.random(n) < 0.3, 0.0, rng.exponential(1.0, n)),
        "heavy tail": rng.pareto(1.5, n) * 1e-4,
    }
    bound = math.sqrt(KLD_GRID.ratio) * (1 + 1e-9)
    checked = 0
    for name, x in data.items():
        counts = KLD_GRID.counts(x)
        assert counts.sum() == n
        xs = np.sort(x)
        for q in (0.0, 0.5, 0.9, 0.99, 0.999, 1.0):
            est, exact = KLD_GRID.quantile(counts, q, float(x.max())), float(np.quantile(x, q))
            h = q * (n - 1)
            a, b = xs[math.floor(h)], xs[min(math.floor(h) + 1, n - 1)]
            if a >= KLD_GRID.lo and b < KLD_GRID.hi:  # the stated bound
                assert exact / bound <= est <= exact * bound, (name, q, est, exact)
                checked += 1
            elif b < KLD_GRID.lo:  # below the grid: read as 0
                assert est == 0.0 and exact < KLD_GRID.lo
    assert checked >= 10
    assert KLD_GRID.quantile(np.zeros(KLD_GRID.buckets), 0.5) is None


def test_histograms_and_poisson_weights_merge_across_workers():
    rng = np.random.default_rng(0)
    x = rng.exponential(0.1, 10_000)
    parts = np.array_split(x, 7)
    assert np.array_equal(sum(KLD_GRID.counts(p) for p in parts), KLD_GRID.counts(x))
    both = poisson_weights(["a", "b", "c"], 50, seed=3)
    assert np.array_equal(poisson_weights(["c", "a"], 50, seed=3), both[:, [2, 0]])  # by id, not position
    assert not np.array_equal(poisson_weights(["a"], 50, seed=4), both[:, [0]])
    assert abs(both.mean() - 1.0) < 0.3
    assert LENGTH_GRID.counts(np.array([0.0, 1.0, 100.0])).sum() == 3


def _drift(seed: int = 0, prompts: int = 60) -> pa.Table:
    """Drift rows of a token cousin ('q'), a text-only one ('t') and the noise floor: two samples a
    prompt, some rows failed, some prompts labelled, three categories, empty outputs."""
    rng = np.random.default_rng(seed)
    rows = []
    words = "the answer is four five six seven because sum of digits".split()
    for cousin in ("q", "t", "noise-floor"):
        for i in range(prompts):
            labelled = i % 3 != 0
            for s in range(2):
                r = {f.name: None for f in DRIFT}
                n = int(rng.integers(0, 30)) if i % 11 else 0
                otext = " ".join(rng.choice(words, n)) if n else ""
                ctext = " ".join(rng.choice(words, int(rng.integers(0, 30))))
                r.update(prompt_id=f"p{(i * 37) % prompts:03d}", sample_index=s, cousin=cousin,
                         category=["math", "chat", None][i % 3], original_text=otext, cousin_text=ctext,
                         original_tokens=n, cousin_tokens=len(ctext.split()), exact_match=bool(rng.random() < .2),
                         first_divergence=None if rng.random() < .2 else int(rng.integers(0, 10)),
                         chrf=float(rng.uniform(0, 100)), rouge_l=float(rng.random()),
                         finish_changed=bool(rng.random() < .1), length_ratio=len(ctext.split()) / n if n else None)
                if i % 4 == 1:  # a reasoning model's rows: thinking spans, some cut by max_tokens
                    r.update(thinking_original_tokens=int(rng.integers(0, n + 1)),
                             thinking_cousin_tokens=int(rng.integers(0, len(ctext.split()) + 1)),
                             thinking_finished_original=bool(rng.random() < .8),
                             thinking_finished_cousin=bool(rng.random() < .6))
                if i % 5 == 2 and s == 0:  # multiple choice by likelihood: sample 0 of some prompts
                    p, q = rng.dirichlet(np.ones(4)), rng.dirichlet(np.ones(4))
                    r.update(option_kl=float(np.sum(p * np.log(p / q))), option_margin=float(np.sort(p)[-1] - np.sort(p)[-2]),
                             option_original="A", option_cousin="B")
                    if labelled:
                        mo, mc = bool(rng.random() < .7), bool(rng.random() < .5)
                        r.update(mc_correct_original=mo, mc_correct_cousin=mc, mc_flip=mo != mc,
                                 mc_correct_norm_original=bool(rng.random() < .7),
                                 mc_correct_norm_cousin=bool(rng.random() < .5))
                if labelled:
                    co, cc = bool(rng.random() < .6), bool(rng.random() < .5)
                    r.update(correct_original=co, correct_cousin=cc, flip=co != cc,
                             unparsed_original=bool(rng.random() < .05), unparsed_cousin=bool(rng.random() < .1))
                if cousin != "t":
                    scale = 1e-6 if cousin == "noise-floor" else 0.05
                    kld = rng.exponential(scale, n) * np.where(rng.random(n) < .1, 0, 1)
                    rkld = (kld * rng.uniform(0.5, 2, n)).astype(np.float32).tolist()
                    for j in np.flatnonzero(rng.random(n) < .05):
                        rkld[j] = None  # an infinite reverse KLD
                    nll_o, nll_c = rng.exponential(2, n), rng.exponential(2, n)
                    r.update(rkld_tokens=rkld, tail_mass_tokens=(rng.random(n) * 1e-3).astype(np.float32).tolist(),
                             nll_original_sq=float((nll_o ** 2).sum()), nll_cousin_sq=float((nll_c ** 2).sum()),
                             nll_cross=float((nll_o * nll_c).sum()))
                    r.update(tokens=n, kld_tokens=kld.astype(np.float32).tolist(),
                             rest_mass_tokens=rng.random(n).astype(np.float32).tolist(),
                             margin_tokens=rng.random(n).astype(np.float32).tolist(),
                             same_top1_tokens=(rng.random(n) < .8).tolist(),
                             dp_tokens=rng.normal(0, .1, n).astype(np.float32).tolist(),
                             kld_mean=float(kld.mean()) if n else None, nll_original=float(nll_o.sum()),
                             nll_cousin=float(nll_c.sum()))
                if rng.random() < 0.05:
                    r["error"] = "cousin: scoring failed"
                rows.append(r)
    return pa.Table.from_pylist(rows, schema=DRIFT).sort_by([("prompt_id", "ascending"),
                                                             ("sample_index", "ascending")])


def _close(a, b, path="", quantile=None):
    if isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            _close(a[k], b[k], f"{path}/{k}",
                   quantile or ("kld" if k in reference.QUANTILES else "dp" if k in reference.DP_QUANTILES else None))
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]", quantile)
    elif isinstance(a, float) and quantile == "dp":  # the linear grid's bound
        assert b == pytest.approx(a, rel=0, abs=DP_GRID.step / 2 * (1 + 1e-6)), path
    elif isinstance(a, float) and quantile:
        if "/ci" not in path:  # values: the sketch's bound; CIs: another resampling scheme
            assert b == pytest.approx(a, rel=0.0101, abs=KLD_GRID.lo), path
    elif isinstance(a, float) and not math.isnan(a):
        assert b == pytest.approx(a, rel=1e-9, abs=1e-12), path
    else:
        assert a == b or (a != a and b != b), path


@pytest.mark.parametrize("partitions", [1, 4])
def test_partials_merge_into_the_row_by_row_summary(partitions):
    drift = _drift()
    prompts = sorted(set(drift.column("prompt_id").to_pylist()))
    groups = np.array_split(np.asarray(prompts, dtype=object), partitions)
    for cousin, text_only in (("q", False), ("t", True), ("noise-floor", False)):
        rows = drift.filter(pc.equal(drift.column("cousin"), cousin))
        parts = [aggregate.partial(cousin, rows.filter(pc.is_in(rows.column("prompt_id"), pa.array(g.tolist()))),
                                   token_level=not text_only, worst_n=5, seed=SPEC.seed, resamples=SPEC.resamples,
                                   quantile_resamples=SPEC.quantile_resamples, node=f"n{i}")
                 for i, g in enumerate(groups)]
        merged = aggregate.merge_all([aggregate.to_rows(parts[:2]), aggregate.to_rows(parts[2:])],
                                     {cousin: text_only}, worst_n=5)[cousin]
        assert merged.nodes == {f"n{i}" for i in range(partitions)} and merged.rows == rows.num_rows
        want = reference.summarise(cousin, "quantized", rows, SPEC, text_only=text_only)
        ok0 = rows.filter(pc.and_(pc.is_null(rows.column("error")), pc.equal(rows.column("sample_index"), 0)))
        sims = {side: homogenisation_pairs(
            [t or "" for t in ok0.column(f"{side}_text").to_pylist()], seed=SPEC.seed) for side in ("original", "cousin")}
        got = summary_of(merged, "quantized", SPEC, homogenisation=sims)
        _close(want, got)
        _close(want, summarise(cousin, "quantized", rows, SPEC, text_only=text_only))
        if not text_only:
            for q in reference.QUANTILES:
                lo, hi = got["metrics"][q]["ci"]
                assert lo <= got["metrics"][q]["value"] * 1.05 and hi >= got["metrics"][q]["value"] / 1.05
        # the worst rows: the same top-N as sorting every row
        ok = rows.filter(pc.is_null(rows.column("error")))
        top = aggregate.top_rows(ok, text_only, 5)
        assert merged.view().worst.to_pylist() == top.to_pylist()
        key = "chrf" if text_only else "kld_mean"
        vals = [v for v in ok.column(key).to_pylist() if v is not None]
        assert top.column(key)[0].as_py() == (min(vals) if text_only else max(vals))


def test_a_cousin_without_rows_or_with_only_failures():
    drift = _drift(prompts=4)
    failed = drift.filter(pc.equal(drift.column("cousin"), "q")).set_column(
        DRIFT.get_field_index("error"), "error", pa.array(["boom"] * 8, pa.string()))
    s = summarise("q", "quantized", failed, SPEC)
    assert s["rows"] == 8 and s["error_rows"] == 8 and s["metrics"] == {} and s["tokens"] == 0
    empty = summary_of(aggregate.Merged("x", False, 3), "quantized", SPEC, error="no generations")
    assert empty["rows"] == 0 and empty["error"] == "no generations"
    assert aggregate.Merged("x", False, 3).view().kld is None


def test_llama_cpp_statistics_equal_a_brute_force_computation_over_every_token():
    """Drift rows made by the compare step from scores (and exact KLD rows) whose per-token values
    are known; the summary's KLD and Δp percentiles, extremes, reverse KLD, Cor(ln PPL(Q),
    ln PPL(base)) and mean ln(PPL_c/PPL_o) ± s.e. against numpy over every token, within the
    histograms' stated errors."""
    from cousins.contract import schema
    from cousins.drift.compare import compare
    from cousins.drift.summary import DP_QUANTILES, QUANTILES

    rng = np.random.default_rng(11)
    keys = [(f"p{i:03d}", s) for i in range(80) for s in range(2)]
    lengths = rng.integers(1, 60, len(keys))
    outs = [rng.integers(0, 1000, n).tolist() for n in lengths]
    p_y = [np.log(rng.uniform(0.05, 1.0, n)) for n in lengths]
    q_y = [np.minimum(lp + rng.normal(0, 0.3, len(lp)), 0.0) for lp in p_y]  # correlated, ≤ 0
    kld = [np.where(rng.random(n) < .1, 0.0, rng.lognormal(-6, 2.5, n)) for n in lengths]
    rkld = [k * rng.uniform(0.5, 2.0, len(k)) for k in kld]
    n = len(keys)
    gens = pa.table({"prompt_id": [k[0] for k in keys], "sample_index": [k[1] for k in keys], "category": [None] * n,
                     "output_text": ["a b"] * n, "output_token_ids": outs, "finish_reason": ["stop"] * n,
                     "output_tokens": lengths.tolist(), "error": [None] * n})

    def scores(lps):
        return pa.table({"prompt_id": [k[0] for k in keys], "sample_index": [k[1] for k in keys],
                         "topk_token_ids": [[[t] for t in o] for o in outs],
                         "topk_logprobs": [[[float(x)] for x in lp] for lp in lps],
                         "token_logprobs": [lp.astype(np.float32).tolist() for lp in lps], "error": [None] * n})

    exact = pa.table({"prompt_id": [k[0] for k in keys], "sample_index": [k[1] for k in keys], "model": ["c"] * n,
                      "kld_tokens": [k.astype(np.float32).tolist() for k in kld],
                      "rkld_tokens": [[None if j == 0 and i % 7 == 0 else float(x) for j, x in
                                       enumerate(r.astype(np.float32))] for i, r in enumerate(rkld)],
                      "tail_mass_tokens": [np.full(len(k), 1e-3 * (i % 5), np.float32).tolist()
                                           for i, k in enumerate(kld)],
                      "engine_time_s": [0.0] * n, "error": [None] * n}, schema=schema.KLD)
    drift = compare("c", gens, gens, scores(p_y), scores(q_y), exact_kld=exact)
    assert drift.column("error").null_count == n
    m = summarise("c", "quantized", drift, SPEC)["metrics"]

    a = np.concatenate(p_y).astype(np.float32).astype(np.float64)
    b = np.concatenate(q_y).astype(np.float32).astype(np.float64)
    assert m["ppl_correlation"]["value"] == pytest.approx(np.corrcoef(a, b)[0, 1], rel=1e-9)
    d = a - b  # llama.cpp: ln(PPL(Q)/PPL(base)) = mean of log p(y_t) − log q(y_t)
    assert m["ln_ppl_ratio"]["value"] == pytest.approx(d.mean(), rel=1e-9)
    assert m["ln_ppl_ratio"]["se"] == pytest.approx(math.sqrt((np.mean(d * d) - d.mean() ** 2) / (len(d) - 1)), rel=1e-6)
    dp = (np.exp(b) - np.exp(a)).astype(np.float32).astype(np.float64)
    for name, q in DP_QUANTILES.items():
        assert abs(m[name]["value"] - np.quantile(dp, q)) <= DP_GRID.step / 2 * (1 + 1e-6), name
    assert (m["dp_min"]["value"], m["dp_max"]["value"]) == (dp.min(), dp.max())
    assert m["rms_dp"]["value"] == pytest.approx(math.sqrt(np.mean(dp * dp)), rel=1e-6)
    k = np.concatenate(kld).astype(np.float32).astype(np.float64)
    ks = np.sort(k)
    for name, q in QUANTILES.items():
        h = q * (len(k) - 1)
        lo = ks[math.floor(h)]
        exact_q, est = float(np.quantile(k, q)), m[name]["value"]
        if lo >= KLD_GRID.lo:
            assert exact_q / math.sqrt(KLD_GRID.ratio) <= est * (1 + 1e-9) and est <= exact_q * math.sqrt(KLD_GRID.ratio) * (1 + 1e-9), name
        else:
            assert est <= max(exact_q, KLD_GRID.lo) * math.sqrt(KLD_GRID.ratio), name
    assert (m["kld_min"]["value"], m["kld_max"]["value"]) == (k.min(), k.max())
    r = [x for row in exact.column("rkld_tokens").to_pylist() for x in row if x is not None]
    assert m["rkld_mean"]["value"] == pytest.approx(np.mean(r), rel=1e-9) and m["rkld_max"]["value"] == max(r)
    assert m["rkld_mean"]["se"] == pytest.approx(np.std(r, ddof=1) / math.sqrt(len(r)), rel=1e-6)
    assert m["tail_mass_max"]["value"] == pytest.approx(4e-3, rel=1e-6)
