"""An audit's verdict as a terminal table (`table`) and as report.html (`report_html`), both from
audit.json's content."""

from __future__ import annotations

from html import escape

WHAT = {
    "mmd_hamming": "sampled texts: MMD, Hamming kernel within prompts",
    "topk_logprobs": "first token's top-k log-probabilities",
    "mcnemar": "correctness on labelled prompts (McNemar)",
}


def _fmt(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def _rows(tests: list[dict]) -> list[list[str]]:
    return [[t["name"], _fmt(t["statistic"]), "-" if not t["effect_ci"] else
             f"[{_fmt(t['effect_ci'][0])}, {_fmt(t['effect_ci'][1])}]", _fmt(t["p_value"], 3),
             "yes" if t["reject"] else "no", str(t["queries"])] for t in tests]


HEAD = ["test", "statistic", "CI", "p", "reject", "queries"]


def _fpr(aa: dict) -> str:
    if not aa.get("groups"):
        return "not measured (no group had a test)"
    lo, hi = aa["ci"]
    return (f"{aa['false_positives']} of {aa['groups']} groups ({aa['false_positive_rate']:.0%}, "
            f"CI {lo:.0%} to {hi:.0%})")


def table(a: dict) -> str:
    """What the job prints: the verdict, each test, the A/A's and the spend."""
    rows = [HEAD, *_rows(a["tests"])]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEAD))]
    lines = [f"audit {a['run_id']}: {a['verdict'].upper()} at alpha {a['alpha']} (Holm across tests)",
             f"target {a['target']['endpoint']} against {a['reference']['name']} "
             f"({a['reference']['endpoint'] or a['reference']['path']})"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    aa = a["a_a"]
    lines.append(f"A/A (the reference against itself): {aa['verdict']}; false positives over disjoint prompt "
                 f"groups: {_fpr(aa)}")
    s = a["spent"]
    lines.append(f"spent: {s['requests']} requests of a budget of {a['budget']} ({s['error_rows']} failed), "
                 f"{s['prompt_tokens']} prompt and {s['output_tokens']} output tokens; {a['prompts']} prompts "
                 f"x {a['samples']} samples")
    lines += [f"note: {n}" for n in a.get("notes", [])]
    return "\n".join(lines)


def _html_table(tests: list[dict]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in HEAD + ["what it compares"])
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + f"<td>{escape(WHAT.get(r[0], ''))}</td></tr>"
                   for r in _rows(tests))
    return f"<table><tr>{head}</tr>{body}</table>"


def report_html(a: dict) -> str:
    aa = a["a_a"]
    s = a["spent"]
    notes = "".join(f"<li>{escape(n)}</li>" for n in a.get("notes", []))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>audit {escape(a['run_id'])}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{padding:.2em .6em;text-align:left}}
.differs{{color:#b00}}.consistent{{color:#070}}</style></head><body>
<h1>Audit {escape(a['run_id'])}: <span class="{escape(a['verdict'])}">{escape(a['verdict'])}</span></h1>
<p>Is <b>{escape(str(a['target']['endpoint']))}</b> serving the output distribution of
<b>{escape(a['reference']['name'])}</b> ({escape(str(a['reference']['endpoint'] or a['reference']['path']))})?
H0: on these prompts, the target's outputs are distributed as the reference's. Verdict at alpha
{a['alpha']}, Holm's correction across the tests.</p>
<h2>Tests</h2>{_html_table(a['tests'])}
<h2>Calibration: the reference against itself</h2>
<p>The same tests on the reference against its own second sample (other seeds, other batching):
verdict <b>{escape(str(aa['verdict']))}</b>. Measured false-positive rate over disjoint groups of the prompts:
{escape(_fpr(aa))}.</p>{_html_table(aa['tests'])}
<h2>Spent</h2><p>{s['requests']} requests to the target (budget {a['budget']}), {s['error_rows']} failed;
{s['prompt_tokens']} prompt and {s['output_tokens']} output tokens; {a['prompts']} prompts x {a['samples']} samples.</p>
{f'<h2>Notes</h2><ul>{notes}</ul>' if notes else ''}
</body></html>
"""
