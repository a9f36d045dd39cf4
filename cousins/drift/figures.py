"""The drift report's plots: matplotlib figures and the inline PNG <img> they become.

Owns the bar chart with CIs (same top-1, flip rate), the length-ratio box plot, the per-token KLD
histogram and CDF, and the capability-against-cost plane. Each builder takes histograms (cousins.drift.sketch grids), means and colours, never the summary or drift table, so
`cousins.drift.report_sections` (which lays out the report's sections) imports this module and never the
other way round.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from html import escape

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullLocator

from cousins.drift.sketch import KLD_GRID, LENGTH_GRID

_KLD_FLOOR = 1e-6  # log-x plots need a floor: an exact-zero KLD is drawn at it
_LENGTH_CLIP = 32.0  # length ratios drawn within [1/32, 32]


def img(fig: Figure, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, metadata={"Software": None})
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<img src=\"{uri}\" alt=\"{escape(alt)}\">"


def bar_figure(title: str, bars: list[tuple[str, dict, tuple]]) -> Figure:
    fig = Figure(figsize=(max(4.5, 1.3 * len(bars) + 2), 3.2), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(bars))
    vals = np.array([100 * m["value"] for _, m, _ in bars])
    cis = [m["ci"] if m.get("ci") and None not in m["ci"] else [m["value"]] * 2 for _, m, _ in bars]
    lo, hi = 100 * np.array(cis, dtype=np.float64).T
    err = np.clip(np.vstack([vals - lo, hi - vals]), 0, None)
    ax.bar(x, vals, color=[c for _, _, c in bars], yerr=err, capsize=4, ecolor="#333")
    for xi, v, h in zip(x, vals, hi):
        ax.annotate(f"{v:.1f}%", (xi, h), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    ax.set_xticks(x, [n for n, _, _ in bars], rotation=15, ha="right", fontsize=8)
    ax.set_ylabel(f"{title} (%)")
    ax.set_ylim(0, min(110, max(hi.max() * 1.15, 5)))
    ax.grid(axis="y", alpha=0.3)
    return fig


def _box(counts: np.ndarray, mean: float | None) -> dict:
    """Box-plot statistics (quartiles, whiskers at 1.5 IQR, mean) of a LENGTH_GRID histogram."""
    q1, med, q3 = (LENGTH_GRID.quantile(counts, q) for q in (0.25, 0.5, 0.75))
    seen = [LENGTH_GRID.centre(i) if i else LENGTH_GRID.lo for i in np.nonzero(counts)[0]]
    seen = np.clip(seen, LENGTH_GRID.lo, LENGTH_GRID.hi)
    q1, med, q3 = (min(max(v or LENGTH_GRID.lo, LENGTH_GRID.lo), LENGTH_GRID.hi) for v in (q1, med, q3))
    iqr = q3 - q1
    inside = seen[(seen >= q1 - 1.5 * iqr) & (seen <= q3 + 1.5 * iqr)]
    return {"med": med, "q1": q1, "q3": q3, "whislo": float(inside.min()) if inside.size else q1,
            "whishi": float(inside.max()) if inside.size else q3, "fliers": [],
            "mean": float(np.clip(mean, LENGTH_GRID.lo, LENGTH_GRID.hi)) if mean is not None else med}


def length_figure(ratios: list[tuple[str, np.ndarray, float | None, tuple]]) -> Figure:
    """Box plots of per-row length ratios, one per cousin, from their LENGTH_GRID histograms (values
    within 2%; outliers beyond the whiskers are not drawn)."""
    fig = Figure(figsize=(max(4.5, 1.3 * len(ratios) + 2), 3.2), layout="constrained")
    ax = fig.subplots()
    stats = [{**_box(counts, mean), "label": name} for name, counts, mean, _ in ratios]
    box = ax.bxp(stats, patch_artist=True, showmeans=True, showfliers=False)
    for patch, (_, _, _, colour) in zip(box["boxes"], ratios):
        patch.set_facecolor(colour)
        patch.set_alpha(0.5)
    ax.axhline(1.0, color="#333", lw=0.8, ls="--")
    ax.set_yscale("log", base=2)
    lo = math.floor(np.log2(min(s["whislo"] for s in stats)))
    hi = math.ceil(np.log2(max(s["whishi"] for s in stats)))
    ticks = [2.0 ** e for e in range(lo, max(hi, lo + 1) + 1)]  # powers of two, labelled 1/2, 1, 2
    ax.set_yticks(ticks, [f"1/{1 / t:.0f}" if t < 1 else f"{t:.0f}" for t in ticks])
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylabel(f"length ratio (clipped to 1/{_LENGTH_CLIP:.0f}..{_LENGTH_CLIP:.0f})")
    ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _display(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A KLD_GRID histogram regrouped for drawing in steps of ×1.49 (20 buckets) from the floor, a
    bucket drawn where its centre falls (below the floor: in the first bin); (edges, fractions)."""
    step = KLD_GRID.ratio ** 20
    centres = np.asarray([KLD_GRID.centre(i) for i in range(KLD_GRID.buckets)])
    at = np.floor(np.log(np.maximum(centres, _KLD_FLOOR) / _KLD_FLOOR) / math.log(step)).astype(int)
    frac = np.bincount(at, weights=counts) / counts.sum()
    top = int(np.nonzero(frac)[0].max()) + 1 if frac.any() else 1
    return _KLD_FLOOR * step ** np.arange(top + 1), frac[:top]


def kld_figure(series: list[tuple[str, np.ndarray, float | None, tuple]]) -> Figure:
    """Histogram (fraction of tokens, log-x) and CDF of per-token KLD, the cousin against the noise
    floor, from KLD_GRID histograms (the CDF is exact at the grid's 2% steps)."""
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    ax_h, ax_c = fig.subplots(1, 2)
    for label, counts, mean, colour in series:
        edges, frac = _display(counts)
        mean_txt = f" (mean {mean:.3g})" if mean is not None else ""
        ax_h.stairs(frac, edges, lw=1.5, color=colour, label=f"{label}{mean_txt}")
        if mean is not None:
            ax_h.axvline(max(mean, _KLD_FLOOR), color=colour, lw=0.8, ls=":")
        edges = KLD_GRID.edges()
        upper = np.maximum(np.append(edges, edges[-1]), _KLD_FLOOR)  # bucket i's upper edge, floored
        cdf = np.cumsum(counts) / counts.sum()
        last = int(np.nonzero(counts)[0].max()) + 1
        ax_c.plot(np.concatenate([[_KLD_FLOOR], upper[:last]]), np.concatenate([[0.0], cdf[:last]]),
                  color=colour, lw=1.5, drawstyle="steps-post", label=label)
    for ax in (ax_h, ax_c):
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())  # decades suffice; minor ticks double the drawing time
        ax.set_xlabel(f"KLD per token (nats; below {_KLD_FLOOR:g} drawn at {_KLD_FLOOR:g})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_h.set_ylabel("fraction of tokens")
    ax_c.set_ylabel("fraction of tokens ≤ x")
    ax_c.set_ylim(0, 1.01)
    return fig


@dataclass(frozen=True)
class PlaneDot:
    """A model on the capability-against-cost plane as the figure draws it (fractions, tokens, cost)."""

    name: str
    accuracy: float
    accuracy_ci: tuple[float, float]
    tokens_per_correct: float | None  # None: no correct answer
    tokens_ci: tuple[float, float] | None
    cost: float | None  # per 1M output tokens
    frontier: bool | None  # None: a reference (the noise floor), not placed
    colour: tuple | str


def _plane_panel(ax, dots: list[PlaneDot], x_of, xerr_of, xlabel: str) -> None:
    xs = np.array([x_of(d) for d in dots], dtype=np.float64)
    ys = np.array([100 * d.accuracy for d in dots])
    for d, x, y in zip(dots, xs, ys):
        lo, hi = d.accuracy_ci
        xerr = xerr_of(d)
        marker, face = ("X", d.colour) if d.frontier is None else ("o", d.colour if d.frontier else "white")
        ax.errorbar([x], [y], yerr=[[y - 100 * lo], [100 * hi - y]],
                    xerr=None if xerr is None else [[x - xerr[0]], [xerr[1] - x]], fmt="none", ecolor=d.colour,
                    elinewidth=1, capsize=3, alpha=0.7)
        ax.plot([x], [y], marker=marker, ms=9, mfc=face, mec=d.colour, mew=2, ls="none")
    log = xs.min() > 0 and xs.max() / xs.min() > 10
    if log:
        ax.set_xscale("log")
    ax.margins(x=0.15)  # room for the names
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy on labelled prompts (%)")
    ax.set_ylim(-4, 105)  # a model at 0% stays visible
    ax.grid(alpha=0.3)
    # Names: left of a point in the right third, and stacked where points (nearly) coincide, as the
    # noise floor does with the original.
    u = np.log(xs) if log else xs
    u = (u - u.min()) / (np.ptp(u) or 1.0)
    for i, (d, x, y) in enumerate(zip(dots, xs, ys)):
        near = int(np.sum((np.abs(u[:i] - u[i]) < 0.15) & (np.abs(ys[:i] - y) < 8)))
        right = u[i] > 0.67
        ax.annotate(d.name, (x, y), textcoords="offset points", xytext=(-7 if right else 7, 5 - 11 * near),
                    ha="right" if right else "left", fontsize=8, fontweight="bold" if d.frontier else "normal",
                    color="#555" if d.frontier is None else "#1d1d1f")


def plane_figure(dots: list[PlaneDot], currency: str) -> Figure | None:
    """Accuracy (with its interval) against output tokens per correct answer, and against cost per
    1M output tokens where there is one; frontier models filled, dominated ones hollow, the noise
    floor a cross. None when neither panel has a point to draw."""
    by_tokens = [d for d in dots if d.tokens_per_correct is not None]
    by_cost = [d for d in dots if d.cost is not None]
    panels = [p for p in (by_tokens, by_cost) if p]
    if not panels:
        return None
    fig = Figure(figsize=(5 * len(panels) + 0.5, 3.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    i = 0
    if by_tokens:
        _plane_panel(axes[i], by_tokens, lambda d: d.tokens_per_correct, lambda d: d.tokens_ci,
                     "output tokens per correct answer")
        missing = [d.name for d in dots if d.tokens_per_correct is None]
        if missing:
            axes[i].set_title(f"not placed (no correct answer): {', '.join(missing)}", fontsize=8, loc="left")
        i += 1
    if by_cost:
        _plane_panel(axes[i], by_cost, lambda d: d.cost, lambda d: None, f"cost per 1M output tokens ({currency})")
        if not by_tokens:
            axes[i].set_title("no correct answers: tokens per correct answer undefined", fontsize=8, loc="left")
    key = [Line2D([], [], marker="o", ms=7, mfc="#555", mec="#555", ls="none", label="on the frontier"),
           Line2D([], [], marker="o", ms=7, mfc="white", mec="#555", mew=2, ls="none", label="dominated"),
           Line2D([], [], marker="X", ms=7, mfc="#555", mec="#555", ls="none", label="noise floor (reference)")]
    axes[0].legend(handles=key, fontsize=7, loc="best")
    return fig
