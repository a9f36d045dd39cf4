"""The capability-against-cost plane: per model, accuracy on labelled prompts (with a confidence
interval) against output tokens per correct answer and cost per 1M output tokens, and which models
are on the Pareto frontier. The question a user asks of a cousin: is it cheaper for the same answers?

Pure functions of the run's accounting (records.Accounting: correct and labelled rows, tokens per
correct answer, cost per 1M tokens, and the prompt-clustered standard error of the accuracy that
accounting.efficiency measures); summary.json's `plane` (contract.summary.Plane).

- Accuracy interval: a Wilson score interval at the run's confidence level over an *effective*
  sample size. The samples of one prompt are not independent answers, so the rows are treated as
  clusters by prompt: n_eff = p(1-p) / se^2, se the cluster-robust (CR1) standard error of
  correct / labelled from per-prompt counts (Kish's design effect), kept within [1, rows]. Where se
  says nothing (accuracy 0 or 1, or a single prompt) n_eff is the number of labelled prompts: every
  sample of a prompt counted as one answer, the widest the clustering can make it. A run recorded
  before per-prompt counts were kept falls back to the rows (too narrow when samples > 1; a note
  says so).
- Tokens per correct answer = output tokens on labelled prompts / correct answers among them; its
  interval is the accuracy's carried over (mean tokens per labelled answer / accuracy bounds, the
  mean length taken as exact); no correct answer: no value (infinitely many tokens), no interval.
- The frontier, on point estimates: a model is dominated when another is at least as good on every
  axis (accuracy higher, tokens per correct answer and cost per 1M tokens lower) and strictly
  better on one; the frontier is the models nobody dominates. A dominance is `within_ci` when the
  intervals leave room for the dominated model to be the better one on accuracy or tokens per
  correct answer: the data do not settle it. Cost is an axis only when every placed model has one
  (it needs cost.price_per_accelerator_hour); it carries no interval. The noise floor (the original
  under another batching) is shown as a reference, never placed on the frontier; so is any model
  without labelled rows.
"""

from __future__ import annotations

import math
from statistics import NormalDist

AXES = ("accuracy", "tokens_per_correct", "cost_per_1m_output_tokens")
INTERVAL = ("Wilson score interval over an effective sample size: rows clustered by prompt (n_eff = "
            "p(1-p)/se^2, se the prompt-clustered standard error; the labelled prompts where that is "
            "undefined)")


def accuracy_se(correct: float, labelled: float, prompts: int, sum_c2: float, sum_cn: float,
                sum_n2: float) -> float | None:
    """The cluster-robust (CR1) standard error of correct / labelled, clusters being prompts, from
    sums over prompts of c_i^2, c_i n_i and n_i^2 (c_i correct of n_i labelled rows of prompt i);
    None with fewer than two prompts."""
    if prompts < 2 or labelled <= 0:
        return None
    p = correct / labelled
    resid = max(sum_c2 - 2 * p * sum_cn + p * p * sum_n2, 0.0)  # Σ (c_i - p n_i)^2
    return math.sqrt(resid * prompts / (prompts - 1)) / labelled


def wilson(p: float, n: float, level: float) -> tuple[float, float]:
    """The Wilson score interval of a proportion p observed over n (possibly fractional) trials."""
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(p * (1 - p) / n + z2n / (4 * n))
    return (0.0 if p <= 0 else max(0.0, centre - half)), (1.0 if p >= 1 else min(1.0, centre + half))


def effective_n(p: float, rows: int, prompts: int | None, se: float | None) -> tuple[float, str]:
    """(n_eff, basis) of the accuracy interval: basis "prompts" (clustered) or "rows" (no
    per-prompt counts on record: rows taken as independent)."""
    if not prompts:
        return float(rows), "rows"
    if se and 0 < p < 1:
        return min(max(p * (1 - p) / (se * se), 1.0), float(rows)), "prompts"
    return float(prompts), "prompts"


def point(name: str, kind: str, a: dict, level: float) -> dict:
    """One model on the plane (contract.summary.PlanePoint, frontier not yet decided) from its accounting."""
    labelled, correct = a.get("labelled_rows") or 0, a.get("correct_rows") or 0
    prompts = a.get("labelled_prompts")
    out = {"name": name, "kind": kind, "labelled_rows": labelled, "labelled_prompts": prompts,
           "correct_rows": correct, "accuracy": {"value": None, "ci": None},
           "tokens_per_correct": {"value": None, "ci": None},
           "cost_per_1m_output_tokens": a.get("cost_per_1m_output_tokens"), "frontier": None, "dominated_by": []}
    if not labelled:
        return out
    p = correct / labelled
    n_eff, basis = effective_n(p, labelled, prompts, a.get("accuracy_se"))
    lo, hi = wilson(p, n_eff, level)
    out["accuracy"] = {"value": p, "ci": [lo, hi], **({"se": a["accuracy_se"]} if a.get("accuracy_se") else {})}
    out["interval_basis"] = basis
    tpc = a.get("tokens_per_correct")
    if correct and tpc is not None:
        mean_len = tpc * correct / labelled  # output tokens per labelled answer
        out["tokens_per_correct"] = {"value": tpc, "ci": [mean_len / hi, mean_len / lo] if lo > 0 else None}
    return out


def _bounds(m: dict, axis: str) -> tuple[float, float, float]:
    """(value, low, high) of an axis, oriented so that larger is better; no value is the worst."""
    if axis == "accuracy":
        v, ci = m["accuracy"]["value"], m["accuracy"]["ci"]
        return v, ci[0], ci[1]
    if axis == "tokens_per_correct":  # fewer is better: negated; none correct = infinitely many
        t = m["tokens_per_correct"]
        v = -t["value"] if t["value"] is not None else -math.inf
        ci = t["ci"]
        return (v, -ci[1], -ci[0]) if ci else (v, -math.inf, v if t["value"] is not None else -math.inf)
    v = -m[axis]
    return v, v, v


def dominates(a: dict, b: dict, axes: tuple[str, ...]) -> bool:
    """a is at least as good as b on every axis and strictly better on one (point estimates)."""
    va, vb = [_bounds(a, x)[0] for x in axes], [_bounds(b, x)[0] for x in axes]
    return all(x >= y for x, y in zip(va, vb)) and any(x > y for x, y in zip(va, vb))


def within_ci(a: dict, b: dict) -> bool:
    """The intervals leave room for b to be better than a on accuracy or tokens per correct answer."""
    for axis in ("accuracy", "tokens_per_correct"):
        _, a_lo, _ = _bounds(a, axis)
        _, _, b_hi = _bounds(b, axis)
        if b_hi > a_lo:
            return True
    return False


def plane(accounting: dict[str, dict], kinds: dict[str, str], *, level: float, currency: str) -> dict:
    """summary.json's `plane` (contract.summary.Plane) from the run's accounting (model -> records.Accounting
    as JSON) and the models' kinds (original, quantized, distilled, other, noise)."""
    points = [point(name, kinds.get(name, "other"), a, level) for name, a in accounting.items()]
    placed = [m for m in points if m["kind"] != "noise" and m["accuracy"]["value"] is not None]
    notes = []
    axes = AXES
    if not placed:
        notes.append("no labelled prompts: accuracy is not measured (prompts need a reference answer)")
    else:
        no_cost = [m["name"] for m in placed if m["cost_per_1m_output_tokens"] is None]
        if no_cost:
            axes = AXES[:2]
            notes.append("no price configured (cost.price_per_accelerator_hour): the frontier is on accuracy and "
                         "tokens per correct answer" if len(no_cost) == len(placed) else
                         f"no cost per 1M tokens for {no_cost} (no tokens generated by this attempt): the frontier "
                         "is on accuracy and tokens per correct answer")
        if all(m["correct_rows"] == 0 for m in placed):
            notes.append("no model answered a labelled prompt correctly: tokens per correct answer is undefined")
        for m in placed:
            m["frontier"] = True
            for other in placed:
                if other is not m and dominates(other, m, axes):
                    m["frontier"] = False
                    m["dominated_by"].append({"model": other["name"], "within_ci": within_ci(other, m)})
        rows_basis = [m["name"] for m in points if m.get("interval_basis") == "rows"]
        if rows_basis:
            notes.append(f"accuracy intervals of {rows_basis} treat rows as independent (no per-prompt counts on "
                         "record): with several samples per prompt they are too narrow")
    return {"axes": list(axes), "level": level, "interval": INTERVAL, "currency": currency,
            "models": points, "notes": notes}


# --- text ------------------------------------------------------------------------------------------

def frontier_text(m: dict) -> str:
    """'yes', 'no: A, B (within CI)', 'reference' (the noise floor) or '-' (not placed)."""
    if m["frontier"] is None:
        return "reference" if m["kind"] == "noise" and m["accuracy"]["value"] is not None else "-"
    if m["frontier"]:
        return "yes"
    return "no: " + ", ".join(d["model"] + (" (within CI)" if d["within_ci"] else "") for d in m["dominated_by"])


def _fig(m: dict, fmt) -> str:
    if m.get("value") is None:
        return "-"
    ci = m.get("ci")
    return f"{fmt(m['value'])} [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else fmt(m["value"])


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _tok(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:,.0f}"


def plane_row(m: dict) -> tuple[str, ...]:
    """A model's plane figures as text: correct/labelled, accuracy [CI], tokens per correct [CI],
    cost per 1M tokens, frontier."""
    cost = m["cost_per_1m_output_tokens"]
    return (f"{m['correct_rows']}/{m['labelled_rows']}", _fig(m["accuracy"], _pct), _fig(m["tokens_per_correct"], _tok),
            "-" if cost is None else f"{cost:.4g}", frontier_text(m))


def plane_lines(p: dict | None) -> list[str]:
    """The plane as a few lines of text under the drift table; nothing for a summary without one."""
    if not p:
        return []
    axes = ", ".join({"accuracy": "accuracy", "tokens_per_correct": "tok/correct",
                      "cost_per_1m_output_tokens": "cost/1M"}[a] for a in p["axes"])
    head = (f"capability against cost ([CI]: {100 * p['level']:.0f}% Wilson, samples clustered by prompt; "
            f"tok/correct: output tokens per correct answer; cost/1M: per 1M output tokens, {p['currency']}; "
            f"frontier on {axes})")
    if all(m["labelled_rows"] == 0 for m in p["models"]):
        return ["", "capability against cost: not measured (no labelled prompts)"]
    header = ("model", "kind", "correct/labelled", "accuracy [CI]", "tok/correct [CI]", "cost/1M", "frontier")
    rows = [header, *((m["name"], m["kind"], *plane_row(m)) for m in p["models"])]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return ["", head, *lines, *(f"note: {n}" for n in p["notes"])]
