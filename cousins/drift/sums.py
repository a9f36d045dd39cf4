"""Per-prompt sums of one cousin's drift rows (SUMS: a few dozen numbers a prompt): every ratio
figure of the summary is Σ num / Σ den over prompts of these columns. Made on the diff's workers,
where they are resampled (resample.py) and dropped; they never reach the driver."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from cousins.drift import metrics
from cousins.drift.options import MARGIN_BINS, OPTION_SUMS, margin_bins, option_sums
from cousins.drift.spans import SPAN_SUMS, col as _col, flat as _flat, span_token_sums, thinking_sums

TOKEN_SUMS = ["T", "kld", "kld2", "same", "dp", "dp2", "rest", "rkld", "rkld2", "rkld_n", "tail", "tail_n", *SPAN_SUMS,
              *[f"m{i}_{k}" for i in range(len(MARGIN_BINS) - 1) for k in ("n", "kld", "same")]]
ROW_SUMS = ["n", "tokens", "nll_o", "nll_c", "nll_d", "nll_o2", "nll_c2", "nll_oc", "exact", "fd", "fd_n", "chrf", "rouge", "ctok", "otok",
            "finish", "co", "cc", "labelled", "flip", "flip_cw", "flip_wc", "has0",
            "think", "th_o", "th_c", "unf_o", "unf_c", "ans_o", "ans_c", "unp_o", "unp_c",
            *[f"d{n}_{side}{x}" for side in ("o", "c") for n in (1, 2) for x in ("", "_n")], *OPTION_SUMS]
SUMS = pa.schema([("prompt_id", pa.string()), ("category", pa.string()),
                  *[(c, pa.float64()) for c in ROW_SUMS + TOKEN_SUMS]])
FIGURE_SUMS = tuple(ROW_SUMS + TOKEN_SUMS)

def prompt_sums(ok: pa.Table, token_level: bool) -> pa.Table:
    """Per-prompt sums (SUMS) of one cousin's drift rows without an error, sorted by prompt id."""
    if ok.num_rows == 0:
        return SUMS.empty_table()
    pids = np.asarray(ok.column("prompt_id").to_pylist(), dtype=object)
    uniq, inv = np.unique(pids, return_inverse=True)
    inv = inv.reshape(-1)
    P = len(uniq)

    def per_prompt(values: np.ndarray, where: np.ndarray = inv) -> np.ndarray:
        return np.bincount(where, weights=values, minlength=P)

    out = {c: np.zeros(P) for c in ROW_SUMS + TOKEN_SUMS}
    ones = np.ones(ok.num_rows)
    tokens, nll_o, nll_c = _col(ok, "tokens"), _col(ok, "nll_original"), _col(ok, "nll_cousin")
    fd = _col(ok, "first_divergence")
    co, cc = _col(ok, "correct_original"), _col(ok, "correct_cousin")
    out.update(n=per_prompt(ones), exact=per_prompt(_col(ok, "exact_match")),
               fd=per_prompt(np.nan_to_num(fd)), fd_n=per_prompt((~np.isnan(fd)).astype(float)),
               chrf=per_prompt(_col(ok, "chrf")), rouge=per_prompt(_col(ok, "rouge_l")),
               ctok=per_prompt(_col(ok, "cousin_tokens")), otok=per_prompt(_col(ok, "original_tokens")),
               finish=per_prompt(_col(ok, "finish_changed")), labelled=per_prompt((~np.isnan(co)).astype(float)),
               co=per_prompt(np.nan_to_num(co)), cc=per_prompt(np.nan_to_num(cc)),
               flip=per_prompt(np.nan_to_num(_col(ok, "flip"))),
               # the flips' two directions: correct -> wrong (what a cousin lost), wrong -> correct
               flip_cw=per_prompt(np.nan_to_num(co * (1 - cc))), flip_wc=per_prompt(np.nan_to_num((1 - co) * cc)),
               **thinking_sums(ok, per_prompt), **option_sums(ok, per_prompt, _col),
               unp_o=per_prompt(np.nan_to_num(_col(ok, "unparsed_original"))),
               unp_c=per_prompt(np.nan_to_num(_col(ok, "unparsed_cousin"))),
               has0=np.minimum(per_prompt((ok.column("sample_index").to_numpy() == 0).astype(float)), 1.0))
    for side, column in (("o", "original_text"), ("c", "cousin_text")):
        texts = [t or "" for t in ok.column(column).to_pylist()]
        for n in (1, 2):
            d = np.asarray([np.nan if (x := metrics.distinct_n(t, n)) is None else x for t in texts])
            out[f"d{n}_{side}"] = per_prompt(np.nan_to_num(d))
            out[f"d{n}_{side}_n"] = per_prompt((~np.isnan(d)).astype(float))
    if token_level:
        out.update(tokens=per_prompt(tokens), nll_o=per_prompt(nll_o), nll_c=per_prompt(nll_c),
                   nll_d=per_prompt(nll_c - nll_o), nll_o2=per_prompt(_col(ok, "nll_original_sq")),
                   nll_c2=per_prompt(_col(ok, "nll_cousin_sq")), nll_oc=per_prompt(_col(ok, "nll_cross")))
        # Exact mode only (null lists otherwise); a reverse KLD is null where it is infinite.
        for name, column in (("rkld", "rkld_tokens"), ("tail", "tail_mass_tokens")):
            v, r = _flat(ok, column)
            has = np.isfinite(v)
            out[name] = per_prompt(np.where(has, v, 0.0), inv[r])
            out[f"{name}_n"] = per_prompt(has.astype(float), inv[r])
            if name == "rkld":
                out["rkld2"] = per_prompt(np.where(has, v * v, 0.0), inv[r])
        kld, row = _flat(ok, "kld_tokens")
        at = inv[row]
        same, _ = _flat(ok, "same_top1_tokens")
        dp, _ = _flat(ok, "dp_tokens")
        margin, _ = _flat(ok, "margin_tokens")
        out.update(T=per_prompt(np.ones_like(kld), at), kld=per_prompt(kld, at), kld2=per_prompt(kld * kld, at),
                   same=per_prompt(same, at), dp=per_prompt(dp, at), dp2=per_prompt(dp * dp, at),
                   rest=per_prompt(_flat(ok, "rest_mass_tokens")[0], at),
                   **span_token_sums(ok, kld, same, row, lambda v: per_prompt(v, at)))
        for i, sel in enumerate(margin_bins(margin)):
            out[f"m{i}_n"] = per_prompt(sel.astype(float), at)
            out[f"m{i}_kld"] = per_prompt(np.where(sel, kld, 0.0), at)
            out[f"m{i}_same"] = per_prompt(np.where(sel, same, 0.0), at)
    first = np.unique(inv, return_index=True)[1]
    cols = {"prompt_id": pa.array(uniq.tolist(), pa.string()),
            "category": ok.column("category").take(pa.array(first)).combine_chunks().cast(pa.string()),
            **{c: pa.array(v, pa.float64()) for c, v in out.items()}}
    return pa.table(cols, schema=SUMS)
