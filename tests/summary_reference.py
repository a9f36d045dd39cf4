"""The summary as it was computed before the diff ran on workers: every drift row in one process,
resampled row by row. Kept as the oracle the mergeable aggregates are tested against (same
figures, same CIs); not used by the package. Prompts are resampled with the package's Poisson
weights (resample.poisson_weights, the random draws both sides share); the homogenisation's pairs
multinomially, as the package does; Spearman's correlation is scipy's on every prompt."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binomtest
import pyarrow as pa
import pyarrow.compute as pc

from cousins.drift import metrics
from cousins.drift.resample import poisson_weights
from cousins.drift.summary import BootstrapSpec

from drift_reference import homogenisation_pairs

MARGIN_BINS = (0.0, 0.1, 0.3, 0.6, 1.0)
QUANTILES = {"kld_p999": 0.999, "kld_p99": 0.99, "kld_p95": 0.95, "kld_p90": 0.9, "kld_median": 0.5,
             "kld_p10": 0.1, "kld_p05": 0.05, "kld_p01": 0.01, "kld_p001": 0.001}
DP_QUANTILES = {"dp_p999": 0.999, "dp_p99": 0.99, "dp_p95": 0.95, "dp_p90": 0.9, "dp_p75": 0.75, "dp_median": 0.5,
                "dp_p25": 0.25, "dp_p10": 0.1, "dp_p05": 0.05, "dp_p01": 0.01, "dp_p001": 0.001}
_BLOCK = 100


class Bootstrap:
    """Resampling weights of clusters: prompts (a list of their ids: Poisson weights by id) or
    pairs (a count: multinomial draws), drawn deterministically block by block (and kept, when
    they fit in memory, so every figure of a summary reuses the same draws)."""

    _CACHE_CELLS = 50_000_000  # resamples x prompts kept in memory at most

    def __init__(self, clusters: int | list[str], spec: BootstrapSpec, resamples: int | None = None):
        self.ids = None if isinstance(clusters, int) else list(clusters)
        self.n, self.spec = (clusters if self.ids is None else len(self.ids)), spec
        self.resamples = spec.resamples if resamples is None else resamples
        self._kept: list[np.ndarray] | None = None

    def _draw(self):
        if self.ids is not None:
            w = poisson_weights(self.ids, self.resamples, self.spec.seed)
            for start in range(0, self.resamples, _BLOCK):
                yield w[start:start + _BLOCK]
            return
        rng = np.random.default_rng(self.spec.seed)
        left = self.resamples
        while left > 0 and self.n > 0:
            b = min(_BLOCK, left)
            idx = rng.integers(0, self.n, size=(b, self.n))
            # counts of each prompt in each resample (a multinomial draw), one bincount for the block
            flat = (idx + (np.arange(b) * self.n)[:, None]).ravel()
            yield np.bincount(flat, minlength=b * self.n).reshape(b, self.n).astype(np.float64)
            left -= b

    def blocks(self):
        if self._kept is not None:
            yield from self._kept
            return
        if self.resamples * self.n > self._CACHE_CELLS:
            yield from self._draw()
            return
        self._kept = list(self._draw())
        yield from self._kept

    def interval(self, stats: np.ndarray) -> list[float] | None:
        stats = stats[np.isfinite(stats)]
        if not len(stats):
            return None
        a = (1 - self.spec.level) / 2
        lo, hi = np.quantile(stats, [a, 1 - a])
        return [float(lo), float(hi)]

    def ratio(self, num: np.ndarray, den: np.ndarray, clusters: np.ndarray, transform=None) -> dict:
        """Σ num / Σ den (optionally transformed) with its interval; num, den per item of a cluster."""
        num_c = np.bincount(clusters, weights=num, minlength=self.n)
        den_c = np.bincount(clusters, weights=den, minlength=self.n)
        total = den_c.sum()
        if total == 0:
            return {"value": None, "ci": None}
        f = transform or (lambda x: x)
        stats = []
        with np.errstate(divide="ignore", invalid="ignore"):
            for w in self.blocks():
                stats.append(f((w @ num_c) / (w @ den_c)))
        return {"value": float(f(num_c.sum() / total)), "ci": self.interval(np.concatenate(stats))}

    def quantiles(self, values: np.ndarray, clusters: np.ndarray, qs: dict[str, float]) -> dict[str, dict]:
        if not len(values):
            return {name: {"value": None, "ci": None} for name in qs}
        order = np.argsort(values, kind="stable")
        v, c = values[order], clusters[order]
        out = {name: {"value": float(np.quantile(values, q))} for name, q in qs.items()}
        draws: dict[str, list[float]] = {name: [] for name in qs}
        sub = Bootstrap(self.ids, self.spec, resamples=self.spec.quantile_resamples)
        rows_per_step = max(1, 20_000_000 // len(v))  # bound the (draws x tokens) matrix
        for block in sub.blocks():
            for start in range(0, len(block), rows_per_step):
                cum = np.cumsum(block[start:start + rows_per_step][:, c], axis=1)  # weights in value order
                for name, q in qs.items():
                    idx = (cum < q * cum[:, -1:]).sum(axis=1)
                    draws[name].extend(v[np.minimum(idx, len(v) - 1)].tolist())
        for name in qs:
            out[name]["ci"] = self.interval(np.asarray(draws[name]))
        return out

    def mean(self, values: np.ndarray, clusters: np.ndarray) -> dict:
        return self.ratio(values, np.ones_like(values), clusters)


def _flat(table: pa.Table, column: str, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """A list column's values flattened, with the row index of each value."""
    col = table.column(column).combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy()
    values = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(dtype)
    return values, np.repeat(np.arange(table.num_rows), lengths)


def _col(table: pa.Table, name: str) -> np.ndarray:
    """A numeric or boolean column as float64 with NaN for nulls."""
    return np.asarray([np.nan if x is None else float(x) for x in table.column(name).to_pylist()])


def summarise(name: str, kind: str, drift: pa.Table, spec: BootstrapSpec, *, text_only: bool = False,
              error: str | None = None) -> dict:
    """One cousin's summary (the CousinSummary shape of summary.json) from its drift rows."""
    ok = drift.filter(pc.is_null(drift.column("error")))
    out = {"name": name, "kind": kind, "text_only": text_only, "rows": drift.num_rows, "tokens": 0,
           "error_rows": drift.num_rows - ok.num_rows, "error": error, "metrics": {}, "slices": {}}
    if ok.num_rows == 0:
        return out
    prompts = ok.column("prompt_id").to_pylist()
    uniq = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    row_cluster = np.asarray([uniq[p] for p in prompts])
    boot = Bootstrap(list(uniq), spec)
    m = out["metrics"]

    if not text_only:
        kld, tok_row = _flat(ok, "kld_tokens")
        tok_cluster = row_cluster[tok_row]
        same, _ = _flat(ok, "same_top1_tokens")
        dp, _ = _flat(ok, "dp_tokens")
        ones = np.ones_like(kld)
        out["tokens"] = int(len(kld))
        m["kld_mean"] = boot.ratio(kld, ones, tok_cluster)
        m["kld_mean"]["se"] = float(kld.std(ddof=1) / math.sqrt(len(kld))) if len(kld) > 1 else None
        m.update(boot.quantiles(kld, tok_cluster, QUANTILES))
        m["kld_max"] = {"value": float(kld.max()) if len(kld) else None, "ci": None}
        m["kld_min"] = {"value": float(kld.min()) if len(kld) else None, "ci": None}
        for name, column in (("rkld", "rkld_tokens"), ("tail_mass", "tail_mass_tokens")):
            v, v_row = _flat(ok, column)
            has = np.isfinite(v)
            m[f"{name}_mean"] = boot.ratio(np.where(has, v, 0.0), has.astype(float), row_cluster[v_row])
            m[f"{name}_max"] = {"value": float(v[has].max()) if has.any() else None, "ci": None}
        good = _flat(ok, "rkld_tokens")[0]
        good = good[np.isfinite(good)]
        if len(good) > 1:  # (no reverse KLD in top-k mode: the summary then has no s.e. for it)
            m["rkld_mean"]["se"] = float(good.std(ddof=1) / math.sqrt(len(good)))
        m["same_top1"] = boot.ratio(same, ones, tok_cluster)
        f = m["same_top1"]["value"]
        m["same_top1"]["se"] = math.sqrt(f * (1 - f) / len(same)) if f is not None else None
        m["mean_dp"] = boot.ratio(dp, ones, tok_cluster)
        m["rms_dp"] = boot.ratio(dp * dp, ones, tok_cluster, transform=np.sqrt)
        tokens = _col(ok, "tokens")
        nll_o, nll_c = _col(ok, "nll_original"), _col(ok, "nll_cousin")
        m["ppl_original"] = boot.ratio(nll_o, tokens, row_cluster, transform=np.exp)
        m["ppl_cousin"] = boot.ratio(nll_c, tokens, row_cluster, transform=np.exp)
        m["ppl_ratio"] = boot.ratio(nll_c - nll_o, tokens, row_cluster, transform=np.exp)
        m["ln_ppl_ratio"] = boot.ratio(nll_c - nll_o, tokens, row_cluster)
        n, oo, cc2, oc = tokens.sum(), _col(ok, "nll_original_sq").sum(), _col(ok, "nll_cousin_sq").sum(), \
            _col(ok, "nll_cross").sum()
        d, d2 = nll_c.sum() - nll_o.sum(), cc2 + oo - 2 * oc
        m["ln_ppl_ratio"]["se"] = math.sqrt(max(d2 / n - (d / n) ** 2, 0.0) / (n - 1)) if n > 1 else None
        va, vb = n * oo - nll_o.sum() ** 2, n * cc2 - nll_c.sum() ** 2
        m["ppl_correlation"] = {"value": float((n * oc - nll_o.sum() * nll_c.sum()) / math.sqrt(va * vb)), "ci": None}
        m.update({k: {"value": float(np.quantile(dp, q)) if len(dp) else None, "ci": None}
                  for k, q in DP_QUANTILES.items()})
        m["dp_min"] = {"value": float(dp.min()) if len(dp) else None, "ci": None}
        m["dp_max"] = {"value": float(dp.max()) if len(dp) else None, "ci": None}
        margin, _ = _flat(ok, "margin_tokens")
        out["slices"]["margin"] = _margin_slices(boot, kld, same, margin, tok_cluster)
        m["rest_mass_mean"] = boot.ratio(_flat(ok, "rest_mass_tokens")[0], ones, tok_cluster)
        # per span, row by row: the original's first thinking_original_tokens positions think
        th_tok, in_th, in_ans = _col(ok, "thinking_original_tokens"), [], []
        for i in range(ok.num_rows):
            n_i = int((tok_row == i).sum())
            has = not np.isnan(th_tok[i])
            in_th += [has and t < th_tok[i] for t in range(n_i)]
            in_ans += [has and t >= th_tok[i] for t in range(n_i)]
        for span, sel in (("thinking", np.asarray(in_th, bool)), ("answer", np.asarray(in_ans, bool))):
            m[f"kld_{span}"] = boot.ratio(np.where(sel, kld, 0.0), sel.astype(float), tok_cluster)
            m[f"same_top1_{span}"] = boot.ratio(np.where(sel, same, 0.0), sel.astype(float), tok_cluster)

    rows = np.ones(ok.num_rows)
    m["exact_match"] = boot.ratio(_col(ok, "exact_match"), rows, row_cluster)
    fd = _col(ok, "first_divergence")
    has_fd = ~np.isnan(fd)
    m["first_divergence_mean"] = boot.ratio(np.nan_to_num(fd), has_fd.astype(float), row_cluster)
    m["chrf"] = boot.mean(_col(ok, "chrf"), row_cluster)
    m["rouge_l"] = boot.mean(_col(ok, "rouge_l"), row_cluster)
    # Token efficiency: the cousin's output tokens per original output token, over all rows.
    m["length_ratio"] = boot.ratio(_col(ok, "cousin_tokens"), _col(ok, "original_tokens"), row_cluster)
    m["finish_changed"] = boot.mean(_col(ok, "finish_changed"), row_cluster)
    co, cc = _col(ok, "correct_original"), _col(ok, "correct_cousin")
    labelled = (~np.isnan(co)).astype(float)
    co, cc = np.nan_to_num(co), np.nan_to_num(cc)
    m["accuracy_original"] = boot.ratio(co, labelled, row_cluster)
    m["accuracy_cousin"] = boot.ratio(cc, labelled, row_cluster)
    m["accuracy_delta"] = boot.ratio(cc - co, labelled, row_cluster)
    m["flip_rate"] = boot.ratio(np.nan_to_num(_col(ok, "flip")), labelled, row_cluster)
    cw, wc = co * (1 - cc) * labelled, (1 - co) * cc * labelled  # row by row: lost, gained
    m["flip_correct_to_wrong"] = boot.ratio(cw, labelled, row_cluster)
    m["flip_wrong_to_correct"] = boot.ratio(wc, labelled, row_cluster)
    b, c = int(cw.sum()), int(wc.sum())
    m["flip_mcnemar_p"] = {"value": float(binomtest(b, b + c, 0.5).pvalue) if b + c else None, "ci": None}
    for side in ("original", "cousin"):
        m[f"unparsed_answers_{side}"] = {"value": float(np.nan_to_num(_col(ok, f"unparsed_{side}")).sum()), "ci": None}
    th_o, th_c = _col(ok, "thinking_original_tokens"), _col(ok, "thinking_cousin_tokens")
    has = (~np.isnan(th_o)).astype(float)
    m["thinking_length_ratio"] = boot.ratio(np.nan_to_num(th_c), np.nan_to_num(th_o), row_cluster)
    m["answer_length_ratio"] = boot.ratio(_col(ok, "cousin_tokens") - np.nan_to_num(th_c),
                                          _col(ok, "original_tokens") - np.nan_to_num(th_o), row_cluster)
    for side in ("original", "cousin"):
        done = np.nan_to_num(_col(ok, f"thinking_finished_{side}"), nan=1.0)
        m[f"unfinished_thinking_{side}"] = boot.ratio(has * (1 - done), has, row_cluster)
    m.update(_options(ok, boot, row_cluster, out["slices"]))
    m.update(_style(ok, boot, row_cluster, spec))
    out["slices"]["category"] = _category_slices(ok, spec, text_only)
    return out


def _style(ok: pa.Table, boot: Bootstrap, row_cluster: np.ndarray, spec: BootstrapSpec) -> dict:
    out = {}
    for side in ("original", "cousin"):
        texts = [t or "" for t in ok.column(f"{side}_text").to_pylist()]
        for n in (1, 2):
            d = np.asarray([np.nan if (x := metrics.distinct_n(t, n)) is None else x for t in texts])
            has = ~np.isnan(d)
            out[f"distinct{n}_{side}"] = boot.ratio(np.nan_to_num(d), has.astype(float), row_cluster)
        out[f"mean_length_{side}"] = boot.mean(_col(ok, f"{side}_tokens"), row_cluster)
        # One answer per prompt (sample 0) so the pairs compare different prompts.
        first = [t for t, s in zip(texts, ok.column("sample_index").to_pylist()) if s == 0]
        sims = homogenisation_pairs(first, seed=spec.seed)
        pair_boot = Bootstrap(len(sims), spec)
        out[f"homogenisation_{side}"] = pair_boot.mean(sims, np.arange(len(sims)))
    return out


def _options(ok: pa.Table, boot: Bootstrap, row_cluster: np.ndarray, slices: dict) -> dict:
    """Multiple choice by likelihood, row by row; the KL-flip correlation over prompts' means."""
    from scipy.stats import spearmanr

    m = {}
    mo, mc = _col(ok, "mc_correct_original"), _col(ok, "mc_correct_cousin")
    lab = (~np.isnan(mo)).astype(float)
    mo, mc = np.nan_to_num(mo), np.nan_to_num(mc)
    flip = np.nan_to_num(_col(ok, "mc_flip"))
    for key, v in (("mc_acc_original", mo), ("mc_acc_cousin", mc), ("mc_flip_rate", flip),
                   ("mc_acc_norm_original", np.nan_to_num(_col(ok, "mc_correct_norm_original"))),
                   ("mc_acc_norm_cousin", np.nan_to_num(_col(ok, "mc_correct_norm_cousin"))),
                   ("mc_flip_correct_to_wrong", mo * (1 - mc) * lab), ("mc_flip_wrong_to_correct", (1 - mo) * mc * lab)):
        m[key] = boot.ratio(v, lab, row_cluster)
    b, c = int((mo * (1 - mc) * lab).sum()), int(((1 - mo) * mc * lab).sum())
    m["mc_flip_mcnemar_p"] = {"value": float(binomtest(b, b + c, 0.5).pvalue) if b + c else None, "ci": None}
    kl, margin = _col(ok, "option_kl"), _col(ok, "option_margin")
    has = ~np.isnan(kl)
    m["option_kl_mean"] = boot.ratio(np.where(has, kl, 0.0), has.astype(float), row_cluster)
    per = {}
    for p, k, f, lb in zip(ok.column("prompt_id").to_pylist(), kl, flip, lab):
        acc = per.setdefault(p, [0.0, 0, 0.0, 0])
        if not np.isnan(k):
            acc[0] += k
            acc[1] += 1
        acc[2] += f * lb
        acc[3] += lb
    both = [(a[0] / a[1], a[2] / a[3]) for a in per.values() if a[1] and a[3]]
    x, y = np.asarray([b[0] for b in both]), np.asarray([b[1] for b in both])
    if len(both) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
        r = spearmanr(x, y)
        m["option_kl_flip_spearman"] = {"value": float(r.statistic), "ci": None, "p": float(r.pvalue),
                                        "prompts": len(both)}
    else:
        m["option_kl_flip_spearman"] = {"value": None, "ci": None, "prompts": len(both)}
    edges, out = list(MARGIN_BINS), {}
    for i, (lo, hi) in enumerate(zip(edges, edges[1:])):
        last = i == len(edges) - 2
        sel = has & (np.nan_to_num(margin, nan=-1) >= lo) & ((margin <= hi) if last else (margin < hi))
        out[f"[{lo:.1f},{hi:.1f}{']' if last else ')'}"] = {
            "prompts": int(sel.sum()), "option_kl": boot.ratio(np.where(sel, kl, 0.0), sel.astype(float), row_cluster),
            "flip_rate": boot.ratio(np.where(sel, flip * lab, 0.0), (sel * lab).astype(float), row_cluster)}
    slices["option_margin"] = out
    return m


def _margin_slices(boot: Bootstrap, kld, same, margin, clusters) -> dict:
    out = {}
    edges = list(MARGIN_BINS)
    for i, (lo, hi) in enumerate(zip(edges, edges[1:])):
        last = i == len(edges) - 2
        sel = (margin >= lo) & ((margin <= hi) if last else (margin < hi))
        label = f"[{lo:.1f},{hi:.1f}{']' if last else ')'}"
        ones = sel.astype(float)
        out[label] = {"tokens": int(sel.sum()),
                      "kld_mean": boot.ratio(np.where(sel, kld, 0.0), ones, clusters),
                      "same_top1": boot.ratio(np.where(sel, same, 0.0), ones, clusters)}
    return out


def _category_slices(ok: pa.Table, spec: BootstrapSpec, text_only: bool) -> dict:
    cats = ["(none)" if c is None else c for c in ok.column("category").to_pylist()]
    out = {}
    small = BootstrapSpec(resamples=min(spec.resamples, 200), level=spec.level, seed=spec.seed,
                          quantile_resamples=0)
    for cat in sorted(set(cats)):
        sub = ok.filter(pa.array([c == cat for c in cats]))
        prompts = sub.column("prompt_id").to_pylist()
        uniq = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        clusters = np.asarray([uniq[p] for p in prompts])
        boot = Bootstrap(list(uniq), small)
        s = {"rows": sub.num_rows}
        if not text_only:
            kld, tok_row = _flat(sub, "kld_tokens")
            same, _ = _flat(sub, "same_top1_tokens")
            s["kld_mean"] = boot.ratio(kld, np.ones_like(kld), clusters[tok_row])
            s["same_top1"] = boot.ratio(same, np.ones_like(same), clusters[tok_row])
        co = _col(sub, "correct_original")
        s["flip_rate"] = boot.ratio(np.nan_to_num(_col(sub, "flip")), (~np.isnan(co)).astype(float), clusters)
        s["length_ratio"] = boot.ratio(_col(sub, "cousin_tokens"), _col(sub, "original_tokens"), clusters)
        out[cat] = s
    return out


