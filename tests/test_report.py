"""The drift report on a synthetic run: two quantized cousins, a text-only distilled one, a failed one and
the noise floor, with hostile model text. Unit checks parse the HTML; one test opens it in headless
Chromium to see that every plot decodes and the page is not blank."""

from __future__ import annotations

import base64
import dataclasses
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from cousins.drift.aggregate import merge_table
from cousins.drift.report import render_report
from cousins.contract.schema import DRIFT

HOSTILE = "<script>alert(1)</script> & \"double\" 'single' <img src=\"http://evil.example/x.png\">"
CATEGORIES = ["math", "code", "chat & <misc>"]
PROMPTS = 12
TOKEN_COUSINS = ["q8-w8a8", "int4-rtn-fakequant"]  # in ranked order: int4 drifts more, see KLD_SCALE
KLD_SCALE = {"q8-w8a8": 0.002, "int4-rtn-fakequant": 0.05, "noise-floor": 1e-5}
PLOTS = len(TOKEN_COUSINS) + 3  # a KLD figure per token cousin; same top-1, flip rate, length ratio


def _texts(i: int, cousin: str) -> dict:
    """The original's and the cousin's text for prompt i, and the character spans where they diverge."""
    if i == 3:  # the hostile prompt: the outputs diverge at the script's function name
        original, other = f"Sure: {HOSTILE}", f"Sure: {HOSTILE.replace('alert', 'confirm')}"
        a, b, c = original.index("alert"), other.index("confirm"), "confirm"
    else:
        original = f"Prompt {i}: the answer is {7 * i} & that's \"final\"."
        other = original.replace(f"is {7 * i} ", f"is {7 * i + 1} ")
        a = b = original.index(f"{7 * i}")
        c = str(7 * i + 1)
    if cousin == "noise-floor" and i != 3:  # the original against itself: mostly identical
        return dict(original_text=original, cousin_text=original, exact_match=True, first_divergence=None,
                    div_original_start=None, div_original_end=None, div_cousin_start=None, div_cousin_end=None)
    token = original[a:].split(" ")[0].split("(")[0]
    return dict(original_text=original, cousin_text=other, exact_match=False, first_divergence=5,
                div_original_start=a, div_original_end=a + len(token), div_cousin_start=b,
                div_cousin_end=b + len(c))


def _row(i: int, cousin: str, rng: np.random.Generator) -> dict:
    row = {f.name: None for f in DRIFT}
    row.update(prompt_id=f"p{i:02d}", sample_index=0, cousin=cousin, category=CATEGORIES[i % 3],
               original_tokens=20, cousin_tokens=int(rng.integers(12, 30)), finish_original="stop",
               finish_cousin="stop", finish_changed=False, correct_original=i % 2 == 0,
               correct_cousin=i % 2 == 0 or i == 5, **_texts(i, cousin))
    row["length_ratio"] = row["cousin_tokens"] / row["original_tokens"]
    row["flip"] = row["correct_original"] != row["correct_cousin"]
    if cousin == "fp8-broken":
        row["error"] = "engine failed to start: <CUDA> out of memory & gave up"
    elif cousin == "distill-tiny":
        row.update(tokens=0, chrf=90.0 - 5 * ((i * 5) % 12), rouge_l=0.8)
    else:
        kld = rng.exponential(KLD_SCALE[cousin], 20) * (10 if i == 3 else 1)
        if cousin == "noise-floor":
            kld[::3] = 0.0  # exact zeros must survive the log axis
        same = rng.random(20) > min(0.9, 5 * KLD_SCALE[cousin])
        row.update(tokens=20, kld_tokens=kld.tolist(), rest_mass_tokens=[0.01] * 20,
                   margin_tokens=rng.random(20).tolist(), same_top1_tokens=same.tolist(),
                   dp_tokens=rng.normal(0, 0.05, 20).tolist(), kld_mean=float(kld.mean()),
                   kld_max=float(kld.max()), same_top1=float(same.mean()), nll_original=10.0,
                   nll_cousin=10.5, chrf=80.0, rouge_l=0.9)
        if cousin == "int4-rtn-fakequant" and i == 7:
            row["error"] = "scoring failed: prompt too long"
    return row


def _m(v, spread: float = 0.1) -> dict:
    return {"value": v, "ci": None if v is None else [v * (1 - spread), v * (1 + spread)]}


def _summary_of(name: str, kind: str, rows: list[dict], *, text_only=False, error=None) -> dict:
    ok = [r for r in rows if r["error"] is None]
    kld = np.concatenate([r["kld_tokens"] for r in ok]) if ok and not text_only else np.empty(0)
    token = not text_only and not error
    metrics = {n: _m(None) for n in (
        "kld_mean kld_median kld_p90 kld_p99 kld_p999 kld_max same_top1 mean_dp rms_dp ppl_original "
        "ppl_cousin ppl_ratio ln_ppl_ratio exact_match first_divergence_mean chrf rouge_l length_ratio "
        "finish_changed accuracy_original accuracy_cousin accuracy_delta flip_rate").split()}
    if ok:
        metrics.update(chrf=_m(float(np.mean([r["chrf"] for r in ok]))),
                       length_ratio=_m(float(np.mean([r["length_ratio"] for r in ok]))),
                       exact_match=_m(float(np.mean([r["exact_match"] for r in ok]))),
                       flip_rate=_m(float(np.mean([r["flip"] for r in ok]))), accuracy_delta=_m(0.05))
    if token and ok:
        metrics.update(kld_mean=_m(float(kld.mean())), kld_p99=_m(float(np.quantile(kld, 0.99))),
                       kld_max=_m(float(kld.max()), 0), rms_dp=_m(0.05), ppl_ratio=_m(1.02, 0.01),
                       same_top1=_m(float(np.mean([r["same_top1"] for r in ok])), 0.02))
    by_cat = {c: {"rows": sum(r["category"] == c for r in ok), "kld_mean": metrics["kld_mean"],
                  "same_top1": metrics["same_top1"], "flip_rate": metrics["flip_rate"],
                  "length_ratio": metrics["length_ratio"]} for c in CATEGORIES} if ok else {}
    margin = {b: {"tokens": 40, "kld_mean": metrics["kld_mean"], "same_top1": metrics["same_top1"]}
              for b in ("[0.5,1.0]", "[0.0,0.1)", "[0.1,0.5)")} if token and ok else {}
    return {"name": name, "kind": kind, "text_only": text_only, "rows": len(rows),
            "tokens": int(kld.size), "error_rows": len(rows) - len(ok), "error": error,
            "metrics": metrics, "slices": {"category": by_cat, "margin": margin}}


@pytest.fixture(scope="module")
def run():
    rng = np.random.default_rng(0)
    kinds = {"q8-w8a8": "quantized", "int4-rtn-fakequant": "quantized", "distill-tiny": "distilled",
             "fp8-broken": "quantized", "noise-floor": "noise"}
    rows = {name: [_row(i, name, rng) for i in range(PROMPTS)] for name in kinds}
    drift = pa.Table.from_pylist([r for rs in rows.values() for r in rs], schema=DRIFT)
    cousins = [  # deliberately not in ranked order
        _summary_of("fp8-broken", "quantized", rows["fp8-broken"], error="engine failed: <CUDA> OOM & gave up"),
        _summary_of("distill-tiny", "distilled", rows["distill-tiny"], text_only=True),
        _summary_of("q8-w8a8", "quantized", rows["q8-w8a8"]),
        _summary_of("int4-rtn-fakequant", "quantized", rows["int4-rtn-fakequant"]),
    ]
    summary = {
        "run_id": "run-<2026>&test", "original": "tiny-teacher", "score_topk": 20, "prompts": PROMPTS,
        "bootstrap": {"resamples": 1000, "level": 0.95, "seed": 0},
        "kld_bound": "Computed on the union of both top-20 sets plus a rest bucket; it is a lower bound.",
        "noise_floor": _summary_of("noise-floor", "noise", rows["noise-floor"]), "cousins": cousins,
        "warnings": ["q8-w8a8: the original puts 78.0% of its probability outside its top-20 <on average>"],
    }
    return summary, drift


def _views(drift: pa.Table, worst_n: int = 10) -> dict:
    """The report's inputs as the diff's workers make them (one partial per cousin here)."""
    merged = merge_table(drift, text_only={"distill-tiny"}, worst_n=worst_n, quantile_resamples=0)
    return {name: m.view() for name, m in merged.items()}


@pytest.fixture(scope="module")
def html(run):
    summary, drift = run
    return render_report(summary, _views(drift))


class _Tags(HTMLParser):
    """Every start tag with its attributes, and the text inside each <mark>."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.marks: list[str] = []
        self._in_mark = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_mark = self._in_mark or tag == "mark"
        if tag == "mark":
            self.marks.append("")

    def handle_endtag(self, tag):
        if tag == "mark":
            self._in_mark = False

    def handle_data(self, data):
        if self._in_mark:
            self.marks[-1] += data


def test_report_is_self_contained(html):
    tags = _Tags(html).tags
    imgs = [a["src"] for t, a in tags if t == "img"]
    assert len(imgs) == PLOTS
    for src in imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    for tag, attrs in tags:  # nothing is fetched: no URL in any src/href, no stylesheet link
        assert tag != "link", attrs
        for key in ("src", "href", "action", "srcset", "poster", "data"):
            value = attrs.get(key) or ""
            assert "//" not in value or value.startswith("data:"), (tag, attrs)
    assert "url(" not in html and "@import" not in html
    assert [t for t, _ in tags].count("script") == 1  # only the report's own image check


def test_hostile_text_is_escaped(html):
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;<mark>alert</mark>(1)&lt;/script&gt;" in html
    assert "&quot;double&quot; &#x27;single&#x27;" in html
    assert "&lt;img src=&quot;http://evil.example/x.png&quot;&gt;" in html
    assert not any(a.get("src", "").startswith("http") for _, a in _Tags(html).tags)
    assert "chat &amp; &lt;misc&gt;" in html and "run-&lt;2026&gt;&amp;test" in html
    assert "engine failed: &lt;CUDA&gt; OOM &amp; gave up" in html  # the failed cousin shows its error


def test_first_divergent_token_ismarked(html):
    marks = _Tags(html).marks
    assert "alert" in marks and "confirm" in marks  # the hostile prompt, original and cousin side
    assert "28" in marks and "29" in marks  # prompt 4: "the answer is 28" vs "29"


def test_cousins_in_ranked_order(html):
    ranking = html[html.index("<table class=\"ranking\">"):]
    ranking = ranking[:ranking.index("</table>")]
    body, foot = ranking.split("<tfoot>")
    names = re.findall(r"<a href=\"#cousin-\d+\">([^<]+)</a>", body)
    assert names == ["int4-rtn-fakequant", "q8-w8a8", "distill-tiny", "fp8-broken"]
    assert "noise-floor" in foot
    text_only = body[body.index("distill-tiny"):body.index("fp8-broken")]
    assert text_only.count("<td>—</td>") >= 6  # KLD mean/p99/max, same top-1, RMS Δp, PPL ratio
    sections = re.findall(r"<section id=\"cousin-\d+\"><h3>\d+\. ([^<]+)</h3>", html)
    assert sections == names


def test_worst_prompts_per_cousin(run):
    summary, drift = run
    html = render_report(summary, _views(drift, worst_n=2))
    shown = re.findall(r"<div class=\"pair\" data-cousin=\"([^\"]+)\" data-prompt=\"([^\"]+)\">", html)
    by = {}
    for cousin, prompt in shown:
        by.setdefault(cousin, []).append(prompt)
    kld = {}
    for r in drift.to_pylist():
        if r["cousin"] == "int4-rtn-fakequant" and r["error"] is None:
            kld[r["prompt_id"]] = r["kld_mean"]
    assert by["int4-rtn-fakequant"] == sorted(kld, key=kld.get, reverse=True)[:2]
    assert by["int4-rtn-fakequant"][0] == "p03"  # the hostile prompt drifts most
    assert by["distill-tiny"] == ["p07", "p02"]  # lowest chrF first (35, 40)
    assert "fp8-broken" not in by and "noise-floor" not in by  # failed rows have nothing to show
    assert "p07" not in by["int4-rtn-fakequant"]  # its failed row is left out


def test_missing_inputs_are_named_at_once(run):
    _, drift = run
    views = _views(drift)
    views["q8-w8a8"] = dataclasses.replace(views["q8-w8a8"], worst=views["q8-w8a8"].worst.drop_columns(["chrf"]))
    expected = r"missing keys \['run_id'.*'cousins'\].*worst rows of 'q8-w8a8' lack columns \['chrf'\]"
    with pytest.raises(ValueError, match=expected):
        render_report({}, views)


def test_without_noise_floor_or_labels(run):
    summary, drift = run
    summary = {**summary, "noise_floor": None,
               "cousins": [{**c, "metrics": {**c["metrics"], "flip_rate": {"value": None, "ci": None}}}
                           for c in summary["cousins"]]}
    html = render_report(summary, _views(drift.filter(pc.not_equal(drift["cousin"], "noise-floor"))))
    assert "<tfoot>" not in html and "not measured in this run" in html
    assert "Not measured: no prompt has a reference answer." in html
    assert html.count("<img ") == PLOTS - 1  # no flip-rate chart


def test_long_text_is_cut_around_the_divergence():
    from cousins.drift.report_sections import marked

    shown = marked("a" * 10_000 + "<b>" + "z" * 10_000, 10_000, 10_003)
    assert "<mark>&lt;b&gt;</mark>" in shown and len(shown) < 5_000
    assert shown.startswith("<span class=\"cut\">[… ") and shown.endswith(" characters …]</span>")
    assert marked("abc", 3, 3) == "abc<mark class=\"end\">⟨end of text⟩</mark>"  # the cousin stopped early


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="no chromium or chromium-browser on PATH "
                    "(apt-get install chromium) to open the report in a real browser")
def test_report_renders_in_chromium(html, tmp_path):
    from PIL import Image

    report = tmp_path / "report.html"
    report.write_text(html, encoding="utf-8")
    shot = tmp_path / "report.png"
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,4000"]

    dom = subprocess.run([*base, "--virtual-time-budget=10000", "--dump-dom", report.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    loaded = re.search(r"data-images-loaded=\"(\d+)/(\d+)\"", dom.stdout)
    assert loaded, f"the report's image check did not run (blocked script?): {dom.stderr[-2000:]}"
    decoded, total = map(int, loaded.groups())
    assert decoded == total >= PLOTS
    assert "<script>alert(1)" not in dom.stdout

    run = subprocess.run([*base, f"--screenshot={shot}", report.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    with Image.open(shot) as img:
        assert img.size == (1280, 4000)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50  # None: more colours than maxcolors


def test_warnings_are_shown_under_the_header_escaped(html):
    assert '<ul class="warnings"><li>q8-w8a8: the original puts 78.0% of its probability outside its top-20 ' \
           '&lt;on average&gt;</li></ul>' in html
    assert "<th>rest mass</th>" in html


def test_the_token_statistics_table_shows_llama_cpps_figures(run):
    """KLD and Δp percentiles, Cor(ln PPL) and ln PPL ratio ± s.e. per token-level cousin and the
    noise floor; the text-only and the failed cousin are not in it."""
    import copy

    summary, drift = copy.deepcopy(run)
    q8 = next(c for c in summary["cousins"] if c["name"] == "q8-w8a8")
    q8["metrics"].update(ppl_correlation={"value": 0.9876, "ci": None}, dp_p99={"value": 0.0712, "ci": None},
                         ln_ppl_ratio={"value": 0.0241, "ci": [0.02, 0.03], "se": 0.0013},
                         kld_p001={"value": 0.0, "ci": None}, rkld_mean={"value": 0.0345, "ci": [0.03, 0.04]})
    summary["quantile_error"] = "token KLD quantiles within a factor 1.01"
    html = render_report(summary, _views(drift))
    table = html[html.index('<table class="tokens">'):]
    table = table[:table.index("</table>")]
    assert "<th>Cor(ln PPL)</th>" in table and "<th>ln PPL ratio</th>" in table and "<th>p99.9</th>" in table
    row = table[table.index("q8-w8a8"):]
    row = row[:row.index("</tr>")]
    assert "<td>98.8%</td>" in row and "<td>7.1%</td>" in row and "<td>0.0241 ± 0.0013</td>" in row
    assert "int4-rtn-fakequant" in table and "noise-floor" in table
    assert "distill-tiny" not in table and "fp8-broken" not in table
    assert "Token KLD quantiles within a factor 1.01." in html
    assert "<th>reverse KLD</th>" in html and "0.0345" in html  # in the ranking too


# --- capability against cost ------------------------------------------------------------------------

PLANE_KINDS = {"tiny-teacher": "original", "q8-w8a8": "quantized", "int4-rtn-fakequant": "quantized",
               "distill-tiny": "distilled", "fp8-broken": "quantized", "noise-floor": "noise"}


def _with_plane(summary: dict, correct: dict, cost: float | None = 1.0) -> dict:
    """The summary with a plane made from made-up accounting: `correct` of 48 labelled rows (12
    prompts) per model; the broken cousin has no answered labelled row."""
    from cousins.drift.plane import plane

    acct = {}
    for name in PLANE_KINDS:
        labelled = 0 if name == "fp8-broken" else 48
        c = correct.get(name, 0)
        acct[name] = {"labelled_rows": labelled, "correct_rows": c, "labelled_prompts": 12 if labelled else 0,
                      "accuracy_se": 0.06 if 0 < c < labelled else None,
                      "tokens_per_correct": 20.0 * labelled / c if c else None,
                      "cost_per_1m_output_tokens": None if cost is None or not labelled else
                      cost * (0.5 if name.startswith("int4") else 1.0)}
    return {**summary, "cost_currency": "EUR", "plane": plane(acct, PLANE_KINDS, level=0.95, currency="EUR")}


def _plane_html(html: str) -> str:
    return html[html.index("<h2>Capability against cost</h2>"):html.index("<h2>Across cousins</h2>")]


def test_the_plane_is_a_figure_and_a_table_with_the_frontiermarked(run):
    summary, drift = run
    correct = {"tiny-teacher": 36, "q8-w8a8": 35, "int4-rtn-fakequant": 30, "distill-tiny": 20, "noise-floor": 36}
    html = render_report(_with_plane(summary, correct), _views(drift))
    section = _plane_html(html)
    assert html.count("<img ") == PLOTS + 1 and section.count("<img ") == 1
    rows = {m[0]: m[1:] for m in re.findall(r"<tr><td class=\"l\">([^<]+)</td><td class=\"l\">([^<]+)</td>"
                                             r"<td>([^<]+)<.*?<td class=\"l\">([^<]+)</td></tr>", section)}
    assert set(rows) == set(PLANE_KINDS)
    assert rows["tiny-teacher"] == ("original", "36 / 48", "yes")
    assert rows["int4-rtn-fakequant"][2] == "yes"  # less accurate, but half the price per token
    assert rows["q8-w8a8"][2] == "no: tiny-teacher (within CI)"  # one answer fewer at the same price
    assert rows["distill-tiny"][2] == "no: tiny-teacher, q8-w8a8, int4-rtn-fakequant (within CI)"
    assert rows["noise-floor"][2] == "reference" and rows["fp8-broken"] == ("quantized", "0 / 0", "—")
    assert "75.0%<small class=\"ci\">[" in section and "Wilson interval" in section


def test_the_plane_without_labelled_prompts_or_a_price_or_a_correct_answer(run):
    summary, drift = run
    views = _views(drift)
    none_labelled = {**summary, "plane": {**_with_plane(summary, {})["plane"], "models": [
        {**m, "labelled_rows": 0, "correct_rows": 0, "accuracy": {"value": None, "ci": None}, "frontier": None,
         "dominated_by": []} for m in _with_plane(summary, {})["plane"]["models"]]}}
    section = _plane_html(render_report(none_labelled, views))
    assert "Not measured: no prompt has a reference answer" in section and "<img " not in section
    # no price: the figure has the tokens panel only, and the frontier leaves cost out
    html = render_report(_with_plane(summary, {"tiny-teacher": 36, "q8-w8a8": 30}, cost=None), views)
    section = _plane_html(html)
    assert section.count("<img ") == 1 and "no price configured" in section
    assert "accuracy, tokens per correct answer)" in section
    # nobody correct and no price: nothing to draw, said instead of an empty chart
    section = _plane_html(render_report(_with_plane(summary, {}, cost=None), views))
    assert "<img " not in section and "No figure: no model answered a labelled prompt correctly" in section
    assert "<table class=\"plane\">" in section
    # a summary made before the plane has no section
    assert "Capability against cost" not in render_report(summary, views)
