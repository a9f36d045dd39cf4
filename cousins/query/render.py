"""Plain-text rendering of the query's answers: what `cousins query` prints without --json.

Owns the padded text tables and the text views of the run list, one run, a drift page, a prompt and
drift summaries. It only formats the dicts the data functions of `cousins.query.runs`, `.drift` and
`.prompt` return and reads no storage; none of them imports it (the query service needs none of it).
"""

from __future__ import annotations

import re
from typing import Any, Iterable

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 (not tab, newline), DEL, C1: ESC, CSI, ...
_RAW_IN_JSON = re.compile(r"[\x7f-\x9f]")  # what json.dumps(ensure_ascii=False) leaves raw


def terminal_safe(text: str) -> str:
    """Text for a terminal: control characters (escape sequences included) shown as \\xNN instead
    of acted on; newlines and tabs kept. Model outputs and corpus text are untrusted."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def json_safe(dumped: str) -> str:
    """JSON text (from json.dumps with ensure_ascii=False) with DEL and C1 controls escaped as
    \\u00NN: the same JSON value, nothing a terminal acts on."""
    return _RAW_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", dumped)


def text_table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    """Columns padded to their widest cell, a rule under the header."""
    rows = [[_cell(c) for c in r] for r in [list(header), *rows]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value).replace("\n", "\\n")
    return text if len(text) <= 60 else text[:57] + "..."


def render_runs(runs: list[dict]) -> str:
    rows = [(r["run_id"], r["status"], (r.get("created") or "")[:19], r.get("kind") or "-",
             ", ".join(m["name"] for m in r.get("models") or []) or _progress_text(r), r.get("prompts"),
             sum(v or 0 for v in (r.get("rows") or {}).values())) for r in runs]
    committed = sum(r["status"] == "committed" for r in runs)
    other = len(runs) - committed
    return text_table(("run", "status", "created", "kind", "models", "prompts", "rows"), rows) + \
        f"\n{committed} committed run(s)" + (f", {other} other" if other else "")


def _progress_text(r: dict) -> str:
    if r.get("detail"):
        return r["detail"]
    if "stages_done" not in r:
        return ""
    return (f"published: {', '.join(r['stages_done']) or 'nothing yet'}; "
            f"{sum((r.get('parts') or {}).values())} part file(s); updated {(r.get('updated') or '?')[:19]}")


def render_run(run: dict) -> str:
    m = run["manifest"]
    counts = m.get("row_counts") or {}
    head = [f"run {run['run_id']} ({run['kind']}): {run['status']} {run['committed']}",
            f"created {run['created']}; config hash {m.get('config_hash')}; resumed {m.get('resumed')}",
            f"corpus {(m.get('corpus') or {}).get('path')}: {run['prompts']} prompts, "
            f"{(m.get('corpus') or {}).get('error_rows')} error rows; {run['samples']} sample(s) per prompt"]
    rows = [(x.get("name"), x.get("kind"), x.get("dtype"), x.get("quantization"),
             (counts.get(x.get("name")) or {}).get("rows"), (counts.get(x.get("name")) or {}).get("error_rows"),
             (counts.get(x.get("name")) or {}).get("output_tokens")) for x in m.get("models") or []]
    return "\n".join(head) + "\n\n" + text_table(
        ("model", "kind", "dtype", "quantization", "rows", "error rows", "output tokens"), rows)


def render_drift(page: dict) -> str:
    cols = ("cousin", "prompt_id", "sample_index", "category", "kld_mean", "same_top1", "chrf",
            "exact_match", "first_divergence", "flip", "length_ratio", "error")
    rows = [[r.get(c) for c in cols] for r in page["rows"]]
    header = ("cousin", "prompt", "sample", "category", "KLD mean", "same top-1", "chrF", "exact",
              "first div", "flip", "len ratio", "error")
    end = page["offset"] + len(page["rows"])
    return text_table(header, rows) + (f"\nrows {page['offset'] + 1 if rows else 0}-{end} of {page['total']} "
                                       f"(sorted by {page['sort']} {page['order']})")


def render_prompt(view: dict) -> str:
    """Each sample's generations one under another, the first divergent token in ⟦ ⟧."""
    p = view["prompt"]
    lines = [f"prompt {p['prompt_id']} (category {p['category'] or '-'}, reference {p['reference']!r})"]
    for msg in p["messages"] or []:
        lines.append(f"  [{msg['role']}] {msg['content']}")
    width = max([len(g["model"]) for s in view["samples"] for g in s["generations"]] + [5])
    for s in view["samples"]:
        lines.append(f"\nsample {s['sample_index']}")
        for g in s["generations"]:
            text, vs = g["output_text"] or "", g["vs_original"]
            note = g["error"] and f"error: {g['error'].splitlines()[0][:120]}"
            if vs is not None:
                if vs["cousin_span"]:
                    a, b = vs["cousin_span"]
                    text = f"{text[:a]}⟦{text[a:b]}⟧{text[b:]}"
                note = note or ("identical" if vs["exact_match"] else f"diverges at token {vs['first_divergence']}")
                if vs.get("checker"):  # the final answers as the checker read them
                    note += (f"; {vs['checker']}: original {vs.get('answer_original')!r}, "
                             f"this {vs.get('answer_cousin')!r}{' (flip)' if vs.get('flip') else ''}")
            elif g["model"] == view["original"]:
                note = note or "original"
            lines.append(f"  {g['model'].ljust(width)}  {(g['finish_reason'] or '-'):6}  "
                         f"{text!r}  ({note or '-'})")
    return "\n".join(lines)


def render_summary(summary: dict) -> str:
    """The whole summary: cousins ranked by drift, the noise floor last (the job's own table)."""
    from cousins.drift.table import drift_table

    return drift_table(summary)


def render_cousin_summary(view: dict) -> str:
    """One cousin's every figure with its CI, beside the noise floor's."""
    c, noise = view["cousin"], view.get("noise_floor") or {}
    head = (f"run {view['run_id']}: {c['name']} ({c['kind']}) against {view['original']}; {c['rows']} rows, "
            f"{c['tokens']} tokens, {c['error_rows']} error rows" + (f"; error: {c['error']}" if c["error"] else ""))
    nm = noise.get("metrics") or {}
    rows = [(name, _figure(m), _figure(nm.get(name))) for name, m in sorted((c.get("metrics") or {}).items())]
    b = view["bootstrap"]
    return head + "\n\n" + text_table(("metric", "value [CI]", "noise floor [CI]"), rows) + (
        f"\n[CI] = {100 * b['level']:.0f}% bootstrap over prompts ({b['resamples']} resamples)") + "".join(
        f"\nwarning: {w}" for w in view.get("warnings") or []) + _plane_text(view.get("plane"), view["original"],
                                                                             c["name"])


def _plane_text(plane: dict | None, original: str, cousin: str) -> str:
    """The cousin's and the original's places on the capability-against-cost plane."""
    from cousins.drift.plane import plane_row

    if not plane:
        return ""
    shown = [m for m in plane["models"] if m["name"] in (original, cousin)]
    if not any(m["labelled_rows"] for m in shown):
        return "\n\ncapability against cost: not measured (no labelled prompts)"
    rows = [(m["name"], *plane_row(m)) for m in shown]
    return (f"\n\ncapability against cost ([CI]: {100 * plane['level']:.0f}% Wilson, samples clustered by prompt; "
            f"cost per 1M output tokens in {plane['currency']}; frontier among the run's models)\n"
            + text_table(("model", "correct/labelled", "accuracy [CI]", "tok/correct [CI]", "cost/1M", "frontier"),
                         rows) + "".join(f"\nnote: {n}" for n in plane["notes"]))


def _figure(m: dict | None) -> str:
    if not m or m.get("value") is None:
        return "-"
    ci = m.get("ci")
    return f"{m['value']:.4g} [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else f"{m['value']:.4g}"
