"""Multiple choice by likelihood, compared (the drift row's option columns): from each model's
log-likelihood of every option (generation rows' `choice_logprobs`, cousins/engine/choices.py), as
lm-eval-harness's `multiple_choice` and the flips paper (Dutta et al. 2024) score it.

- the distribution over the options: softmax of the log-likelihoods (p: the original's, q: the cousin's);
- `option_kl` = KL(p || q) over the options; `option_margin` = the original's top probability minus
  its second (how sure it was: flips concentrate where it is small);
- `acc`: the most likely option is the reference's; `acc_norm`: the most likely by log-likelihood
  per character of the option's continuation (lm-eval's acc_norm);
- `mc_flip`: acc changed between the original and the cousin.
"""

from __future__ import annotations

import numpy as np

from cousins.drift.extract import BadReference, choice_letter
from cousins.run.corpus import LETTERS


def softmax(lls: list[float]) -> np.ndarray:
    x = np.asarray(lls, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def option_row(o: dict, c: dict, reference: str | None, choices: list[str] | None) -> dict:
    """The option columns of one drift row (empty where either side has no choice figures)."""
    lo, lc = o.get("choice_logprobs"), c.get("choice_logprobs")
    if not lo or not lc or len(lo) != len(lc) or len(lo) < 2:
        return {}
    p, q = softmax(lo), softmax(lc)
    top = np.sort(p)[::-1]
    row = {"option_kl": float(np.sum(p * (np.log(p + 1e-300) - np.log(q + 1e-300)))),
           "option_margin": float(top[0] - top[1]),
           "option_original": LETTERS[int(np.argmax(lo))], "option_cousin": LETTERS[int(np.argmax(lc))]}
    if reference is None or not choices or len(choices) != len(lo):
        return row
    try:
        ref = LETTERS.index(choice_letter(reference, choices))
    except BadReference:
        return row

    def norm(lls, chars):
        chars = chars if chars and len(chars) == len(lls) else [1] * len(lls)
        return int(np.argmax(np.asarray(lls) / np.maximum(np.asarray(chars, dtype=np.float64), 1.0)))

    row.update(mc_correct_original=int(np.argmax(lo)) == ref, mc_correct_cousin=int(np.argmax(lc)) == ref,
               mc_correct_norm_original=norm(lo, o.get("choice_chars")) == ref,
               mc_correct_norm_cousin=norm(lc, c.get("choice_chars")) == ref)
    row["mc_flip"] = row["mc_correct_original"] != row["mc_correct_cousin"]
    return row


MARGIN_BINS = (0.0, 0.1, 0.3, 0.6, 1.0)  # top-margin bins: of the original's tokens, and over the options
OPTION_SUMS = ["mc_n", "mc_co", "mc_cc", "mc_no", "mc_nc", "mc_flip", "mc_cw", "mc_wc", "opt_n", "opt_kl",
               *[f"om{i}_{k}" for i in range(len(MARGIN_BINS) - 1) for k in ("n", "kl", "lab", "flip")]]


def option_sums(ok, per_prompt, col) -> dict:
    """Per-prompt sums (OPTION_SUMS) of one cousin's drift rows' option columns: labelled rows and
    their acc / acc_norm on each side and flips (both directions), rows with an option KL and its
    sum, and the same by the original's top margin (MARGIN_BINS)."""
    co, cc = col(ok, "mc_correct_original"), col(ok, "mc_correct_cousin")
    lab = ~np.isnan(co)
    co, cc = np.nan_to_num(co), np.nan_to_num(cc)
    kl, margin = col(ok, "option_kl"), col(ok, "option_margin")
    has = ~np.isnan(kl)
    flip = np.nan_to_num(col(ok, "mc_flip"))
    out = {"mc_n": per_prompt(lab.astype(float)), "mc_co": per_prompt(co), "mc_cc": per_prompt(cc),
           "mc_no": per_prompt(np.nan_to_num(col(ok, "mc_correct_norm_original"))),
           "mc_nc": per_prompt(np.nan_to_num(col(ok, "mc_correct_norm_cousin"))), "mc_flip": per_prompt(flip),
           "mc_cw": per_prompt(co * (1 - cc) * lab), "mc_wc": per_prompt((1 - co) * cc * lab),
           "opt_n": per_prompt(has.astype(float)), "opt_kl": per_prompt(np.where(has, kl, 0.0))}
    for i, in_bin in enumerate(margin_bins(margin)):
        sel = has & in_bin
        out[f"om{i}_n"] = per_prompt(sel.astype(float))
        out[f"om{i}_kl"] = per_prompt(np.where(sel, kl, 0.0))
        out[f"om{i}_lab"] = per_prompt((sel & lab).astype(float))
        out[f"om{i}_flip"] = per_prompt(np.where(sel & lab, flip, 0.0))
    return out


def margin_bins(margin: np.ndarray) -> list[np.ndarray]:
    """Per MARGIN_BINS bin, which values fall in it ([lo, hi), the last [lo, hi]; NaN in none)."""
    edges = list(MARGIN_BINS)
    return [(margin >= lo) & ((margin <= hi) if i == len(edges) - 2 else (margin < hi))
            for i, (lo, hi) in enumerate(zip(edges, edges[1:]))]


def margin_labels() -> list[str]:
    edges = list(MARGIN_BINS)
    return [f"[{lo:.1f},{hi:.1f}{']' if i == len(edges) - 2 else ')'}" for i, (lo, hi) in enumerate(zip(edges, edges[1:]))]
