"""The run's drift report: one static, self-contained HTML page (`{run}/report.html`).

Everything is inline (CSS, and plots as PNG data URIs), so the page reads offline, from object storage
or an e-mail attachment, and without JavaScript. Model outputs and prompts are untrusted: every piece of
text goes through html.escape, and a Content-Security-Policy allows no fetches and only the one inline
script below (it just records, for the browser test, how many images decoded).

This module checks the inputs and assembles the page (its skeleton, style, script and policy); the
sections it is made of are laid out by `cousins.drift.report_sections`, and the matplotlib figures
they embed are drawn by `cousins.drift.figures`.
"""

from __future__ import annotations

import base64
import hashlib
from html import escape

from matplotlib import colormaps

from cousins.drift.aggregate import ReportView
from cousins.drift.report_sections import (NOISE, NOISE_COLOUR, accounting_table, across_cousins,
                                           cousin_section, header, plane_section, rank_key,
                                           ranking_table, token_table)

_SUMMARY_KEYS = ("run_id", "original", "score_topk", "prompts", "bootstrap", "kld_bound", "noise_floor", "cousins")
_WORST_COLUMNS = ("prompt_id", "sample_index", "cousin", "category", "kld_mean", "chrf",
                  "length_ratio", "exact_match", "original_text", "cousin_text", "div_original_start",
                  "div_original_end", "div_cousin_start", "div_cousin_end", "error")

# Sets <body data-images-loaded="N/M"> once the page has loaded: N images decoded out of M.
_SCRIPT = ('addEventListener("load",function(){var a=Array.prototype.slice.call(document.images);'
           'document.body.dataset.imagesLoaded=a.filter(function(i){return i.complete&&i.naturalWidth>0})'
           '.length+"/"+a.length;});')

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;margin:0 auto;
 padding:0 24px 48px}
h1{font-size:22px;margin:24px 0 4px}h2{font-size:18px;margin:32px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:16px;margin:28px 0 6px}h4{font-size:14px;margin:16px 0 6px}
ul.warnings{background:#fff4e5;border-left:4px solid #e08a00;padding:8px 8px 8px 28px;margin:8px 0}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;margin:8px 0}
dl.meta dt{color:#555}dl.meta dd{margin:0}
table{border-collapse:collapse;margin:8px 0;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #e3e3e3;padding:4px 7px;text-align:right;vertical-align:top}
table.ranking{font-size:12px}table.ranking th,table.ranking td{padding:4px 5px}
table.ranking td.name{white-space:nowrap}.scroll{overflow-x:auto}
th{background:#f4f4f6;font-weight:600}td.l,th.l{text-align:left}
tfoot td{background:#f7f7f7;color:#444;font-style:italic}
small.ci{display:block;color:#777;font-size:11px;white-space:nowrap}
.err{color:#a40000}.note{color:#555;font-size:13px}
img{max-width:100%;height:auto;display:block;margin:8px 0}
.pair{border:1px solid #e3e3e3;border-radius:6px;margin:10px 0;padding:6px 10px}
.pair .head{color:#444;font-size:13px}
.texts{display:grid;grid-template-columns:1fr 1fr;gap:10px}
.texts pre{white-space:pre-wrap;word-break:break-word;margin:4px 0;background:#fafafa;padding:6px;
 max-height:320px;overflow:auto;font:12px/1.4 ui-monospace,Menlo,Consolas,monospace}
mark{background:#ffd54a;color:#000;outline:1px solid #c79a00}
mark.end{font-style:italic;background:#ffe9a6}
.cut{color:#888;font-style:italic}
"""


def _sha256_b64(text: str) -> str:
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


# No fetches of any kind; images only from data: URIs; only our own style and script run, so even a
# text that escaped html.escape could not execute or phone home.
_CSP = (f"default-src 'none'; img-src data:; style-src 'sha256-{_sha256_b64(_CSS)}'; "
        f"script-src 'sha256-{_sha256_b64(_SCRIPT)}'; base-uri 'none'; form-action 'none'")


def render_report(summary: dict, views: dict[str, ReportView]) -> str:
    """The HTML text of the run's drift report.

    `summary` is the run's summary.json (cousins with their metrics, CIs and slices, plus the noise
    floor); `views` hold, per cousin and the noise floor, what the diff's workers aggregated for the
    plots and the worst prompts (drift.aggregate.ReportView: histograms and a top-N of rows, never
    the run's rows). The worst prompts are shown side by side: highest KLD mean, or lowest chrF for
    text-only cousins. Cousins are ranked by KLD mean, descending; text-only cousins follow by chrF,
    ascending; failed cousins come last.
    """
    _check_inputs(summary, views)
    cousins = sorted(summary["cousins"], key=rank_key)
    noise = summary["noise_floor"]
    palette = colormaps["tab10"].colors
    colours = {c["name"]: palette[i % len(palette)] for i, c in enumerate(cousins)}
    colours[NOISE] = NOISE_COLOUR
    noise_view = views.get(NOISE) if noise else None

    body = [
        header(summary),
        "<h2>Cousins ranked by drift</h2>",
        ranking_table(cousins, noise, summary["bootstrap"]),
        token_table(cousins, noise, summary.get("quantile_error")),
        accounting_table(summary.get("accounting"), summary.get("cost_currency", "USD")),
        plane_section(summary.get("plane"), colours),
        "<h2>Across cousins</h2>",
        across_cousins(cousins, noise, views, colours),
        "<h2>Per cousin</h2>",
        *(cousin_section(i, c, noise, views.get(c["name"]), noise_view, colours[c["name"]])
          for i, c in enumerate(cousins)),
    ]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{_CSP}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>Drift report — {escape(str(summary['run_id']))}</title>\n"
        f"<style>{_CSS}</style>\n<script>{_SCRIPT}</script>\n</head><body>\n"
        + "\n".join(body) + "\n</body></html>\n"
    )


# --- inputs ----------------------------------------------------------------------------------------

def _check_inputs(summary: dict, views: dict) -> None:
    problems = []
    missing = [k for k in _SUMMARY_KEYS if k not in summary]
    if missing:
        problems.append(f"summary is missing keys {missing} (is it the run's summary.json?)")
    for i, c in enumerate(summary.get("cousins") or []):
        lacking = [k for k in ("name", "kind", "text_only", "metrics") if k not in c]
        if lacking:
            problems.append(f"summary cousins[{i}] is missing keys {lacking}")
    for name, v in views.items():
        absent = [n for n in _WORST_COLUMNS if n not in v.worst.column_names]
        if absent:
            problems.append(f"the worst rows of {name!r} lack columns {absent}; conform them to "
                            f"cousins.drift.aggregate.WORST")
    if problems:
        raise ValueError("cannot render the report: " + "; ".join(problems))
