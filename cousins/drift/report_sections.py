"""The sections of the run's drift report (`cousins.drift.report` assembles them into the page).

One function per part of the page: the header with the run's facts and warnings, the cousins ranked by
drift, the per-token statistics, the cost and token-efficiency table, the capability-against-cost plane,
the across-cousins charts, and per cousin its KLD figure, slices and worst prompts side by side. Each
returns an HTML fragment; every piece of model or prompt text goes through html.escape here. The
matplotlib figures they embed are drawn by `cousins.drift.figures`.
"""

from __future__ import annotations

import math
from html import escape

from cousins.contract.records import NOISE_FLOOR
from cousins.drift.aggregate import ReportView
from cousins.drift.figures import PlaneDot, bar_figure, img, kld_figure, length_figure, plane_figure
from cousins.drift.plane import frontier_text

NOISE = NOISE_FLOOR  # the pseudo-cousin: the original against its reshuffled self
NOISE_COLOUR = "#7f7f7f"
_ORIGINAL_COLOUR = "#1d1d1f"
_TEXT_BUDGET = 4000  # characters of each output shown per worst prompt, kept around the divergence


# --- metrics and ranking -----------------------------------------------------------------------------

def _metric(c: dict | None, name: str) -> dict:
    return ((c or {}).get("metrics") or {}).get(name) or {}


def _value(c: dict | None, name: str) -> float | None:
    v = _metric(c, name).get("value")
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def rank_key(c: dict):
    """The cousins' order in the report: by KLD mean, descending; text-only ones by chrF, ascending; failed last."""
    if c.get("error"):
        return (2, 0.0, c["name"])
    kld = _value(c, "kld_mean")
    if kld is not None:
        return (0, -kld, c["name"])
    chrf = _value(c, "chrf")
    return (1, math.inf if chrf is None else chrf, c["name"])


# --- formatting --------------------------------------------------------------------------------------

def _num(v: float | None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def _pp(v: float | None) -> str:  # a difference of two fractions, in percentage points
    return "—" if v is None else f"{100 * v:+.1f} pp"


def _cell(m: dict, fmt=_num) -> str:
    """A metric with its confidence interval underneath, in the value's unit (left out to save width)."""
    v = m.get("value")
    ci = m.get("ci")
    text = escape(fmt(v))
    if v is not None and ci and None not in ci:
        lo, hi = (fmt(x).removesuffix("%").removesuffix(" pp") for x in ci)
        text += f"<small class=\"ci\">[{escape(lo)}, {escape(hi)}]</small>"
    return f"<td>{text}</td>"


# --- header and ranking ------------------------------------------------------------------------------

def header(s: dict) -> str:
    b = s["bootstrap"]
    items = [
        ("Run", s["run_id"]), ("Original model", s["original"]), ("Prompts", s["prompts"]),
        ("Top-k used for scoring", s["score_topk"]), ("KLD estimate", s["kld_bound"]),
        ("Confidence intervals", f"{100 * b['level']:.0f}% bootstrap over prompts, {b['resamples']} resamples, "
                                 f"seed {b['seed']}"),
        ("Noise floor", "the original against itself under another batching: drift below it is jitter"
         if s["noise_floor"] else "not measured in this run"),
    ]
    rows = "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in items)
    warnings = "".join(f"<li>{escape(w)}</li>" for w in s.get("warnings") or [])
    return (f"<h1>Drift report — {escape(str(s['run_id']))}</h1>\n<dl class=\"meta\">{rows}</dl>"
            + (f"\n<ul class=\"warnings\">{warnings}</ul>" if warnings else ""))


def accounting_table(accounting: dict | None, currency: str) -> str:
    """Capability against cost: tokens, throughput, accelerator time, cost and token efficiency per model."""
    if not accounting:
        return ""

    def f(v, fmt):
        return "—" if v is None else format(v, fmt)

    head = ("model", "output tokens", "tok/s", "accelerator-s", f"cost / 1M tokens ({currency})",
            "tokens / answer", "correct / labelled", "tokens / correct answer")
    rows = []
    for name, a in accounting.items():
        rows.append("<tr>" + "".join(f"<td{' class=l' if i == 0 else ''}>{escape(str(c))}</td>" for i, c in enumerate((
            name, f(a["output_tokens"], "d"), f(a["tokens_per_s"], ".1f"),
            f(a["accelerator_s"], ".1f") + (" GPU" if a["accelerator"] == "gpu" else ""),
            f(a["cost_per_1m_output_tokens"], ".4f"), f(a["tokens_per_prompt"], ".1f"),
            f"{a['correct_rows']} / {a['labelled_rows']}", f(a["tokens_per_correct"], ".1f")))) + "</tr>")
    header = "".join(f"<th{' class=l' if i == 0 else ''}>{escape(h)}</th>" for i, h in enumerate(head))
    return ("<h2>Cost and token efficiency</h2>\n<div class=\"scroll\"><table><thead><tr>" + header
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>\n<p class=\"note\">Accelerator-"
            "seconds are the engines' held time in this run's generation stage (actor-seconds on CPU engines). "
            "A cousin that is cheaper per token but needs more tokens per correct answer shows it here.</p>")


def plane_section(plane: dict | None, colours: dict) -> str:
    """Capability against cost: accuracy (with its interval) against output tokens per correct
    answer and cost per 1M tokens, the frontier marked; a figure and a table (cousins/drift/plane.py)."""
    if not plane:
        return ""  # a summary made before the plane
    out = ["<h2>Capability against cost</h2>"]
    models = plane["models"]
    if all(m["labelled_rows"] == 0 for m in models):
        out.append("<p class=\"note\">Not measured: no prompt has a reference answer, so no model has an accuracy "
                   "or a number of tokens per correct answer. The cost per 1M tokens is in the table above.</p>")
        return "\n".join(out)
    cur = plane["currency"]
    dots = [PlaneDot(name=m["name"], accuracy=m["accuracy"]["value"], accuracy_ci=tuple(m["accuracy"]["ci"]),
                     tokens_per_correct=m["tokens_per_correct"]["value"],
                     tokens_ci=tuple(m["tokens_per_correct"]["ci"]) if m["tokens_per_correct"]["ci"] else None,
                     cost=m["cost_per_1m_output_tokens"], frontier=m["frontier"],
                     colour=colours.get(m["name"], _ORIGINAL_COLOUR))
            for m in models if m["accuracy"]["value"] is not None]
    fig = plane_figure(dots, cur)
    if fig is not None:
        out.append(img(fig, "accuracy against output tokens per correct answer and cost per 1M tokens, "
                            "frontier filled"))
    else:
        out.append("<p class=\"note\">No figure: no model answered a labelled prompt correctly (tokens per "
                   "correct answer are undefined) and no cost per 1M tokens is known.</p>")
    level = f"{100 * plane['level']:.0f}%"
    head = ("model", "kind", "correct / labelled rows", "accuracy", "tokens / correct answer",
            f"cost / 1M tokens ({cur})", "frontier")
    rows = []
    for m in models:
        prompts = m.get("labelled_prompts")
        placed = frontier_text(m) if m["accuracy"]["value"] is not None else "—"
        counts = f"{m['correct_rows']} / {m['labelled_rows']}" + (
            f"<small class=\"ci\">{prompts} prompts</small>" if prompts is not None else "")
        rows.append(f"<tr><td class=\"l\">{escape(m['name'])}</td><td class=\"l\">{escape(m['kind'])}</td>"
                    f"<td>{counts}</td>{_cell(m['accuracy'], _pct)}{_cell(m['tokens_per_correct'])}"
                    f"<td>{escape(_num(m['cost_per_1m_output_tokens']))}</td>"
                    f"<td class=\"l\">{escape(placed)}</td></tr>")
    header = "".join(f"<th{' class=l' if i in (0, 1, 6) else ''}>{escape(h)}</th>" for i, h in enumerate(head))
    axes = ", ".join({"tokens_per_correct": "tokens per correct answer",
                      "cost_per_1m_output_tokens": "cost per 1M tokens"}.get(a, a) for a in plane["axes"])
    out.append(f"<table class=\"plane\"><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
    notes = "".join(f"<li>{escape(n)}</li>" for n in plane["notes"])
    if notes:
        out.append(f"<ul class=\"warnings\">{notes}</ul>")
    out.append(f"<p class=\"note\">Accuracy: correct answers among the answered rows of labelled prompts, with a "
               f"{level} Wilson interval whose sample size counts the samples of one prompt as correlated "
               "(clustered by prompt). Tokens per correct answer: output tokens spent on labelled prompts per "
               "correct answer; its interval is the accuracy's carried over. The frontier ("
               f"{escape(axes)}) is decided on point estimates: a model is dominated when another is at least as "
               "good on every axis and strictly better on one; “within CI” marks a dominance the intervals do not "
               "settle; cost carries no interval. The noise floor is the original again, shown for reference: its distance "
               "from the original is how far two passes of one model differ (cost per token included, which "
               "follows timing).</p>")
    return "\n".join(out)


_COLUMNS = [  # (header, metric, formatter)
    ("KLD mean", "kld_mean", _num), ("KLD p99", "kld_p99", _num), ("KLD max", "kld_max", _num),
    ("reverse KLD", "rkld_mean", _num), ("rest mass", "rest_mass_mean", _pct),
    ("same top-1", "same_top1", _pct), ("RMS Δp", "rms_dp", _pct), ("PPL ratio", "ppl_ratio", _num),
    ("flip rate", "flip_rate", _pct), ("correct→wrong", "flip_correct_to_wrong", _pct),
    ("wrong→correct", "flip_wrong_to_correct", _pct), ("McNemar p", "flip_mcnemar_p", _num),
    ("Δ accuracy", "accuracy_delta", _pp),
    ("length ratio", "length_ratio", _num), ("thinking ratio", "thinking_length_ratio", _num),
    ("option KL", "option_kl_mean", _num), ("exact match", "exact_match", _pct), ("chrF", "chrf", _num),
]


def ranking_table(cousins: list[dict], noise: dict | None, bootstrap: dict) -> str:
    head = ("<tr><th>#</th><th class=\"l\">cousin<small class=\"ci\">kind</small></th><th>rows</th>"
            + "".join(f"<th>{escape(h)}</th>" for h, _, _ in _COLUMNS) + "</tr>")

    def row(rank: str, c: dict, link: str | None) -> str:
        name = escape(c["name"])
        name = f"<a href=\"#{link}\">{name}</a>" if link else name
        errs = c.get("error_rows") or 0
        rows = f"{c.get('rows', 0)}" + (f"<small class=\"ci err\">{errs} failed</small>" if errs else "")
        kind = f"<small class=\"ci\">{escape(str(c['kind']))}</small>"
        cells = f"<td>{rank}</td><td class=\"l name\">{name}{kind}</td><td>{rows}</td>"
        if c.get("error"):
            return (f"<tr>{cells}<td class=\"l err\" colspan=\"{len(_COLUMNS)}\">failed: "
                    f"{escape(str(c['error']))}</td></tr>")
        return f"<tr>{cells}" + "".join(_cell(_metric(c, m), f) for _, m, f in _COLUMNS) + "</tr>"

    body = "".join(row(str(i + 1), c, f"cousin-{i}") for i, c in enumerate(cousins))
    foot = f"<tfoot>{row('ref', noise, None)}</tfoot>" if noise else ""
    level = f"{100 * bootstrap['level']:.0f}%"
    return (f"<div class=\"scroll\"><table class=\"ranking\"><thead>{head}</thead><tbody>{body}</tbody>"
            f"{foot}</table></div>\n"
            f"<p class=\"note\">Bracketed: {level} bootstrap confidence interval. KLD in nats per token of the "
            "original's output; “—”: not measured (text-only cousins have no token metrics; accuracy and "
            "flips need labelled prompts).</p>")


_TOKEN_COLUMNS = [  # llama.cpp's `llama-perplexity --kl-divergence` figures, as it prints them
    ("KLD min", "kld_min", _num), ("p0.1", "kld_p001", _num), ("p1", "kld_p01", _num), ("p5", "kld_p05", _num),
    ("p10", "kld_p10", _num), ("median", "kld_median", _num), ("p90", "kld_p90", _num), ("p95", "kld_p95", _num),
    ("p99", "kld_p99", _num), ("p99.9", "kld_p999", _num), ("max", "kld_max", _num),
    ("Δp min", "dp_min", _pct), ("p1", "dp_p01", _pct), ("p5", "dp_p05", _pct), ("p25", "dp_p25", _pct),
    ("median", "dp_median", _pct), ("p75", "dp_p75", _pct), ("p95", "dp_p95", _pct), ("p99", "dp_p99", _pct),
    ("max", "dp_max", _pct), ("mean Δp", "mean_dp", _pct), ("RMS Δp", "rms_dp", _pct),
    ("Cor(ln PPL)", "ppl_correlation", _pct), ("ln PPL ratio", "ln_ppl_ratio", _num),
    ("tail mass max", "tail_mass_max", _pct),
]


def token_table(cousins: list[dict], noise: dict | None, quantile_error: str | None) -> str:
    """Per cousin, the per-token distributions of KLD and Δp (quantiles from the merged histograms),
    Cor(ln PPL(Q), ln PPL(base)) and mean ln(PPL_c/PPL_o) ± its standard error."""
    shown = [c for c in cousins if not c.get("error") and not c.get("text_only")]
    shown += [noise] if noise and not noise.get("error") else []
    if not shown:
        return ""

    def cell(c: dict, key: str, fmt) -> str:
        m = _metric(c, key)
        text = fmt(m.get("value"))
        if key == "ln_ppl_ratio" and m.get("se") is not None:
            text += f" ± {fmt(m['se'])}"
        return f"<td>{escape(text)}</td>"

    head = ("<tr><th class=\"l\">token statistics</th>"
            + "".join(f"<th>{escape(h)}</th>" for h, _, _ in _TOKEN_COLUMNS) + "</tr>")
    body = "".join(f"<tr><td class=\"l name\">{escape(c['name'])}</td>"
                   + "".join(cell(c, k, f) for _, k, f in _TOKEN_COLUMNS) + "</tr>" for c in shown)
    return (f"<div class=\"scroll\"><table class=\"tokens\"><thead>{head}</thead><tbody>{body}</tbody></table></div>\n"
            "<p class=\"note\">llama.cpp's <code>--kl-divergence</code> set: KLD (nats) and Δp = q(y) − p(y) "
            "percentiles over every token of the original's outputs; Cor(ln PPL): Pearson's r of the tokens' "
            "log-probabilities under the two models; ln PPL ratio: mean ln(PPL(cousin)/PPL(original)) ± its "
            "standard error; tail mass: probability on ids past the tokenizer (padded logit rows; exact KLD only). "
            + escape(f"{quantile_error[:1].upper()}{quantile_error[1:]}." if quantile_error else "") + "</p>")


# --- across cousins -------------------------------------------------------------------------------

def across_cousins(cousins: list[dict], noise: dict | None, views: dict, colours: dict) -> str:
    shown = [c for c in cousins if not c.get("error")] + ([noise] if noise else [])
    out = []
    for title, metric in (("Same top-1 token", "same_top1"), ("Flip rate", "flip_rate")):
        bars = [(c["name"], _metric(c, metric), colours[c["name"]]) for c in shown
                if _value(c, metric) is not None]
        out.append(f"<h3>{escape(title)}</h3>")
        if bars:
            out.append(img(bar_figure(title, bars), f"{title} per cousin with confidence intervals"))
        else:
            why = "no cousin has token metrics" if metric == "same_top1" else "no prompt has a reference answer"
            out.append(f"<p class=\"note\">Not measured: {why}.</p>")
    ratios = []
    for c in shown:
        v = views.get(c["name"])
        if v is not None and v.length.sum() > 0:
            ratios.append((c["name"], v.length, v.length_mean, colours[c["name"]]))
    out.append("<h3>Length ratio (cousin tokens / original tokens, per prompt)</h3>")
    if ratios:
        out.append(img(length_figure(ratios), "distribution of length ratios per cousin"))
    else:
        out.append("<p class=\"note\">No drift rows with a length ratio.</p>")
    return "\n".join(out)


# --- per cousin ------------------------------------------------------------------------------------

def cousin_section(i: int, c: dict, noise: dict | None, view: ReportView | None, noise_view: ReportView | None,
                    colour: tuple) -> str:
    name = c["name"]
    facts = f"{escape(str(c['kind']))}, {c.get('rows', 0)} rows, {c.get('tokens', 0)} scored tokens"
    if c.get("text_only"):
        facts += ", text only (no token metrics)"
    out = [f"<section id=\"cousin-{i}\"><h3>{i + 1}. {escape(name)}</h3><p class=\"note\">{facts}</p>"]
    if c.get("error"):
        out.append(f"<p class=\"err\">This cousin failed: {escape(str(c['error']))}</p>")
    if c.get("error_rows"):
        n = c["error_rows"]
        out.append(f"<p class=\"err\">{n} {'row' if n == 1 else 'rows'} failed and "
                   f"{'is' if n == 1 else 'are'} left out of every figure.</p>")
    if not c.get("text_only") and not c.get("error"):
        if view is not None and view.kld is not None and view.kld.sum() > 0:
            series = [(name, view.kld, view.kld_mean, colour)]
            if noise_view is not None and noise_view.kld is not None and noise_view.kld.sum() > 0:
                series.append((NOISE, noise_view.kld, noise_view.kld_mean, NOISE_COLOUR))
            out.append("<h4>Per-token KLD</h4>")
            out.append(img(kld_figure(series), f"histogram and CDF of per-token KLD of {name}"))
    out.append(_slices(c, noise))
    out.append(_worst(c, view))
    out.append("</section>")
    return "\n".join(p for p in out if p)


def _slices(c: dict, noise: dict | None) -> str:
    slices = c.get("slices") or {}
    noise_slices = (noise or {}).get("slices") or {}
    out = []
    cat = slices.get("category") or {}
    if cat:
        ref = noise_slices.get("category") or {}
        cols = [("KLD mean", "kld_mean", _num), ("same top-1", "same_top1", _pct),
                ("flip rate", "flip_rate", _pct), ("length ratio", "length_ratio", _num)]
        out.append(_slice_table("By category", "category", "rows", cat, ref, cols))
    margin = slices.get("margin") or {}
    if margin and not c.get("text_only"):
        ref = noise_slices.get("margin") or {}
        cols = [("KLD mean", "kld_mean", _num), ("same top-1", "same_top1", _pct)]
        out.append(_slice_table("By the original's top-1 margin (p₁ − p₂)", "margin", "tokens", margin, ref,
                                cols, order=_margin_order))
    return "\n".join(out)


def _margin_order(key: str):
    try:
        return (0, float(key.strip("[(").split(",")[0]), key)
    except ValueError:
        return (1, 0.0, key)


def _slice_table(title: str, label: str, count: str, groups: dict, ref: dict, cols: list,
                 order=lambda k: k) -> str:
    has_ref = any(k in ref for k in groups)
    head = (f"<tr><th class=\"l\">{escape(label)}</th><th>{escape(count)}</th>"
            + "".join(f"<th>{escape(h)}</th>" for h, _, _ in cols)
            + ("<th>noise-floor KLD</th>" if has_ref else "") + "</tr>")
    body = []
    for key in sorted(groups, key=order):
        g = groups[key]
        cells = "".join(_cell(g.get(m) or {}, f) for _, m, f in cols)
        if has_ref:
            cells += _cell((ref.get(key) or {}).get("kld_mean") or {}, _num)
        body.append(f"<tr><td class=\"l\">{escape(str(key))}</td><td>{escape(str(g.get(count, '—')))}</td>"
                    f"{cells}</tr>")
    return f"<h4>{escape(title)}</h4><table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


def _worst(c: dict, view: ReportView | None) -> str:
    if view is None or view.worst.num_rows == 0:
        return ""
    key, label = ("chrf", "chrF") if c.get("text_only") else ("kld_mean", "KLD mean")
    top = view.worst.to_pylist()  # worst first (drift.aggregate.worst_order)
    what = "lowest chrF" if c.get("text_only") else "highest KLD mean"
    out = [f"<h4>Worst {len(top)} prompts ({what}); first divergent token marked</h4>"]
    for r in top:
        same = " · identical outputs" if r["exact_match"] else ""
        head = (f"prompt <b>{escape(str(r['prompt_id']))}</b> sample {r['sample_index']}"
                f" · {escape(str(r['category'] or '—'))} · {label} {escape(_num(r[key]))}"
                f" · length ratio {escape(_num(r['length_ratio']))}{same}")
        if r.get("checker"):  # a labelled prompt: the final answers the checker read, and its verdicts
            verdict = lambda ok: "✓" if ok else "✗"  # noqa: E731
            head += (f"<br>answers ({escape(r['checker'])}): original <b>{escape(str(r.get('answer_original')))}</b> "
                     f"{verdict(r.get('correct_original'))} · {escape(c['name'])} "
                     f"<b>{escape(str(r.get('answer_cousin')))}</b> {verdict(r.get('correct_cousin'))}")
        orig = marked(r["original_text"], r["div_original_start"], r["div_original_end"])
        cous = marked(r["cousin_text"], r["div_cousin_start"], r["div_cousin_end"])
        out.append(f"<div class=\"pair\" data-cousin=\"{escape(c['name'])}\" "
                   f"data-prompt=\"{escape(str(r['prompt_id']))}\"><div class=\"head\">{head}</div>"
                   f"<div class=\"texts\"><div><b>original</b><pre>{orig}</pre></div>"
                   f"<div><b>{escape(c['name'])}</b><pre>{cous}</pre></div></div></div>")
    return "\n".join(out)


def marked(text: str | None, start: int | None, end: int | None) -> str:
    """The escaped text with [start, end) in <mark>, cut to a window around it when long."""
    if text is None:
        return "<span class=\"cut\">(no text)</span>"
    n = len(text)
    if start is None or end is None or not 0 <= start <= end <= n:
        start = end = None
    lo = 0 if start is None else max(0, min(start - _TEXT_BUDGET // 3, n - _TEXT_BUDGET))
    hi = min(n, max(lo + _TEXT_BUDGET, end or 0))
    parts = [f"<span class=\"cut\">[… {lo} characters …]</span>"] if lo else []
    if start is None:
        parts.append(escape(text[lo:hi]))
    else:
        token = text[start:end]
        if not token:
            shown = "<mark class=\"end\">⟨end of text⟩</mark>"
        elif not token.strip():  # a whitespace token would be an invisible highlight
            visible = token.replace(" ", "·").replace("\t", "→").replace("\n", "↵\n")
            shown = f"<mark title=\"whitespace\">{escape(visible)}</mark>"
        else:
            shown = f"<mark>{escape(token)}</mark>"
        parts += [escape(text[lo:start]), shown, escape(text[end:hi])]
    if hi < n:
        parts.append(f"<span class=\"cut\">[… {n - hi} characters …]</span>")
    return "".join(parts)
