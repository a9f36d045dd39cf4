"""Summaries of drift rows: every figure with a bootstrap confidence interval over prompts.

The unit of resampling is the prompt (all samples of a prompt move together): tokens of one answer
are not independent, and neither are the samples of one prompt. Every ratio figure (a token-weighted
mean such as KLD mean, or a rate) is Σ num / Σ den, so it is resampled from per-prompt sums
(sums.SUMS) as Σ w·num / Σ w·den, w a prompt's Poisson(1) weight in the resample: the diff's workers
add up Σ w·x per resample (resample.py) and the driver holds B numbers a column, whatever the
run's size. Quantiles of token KLD come from merged
histograms (sketch.py states their error), their CIs from Poisson-resampled histograms; Δp
quantiles from a linear histogram (within 5e-5, no CI); llama.cpp's Cor(ln PPL(Q), ln PPL(base))
from per-prompt sums of squares and cross products (no CI).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cousins.drift import metrics
from cousins.drift.aggregate import Merged, merge_table
from cousins.drift.options import MARGIN_BINS, margin_labels
from cousins.drift.resample import Sums, interval, ratios, spearman
from cousins.drift.sketch import DP_GRID, KLD_BOOT_GRID, KLD_GRID

__all__ = ["MARGIN_BINS", "QUANTILES", "DP_QUANTILES", "QUANTILE_ERROR", "Bootstrap", "BootstrapSpec", "summarise",
           "summary_of", "drift_table"]

# llama.cpp's `llama-perplexity --kl-divergence` set (its max and min are exact: kld_max, kld_min)
QUANTILES = {"kld_p999": 0.999, "kld_p99": 0.99, "kld_p95": 0.95, "kld_p90": 0.9, "kld_median": 0.5,
             "kld_p10": 0.1, "kld_p05": 0.05, "kld_p01": 0.01, "kld_p001": 0.001}
DP_QUANTILES = {"dp_p999": 0.999, "dp_p99": 0.99, "dp_p95": 0.95, "dp_p90": 0.9, "dp_p75": 0.75, "dp_median": 0.5,
                "dp_p25": 0.25, "dp_p10": 0.1, "dp_p05": 0.05, "dp_p01": 0.01, "dp_p001": 0.001}
QUANTILE_ERROR = (f"token KLD quantiles (kld_p*, kld_median) within a factor {KLD_GRID.ratio ** 0.5:.4f} of the "
                  f"exact ones where they are at least {KLD_GRID.lo:g} nats, read as 0 below (log histogram in "
                  f"{KLD_GRID.ratio - 1:.0%} steps); their CIs from {KLD_BOOT_GRID.ratio - 1:.1%} steps; Δp "
                  f"quantiles (dp_p*, dp_median) within {DP_GRID.step / 2:g} (linear histogram in steps of "
                  f"{DP_GRID.step:g}), no CI; minima and maxima exact")
_BLOCK = 100
_BLOCK_CELLS = 500_000  # resamples x prompts drawn at once at most (4 MB a block)


@dataclass(frozen=True)
class BootstrapSpec:
    """How CIs are drawn (the drift config's bootstrap, confidence and seed)."""

    resamples: int
    level: float
    seed: int
    quantile_resamples: int = 200  # quantiles resample histograms: fewer draws keep them cheap

    @classmethod
    def of(cls, drift) -> "BootstrapSpec":
        """The spec a drift config (`bootstrap`, `confidence`, `seed`) asks for."""
        return cls(resamples=drift.bootstrap, level=drift.confidence, seed=drift.seed)


class Bootstrap:
    """Multinomial resampling of a few thousand items held in memory (the homogenisation's pairs),
    drawn deterministically block by block; prompts' figures resample on the workers instead."""

    def __init__(self, n_clusters: int, spec: BootstrapSpec, resamples: int | None = None):
        self.n, self.spec = n_clusters, spec
        self.resamples = spec.resamples if resamples is None else resamples

    def blocks(self):
        rng = np.random.default_rng(self.spec.seed)
        left = self.resamples
        step = max(1, min(_BLOCK, _BLOCK_CELLS // max(self.n, 1)))
        while left > 0 and self.n > 0:
            b = min(step, left)
            idx = rng.integers(0, self.n, size=(b, self.n))
            # counts of each prompt in each resample (a multinomial draw), one bincount for the block
            flat = (idx + (np.arange(b) * self.n)[:, None]).ravel()
            del idx
            yield np.bincount(flat, minlength=b * self.n).reshape(b, self.n).astype(np.float64)
            left -= b

    def interval(self, stats: np.ndarray) -> list[float] | None:
        return interval(stats, self.spec.level)

    def ratios(self, figures: dict[str, tuple]) -> dict[str, dict]:
        """{name: (num, den[, transform])} per-cluster sums -> {name: {value, ci}} of
        transform(Σ num / Σ den), every figure over the same resamples."""
        names = list(figures)
        if not names:
            return {}
        num = np.column_stack([np.asarray(figures[k][0], dtype=np.float64) for k in names])
        den = np.column_stack([np.asarray(figures[k][1], dtype=np.float64) for k in names])
        fs = [figures[k][2] if len(figures[k]) > 2 and figures[k][2] is not None else (lambda x: x) for k in names]
        stats = []
        with np.errstate(divide="ignore", invalid="ignore"):
            for w in self.blocks():
                stats.append((w @ num) / (w @ den))
            stats = np.concatenate(stats) if stats else np.zeros((0, len(names)))
            out = {}
            for j, k in enumerate(names):
                total = den[:, j].sum()
                if total == 0:
                    out[k] = {"value": None, "ci": None}
                    continue
                out[k] = {"value": float(fs[j](num[:, j].sum() / total)), "ci": self.interval(fs[j](stats[:, j]))}
        return out

    def ratio(self, num: np.ndarray, den: np.ndarray, clusters: np.ndarray, transform=None) -> dict:
        """Σ num / Σ den (optionally transformed) with its interval; num, den per item of a cluster."""
        num_c = np.bincount(clusters, weights=num, minlength=self.n)
        den_c = np.bincount(clusters, weights=den, minlength=self.n)
        return self.ratios({"x": (num_c, den_c, transform)})["x"]

    def mean(self, values: np.ndarray, clusters: np.ndarray) -> dict:
        return self.ratio(values, np.ones_like(values), clusters)


def _quantiles(m: Merged, spec: BootstrapSpec) -> dict[str, dict]:
    out = {}
    for name, q in QUANTILES.items():
        value = KLD_GRID.quantile(m.kld, q, m.kld_max) if m.kld is not None else None
        ci = None
        if value is not None and m.kld_boot is not None and len(m.kld_boot):
            draws = np.asarray([np.nan if (v := KLD_BOOT_GRID.quantile(h, q, m.kld_max)) is None else v
                                for h in m.kld_boot])
            ci = Bootstrap(0, spec).interval(draws)
        out[name] = {"value": value, "ci": ci}
    return out


def _dp_quantiles(m: Merged) -> dict[str, dict]:
    return {name: {"value": DP_GRID.quantile(m.dp, q, m.dp_max, m.dp_min) if m.dp is not None else None, "ci": None}
            for name, q in DP_QUANTILES.items()}


def _se(n: float, s1: float, s2: float) -> float | None:
    """The standard error of a mean from Σx, Σx² over n values (None without them: drift rows
    written without the sums of squares)."""
    if n <= 1 or not math.isfinite(s1) or not math.isfinite(s2):
        return None
    return math.sqrt(max(s2 - s1 * s1 / n, 0.0) / (n - 1)) / math.sqrt(n)


def _correlation(n: float, a: float, b: float, aa: float, bb: float, ab: float) -> float | None:
    """Pearson's r from Σa, Σb, Σa², Σb², Σab over n pairs (llama.cpp's running sums)."""
    va, vb = n * aa - a * a, n * bb - b * b
    if n < 2 or not (va > 0 and vb > 0) or not math.isfinite(va * vb):
        return None
    return max(-1.0, min(1.0, (n * ab - a * b) / math.sqrt(va * vb)))


def mcnemar_p(b: float, c: float) -> float | None:
    """McNemar's exact test of paired correctness: the two-sided binomial p-value of b
    correct->wrong against c wrong->correct pairs (H0: either direction is as likely). None without
    a discordant pair. Pairs are rows: with several samples of a prompt they are not independent,
    and the p-value is then optimistic (the bootstrap CIs are clustered by prompt)."""
    from scipy.stats import binomtest

    b, c = int(round(b)), int(round(c))
    return float(binomtest(b, b + c, 0.5).pvalue) if b + c else None


def summary_of(m: Merged, kind: str, spec: BootstrapSpec, *, error: str | None = None,
               homogenisation: dict[str, np.ndarray] | None = None) -> dict:
    """One cousin's summary (the CousinSummary shape of summary.json) from its merged aggregates.
    homogenisation: per side (original, cousin), the similarities of the sampled pairs."""
    text_only = m.text_only
    c = m.sums
    out = {"name": m.cousin, "kind": kind, "text_only": text_only, "rows": m.rows,
           "tokens": int(c["T"].total) if m.prompts and not text_only else 0,
           "error_rows": m.error_rows, "error": error, "metrics": {}, "slices": {}}
    if m.prompts == 0:
        return out
    n = c["n"]
    f: dict[str, tuple] = {}
    if not text_only:
        T = c["T"]
        f.update(kld_mean=(c["kld"], T), same_top1=(c["same"], T), mean_dp=(c["dp"], T),
                 rms_dp=(c["dp2"], T, np.sqrt), ppl_original=(c["nll_o"], c["tokens"], np.exp),
                 ppl_cousin=(c["nll_c"], c["tokens"], np.exp), ppl_ratio=(c["nll_d"], c["tokens"], np.exp),
                 ln_ppl_ratio=(c["nll_d"], c["tokens"]), rest_mass_mean=(c["rest"], T),
                 rkld_mean=(c["rkld"], c["rkld_n"]), tail_mass_mean=(c["tail"], c["tail_n"]),
                 # per span (reasoning models): the original's thinking positions, then its answer's
                 kld_thinking=(c["kld_th"], c["T_th"]), kld_answer=(c["kld_ans"], c["T_ans"]),
                 same_top1_thinking=(c["same_th"], c["T_th"]), same_top1_answer=(c["same_ans"], c["T_ans"]))
        for i, label in enumerate(margin_labels()):
            f[f"margin {label} kld"] = (c[f"m{i}_kld"], c[f"m{i}_n"])
            f[f"margin {label} same"] = (c[f"m{i}_same"], c[f"m{i}_n"])
    f.update(exact_match=(c["exact"], n), first_divergence_mean=(c["fd"], c["fd_n"]), chrf=(c["chrf"], n),
             rouge_l=(c["rouge"], n),
             # Token efficiency: the cousin's output tokens per original output token, over all rows.
             length_ratio=(c["ctok"], c["otok"]), finish_changed=(c["finish"], n),
             accuracy_original=(c["co"], c["labelled"]), accuracy_cousin=(c["cc"], c["labelled"]),
             accuracy_delta=(c["cc"] - c["co"], c["labelled"]), flip_rate=(c["flip"], c["labelled"]),
             flip_correct_to_wrong=(c["flip_cw"], c["labelled"]), flip_wrong_to_correct=(c["flip_wc"], c["labelled"]),
             # reasoning models: how much longer the cousin thinks, and answers, and how often it
             # never finished thinking (over rows where either output has a thinking span)
             thinking_length_ratio=(c["th_c"], c["th_o"]), answer_length_ratio=(c["ans_c"], c["ans_o"]),
             unfinished_thinking_original=(c["unf_o"], c["think"]),
             unfinished_thinking_cousin=(c["unf_c"], c["think"]),
             # multiple choice by likelihood (cousins/drift/options.py): acc, acc_norm, flips, option KL
             mc_acc_original=(c["mc_co"], c["mc_n"]), mc_acc_cousin=(c["mc_cc"], c["mc_n"]),
             mc_acc_norm_original=(c["mc_no"], c["mc_n"]), mc_acc_norm_cousin=(c["mc_nc"], c["mc_n"]),
             mc_flip_rate=(c["mc_flip"], c["mc_n"]), mc_flip_correct_to_wrong=(c["mc_cw"], c["mc_n"]),
             mc_flip_wrong_to_correct=(c["mc_wc"], c["mc_n"]), option_kl_mean=(c["opt_kl"], c["opt_n"]))
    for i, label in enumerate(margin_labels()):
        f[f"option margin {label} kl"] = (c[f"om{i}_kl"], c[f"om{i}_n"])
        f[f"option margin {label} flip"] = (c[f"om{i}_flip"], c[f"om{i}_lab"])
    for side, name in (("o", "original"), ("c", "cousin")):
        for k in (1, 2):
            f[f"distinct{k}_{name}"] = (c[f"d{k}_{side}"], c[f"d{k}_{side}_n"])
        f[f"mean_length_{name}"] = (c["otok" if side == "o" else "ctok"], n)
    r = ratios(f, spec.level)

    m_ = out["metrics"]
    if not text_only:
        N, k1, k2 = c["T"].total, c["kld"].total, c["kld2"].total
        m_["kld_mean"] = {**r.pop("kld_mean"), "se": _se(N, k1, k2)}
        m_.update(_quantiles(m, spec))
        m_["kld_max"] = {"value": m.kld_max, "ci": None}
        m_["kld_min"] = {"value": m.kld_min, "ci": None}
        # Reverse KLD, KL(cousin ‖ original): exact mode only, over the positions where it is finite.
        m_["rkld_mean"] = {**r.pop("rkld_mean"), "se": _se(c["rkld_n"].total, c["rkld"].total, c["rkld2"].total)}
        m_["rkld_max"] = {"value": m.rkld_max, "ci": None}
        m_["tail_mass_mean"] = r.pop("tail_mass_mean")
        m_["tail_mass_max"] = {"value": m.tail_max, "ci": None}
        v = r["same_top1"]["value"]
        m_["same_top1"] = {**r.pop("same_top1"), "se": math.sqrt(v * (1 - v) / N) if v is not None else None}
        for k in ("mean_dp", "rms_dp", "ppl_original", "ppl_cousin", "ppl_ratio", "ln_ppl_ratio"):
            m_[k] = r.pop(k)
        m_["dp_max"] = {"value": m.dp_max, "ci": None}
        m_.update(_dp_quantiles(m))
        m_["dp_min"] = {"value": m.dp_min, "ci": None}
        # llama.cpp's uncertainty of mean ln(PPL_c/PPL_o): the s.e. of the per-token mean of
        # d_t = log p(y_t) − log q(y_t), Σd² = Σ nll_c² + Σ nll_o² − 2 Σ nll_o·nll_c
        n_tok, o, q_ = c["tokens"].total, c["nll_o"].total, c["nll_c"].total
        oo, qq, oq = c["nll_o2"].total, c["nll_c2"].total, c["nll_oc"].total
        m_["ln_ppl_ratio"]["se"] = _se(n_tok, q_ - o, qq + oo - 2 * oq)
        m_["ppl_correlation"] = {"value": _correlation(n_tok, o, q_, oo, qq, oq), "ci": None}
        out["slices"]["margin"] = {
            label: {"tokens": int(c[f"m{i}_n"].total), "kld_mean": r.pop(f"margin {label} kld"),
                    "same_top1": r.pop(f"margin {label} same")}
            for i, label in enumerate(margin_labels())}
        m_["rest_mass_mean"] = r.pop("rest_mass_mean")
        for k in ("kld_thinking", "kld_answer", "same_top1_thinking", "same_top1_answer"):
            m_[k] = r.pop(k)
    for k in ("exact_match", "first_divergence_mean", "chrf", "rouge_l", "length_ratio", "finish_changed",
              "accuracy_original", "accuracy_cousin", "accuracy_delta", "flip_rate", "flip_correct_to_wrong",
              "flip_wrong_to_correct", "thinking_length_ratio", "answer_length_ratio", "unfinished_thinking_original",
              "unfinished_thinking_cousin"):
        m_[k] = r.pop(k)
    m_["flip_mcnemar_p"] = {"value": mcnemar_p(c["flip_cw"].total, c["flip_wc"].total), "ci": None}
    for k in ("mc_acc_original", "mc_acc_cousin", "mc_acc_norm_original", "mc_acc_norm_cousin", "mc_flip_rate",
              "mc_flip_correct_to_wrong", "mc_flip_wrong_to_correct", "option_kl_mean"):
        m_[k] = r.pop(k)
    m_["mc_flip_mcnemar_p"] = {"value": mcnemar_p(c["mc_cw"].total, c["mc_wc"].total), "ci": None}
    m_["option_kl_flip_spearman"] = spearman(m.spear)
    out["slices"]["option_margin"] = {
        label: {"prompts": int(c[f"om{i}_n"].total), "option_kl": r.pop(f"option margin {label} kl"),
                "flip_rate": r.pop(f"option margin {label} flip")} for i, label in enumerate(margin_labels())}
    for side, key in (("original", "unp_o"), ("cousin", "unp_c")):  # judged not correct; a count, not a rate
        m_[f"unparsed_answers_{side}"] = {"value": c[key].total, "ci": None}
    for name in ("original", "cousin"):
        for k in (1, 2):
            m_[f"distinct{k}_{name}"] = r.pop(f"distinct{k}_{name}")
        m_[f"mean_length_{name}"] = r.pop(f"mean_length_{name}")
        sims = (homogenisation or {}).get(name, np.zeros(0))
        m_[f"homogenisation_{name}"] = Bootstrap(len(sims), spec).mean(sims, np.arange(len(sims)))
    out["slices"]["category"] = _category_slices(m.cats, spec, text_only)
    return out


def _category_slices(cats: dict[str, Sums], spec: BootstrapSpec, text_only: bool) -> dict:
    """Per category (over its first resample.CATEGORY_RESAMPLES resamples): flips, length, KLD."""
    out = {}
    for cat in sorted(cats):
        sub = cats[cat]
        f = {"flip_rate": (sub["flip"], sub["labelled"]), "length_ratio": (sub["ctok"], sub["otok"])}
        if not text_only:
            f.update(kld_mean=(sub["kld"], sub["T"]), same_top1=(sub["same"], sub["T"]))
        r = ratios(f, spec.level)
        out[cat] = {"rows": int(sub["n"].total),
                    **({} if text_only else {"kld_mean": r["kld_mean"], "same_top1": r["same_top1"]}),
                    "flip_rate": r["flip_rate"], "length_ratio": r["length_ratio"]}
    return out


def homogenisation_sims(texts: list[str], seed: int) -> np.ndarray:
    """The sampled pairs' similarities for answers listed in prompt order (metrics.pair_indices)."""
    pairs = metrics.pair_indices(len(texts), seed=seed)
    return metrics.jaccard_pairs(texts, pairs)


def summarise(name: str, kind: str, drift: pa.Table, spec: BootstrapSpec, *, text_only: bool = False,
              error: str | None = None) -> dict:
    """One cousin's summary from its drift rows in memory: the same aggregates the diff's workers
    make, merged as one partial (small tables and tests)."""
    m = merge_table(drift, text_only={name} if text_only else set(), seed=spec.seed, resamples=spec.resamples,
                    quantile_resamples=spec.quantile_resamples)
    merged = m.get(name) or Merged(name, text_only, 0)
    ok = drift.filter(pc.and_(pc.is_null(drift.column("error")), pc.equal(drift.column("sample_index"), 0)))
    ok = ok.sort_by([("prompt_id", "ascending")])
    sims = {side: homogenisation_sims([t or "" for t in ok.column(f"{side}_text").to_pylist()], spec.seed)
            for side in ("original", "cousin")}
    return summary_of(merged, kind, spec, error=error, homogenisation=sims)
