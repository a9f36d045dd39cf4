"""The drift report's plots: matplotlib figures and the inline PNG <img> they become.

Owns the bar chart with CIs (same top-1, flip rate), the length-ratio box plot and the per-token KLD
histogram and CDF. Each builder takes plain arrays and colours, never the summary or drift table, so
`cousins.report` (which lays out the page) imports this module and never the other way round.
"""

from __future__ import annotations

import base64
import io
import math
from html import escape

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

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


def length_figure(ratios: list[tuple[str, np.ndarray, tuple]]) -> Figure:
    fig = Figure(figsize=(max(4.5, 1.3 * len(ratios) + 2), 3.2), layout="constrained")
    ax = fig.subplots()
    data = [np.clip(r, 1 / _LENGTH_CLIP, _LENGTH_CLIP) for _, r, _ in ratios]
    box = ax.boxplot(data, tick_labels=[n for n, _, _ in ratios], patch_artist=True, showmeans=True)
    for patch, (_, _, colour) in zip(box["boxes"], ratios):
        patch.set_facecolor(colour)
        patch.set_alpha(0.5)
    ax.axhline(1.0, color="#333", lw=0.8, ls="--")
    ax.set_yscale("log", base=2)
    lo = math.floor(np.log2(min(d.min() for d in data)))
    hi = math.ceil(np.log2(max(d.max() for d in data)))
    ticks = [2.0 ** e for e in range(lo, max(hi, lo + 1) + 1)]  # powers of two, labelled 1/2, 1, 2
    ax.set_yticks(ticks, [f"1/{1 / t:.0f}" if t < 1 else f"{t:.0f}" for t in ticks])
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylabel(f"length ratio (clipped to 1/{_LENGTH_CLIP:.0f}..{_LENGTH_CLIP:.0f})")
    ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def kld_figure(series: list[tuple[str, np.ndarray, tuple]]) -> Figure:
    """Histogram (fraction of tokens, log-x) and CDF of per-token KLD, the cousin against the noise floor."""
    fig = Figure(figsize=(10, 3.4), layout="constrained")
    ax_h, ax_c = fig.subplots(1, 2)
    top = max(float(x.max()) for _, x, _ in series)
    bins = np.geomspace(_KLD_FLOOR, max(top, _KLD_FLOOR * 10) * 1.2, 61)
    for label, x, colour in series:
        xc = np.clip(x, _KLD_FLOOR, None)
        ax_h.hist(xc, bins=bins, weights=np.full(xc.size, 1 / xc.size), histtype="step", lw=1.5,
                  color=colour, label=f"{label} (mean {x.mean():.3g})")
        ax_h.axvline(max(x.mean(), _KLD_FLOOR), color=colour, lw=0.8, ls=":")
        q = np.linspace(0, 1, min(xc.size, 2000))
        ax_c.plot(np.quantile(xc, q), q, color=colour, lw=1.5, drawstyle="steps-post", label=label)
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

