"""`cousins.query` (runs, drift, prompt) and `cousins query` over hand-written runs: committed ones are visible, others
are not, pages are stable and bounded, names are checked, and the CLI prints tables and --json.

The runs are written here with pyarrow to the schemas of `cousins.contract.schema` (no engine): a drift run
(an original, two cousins and the noise floor, 2 samples, drift rows in several part files, a real
`summarise` summary, a report), a generation-only run, a run without a manifest and one whose
manifest is not committed. `write_runs` is shared with tests/test_service.py."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest

from cousins.query.drift import drift_page, get_summary
from cousins.query.inputs import MAX_LIMIT, MAX_OFFSET, BadInput, Damaged, NotFound, Unavailable
from cousins.query.prompt import prompt_view
from cousins.query.runs import get_config, get_manifest, get_report, get_run, list_runs
from cousins.contract import schema
from cousins.cli import main
from cousins.drift.summary import BootstrapSpec, summarise
from cousins.drift.plane import plane
from cousins.run.layout import RunLayout
from cousins.run.storage import Location, mark_done, resolve, write_parquet_atomic

ORIGINAL = "teacher"
COUSINS = {"q8": ("quantized", 0.3, 0.002), "student": ("distilled", 0.8, 0.4),
           "noise-floor": ("noise", 0.0, 0.0)}  # name: (kind, chance to diverge, KLD scale)
WORDS = "the a cat sat on mat of code is 42 seven blue red 7 yes no".split()
CATEGORIES = ("arithmetic", "code", "facts")
ODD_ID = "set-1/item 7"  # a corpus id with a slash and a space: ids are values, never paths
DRIFT_RUN, GEN_RUN, PENDING_RUN, FAILED_RUN = "drift-1", "gen-1", "pending-1", "failed-1"


def _text(ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """Token ids → text (one word per token, space-joined) and each token's character span."""
    spans, pos, parts = [], 0, []
    for i, t in enumerate(ids):
        piece = ("" if i == 0 else " ") + WORDS[t % len(WORDS)]
        spans.append((pos, pos + len(piece)))
        parts.append(piece)
        pos += len(piece)
    return "".join(parts), spans


def _write(table: pa.Table, sch: pa.Schema, stage: Location, rows_per_file: int) -> None:
    table = schema.conform(table, sch)
    for i, start in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
        write_parquet_atomic(table.slice(start, rows_per_file), stage.join(f"part-{i:05d}.parquet"))
    mark_done(stage, {"rows": table.num_rows})


def write_run(root: Location, run_id: str, *, prompts: int = 60, samples: int = 2, drift: bool = True,
              rows_per_file: int = 40, manifest_status: str | None = "committed", seed: int = 0) -> dict:
    """One run under root/runs/run_id; returns what the tests need to know about it."""
    rng = np.random.default_rng(seed)
    layout = RunLayout(root, run_id)
    layout.config.write_text_atomic(
        f"model:\n  name: {ORIGINAL}\n  path: /models/{ORIGINAL}\nrun:\n  run_id: {run_id}\n  samples: {samples}\n"
        f"storage:\n  root: {root.url}\n  options:\n    secret: '***'\n")
    ids = [ODD_ID, *[f"p{i:04d}" for i in range(1, prompts)]]
    cats = [CATEGORIES[i % 3] for i in range(prompts)]
    refs = [str(i % 10) if c == "arithmetic" else None for i, c in enumerate(cats)]
    _write(pa.table({"prompt_id": ids,
                     "messages": [[{"role": "user", "content": f"question {i}?"}] for i in range(prompts)],
                     "category": cats, "reference": refs, "choices": [None] * prompts, "checker": [None] * prompts,
                     "source": ["corpus.jsonl"] * prompts,
                     "source_row": list(range(prompts))}), schema.PROMPTS, layout.prompts, rows_per_file)

    models = [ORIGINAL, *(COUSINS if drift else [])]
    gens = {m: [] for m in models}
    drift_rows = {c: [] for c in COUSINS}
    for p, (pid, cat, ref) in enumerate(zip(ids, cats, refs)):
        for s in range(samples):
            orig = rng.integers(0, 1000, int(rng.integers(4, 17))).tolist()
            variants = {ORIGINAL: orig}
            for c, (_, p_div, _) in COUSINS.items():
                out = list(orig)
                if drift and rng.random() < p_div:
                    d = int(rng.integers(0, len(orig)))
                    out = orig[:d] + rng.integers(0, 1000, int(rng.integers(1, 12))).tolist()
                    if out == orig:
                        out = orig + [1]
                variants[c] = out
            for m in models:
                out = variants[m]
                text, _ = _text(out)
                gens[m].append({"prompt_id": pid, "sample_index": s, "model": m, "seed": 1000 * p + s,
                                "category": cat, "prompt_text": f"<user>question {p}?", "output_text": text,
                                "output_token_ids": out, "output_logprobs": [-1.0] * len(out),
                                "topk_token_ids": [[t, t + 1] for t in out], "topk_logprobs": [[-1.0, -2.0]] * len(out),
                                "finish_reason": "stop" if len(out) < 12 else "length", "prompt_tokens": 5,
                                "output_tokens": len(out), "engine_time_s": 0.01, "engine_node": "node-0",
                                "error": None})
            if not drift:
                continue
            otext, ospans = _text(orig)
            for c, (_, _, scale) in COUSINS.items():
                out = variants[c]
                ctext, cspans = _text(out)
                n = len(orig)
                kld = (rng.exponential(scale, n) if scale else np.zeros(n)).astype(np.float32)
                same = (kld < 3 * max(scale, 1e-9)).tolist()
                fd = next((i for i, (a, b) in enumerate(zip(orig, out)) if a != b), None)
                if fd is None and len(orig) != len(out):
                    fd = min(len(orig), len(out))
                co = None if ref is None else bool(rng.random() < 0.5)
                cc = None if co is None else (co if rng.random() > (0.3 if c == "student" else 0.0) else not co)
                row = {"prompt_id": pid, "sample_index": s, "cousin": c, "category": cat, "tokens": n,
                       "kld_tokens": kld.tolist(), "rest_mass_tokens": rng.uniform(0, 0.2, n).tolist(),
                       "margin_tokens": rng.uniform(0, 1, n).tolist(), "same_top1_tokens": same,
                       "dp_tokens": rng.normal(0, scale or 1e-9, n).tolist(),
                       "kld_mean": float(kld.mean()), "kld_max": float(kld.max()),
                       "same_top1": float(np.mean(same)), "nll_original": float(n), "nll_cousin": float(n + kld.sum()),
                       "original_tokens": n, "cousin_tokens": len(out), "length_ratio": len(out) / n,
                       "exact_match": out == orig, "first_divergence": fd,
                       "chrf": 100.0 if out == orig else float(rng.uniform(20, 95)),
                       "rouge_l": 1.0 if out == orig else float(rng.uniform(0.2, 0.95)),
                       "finish_original": "stop" if n < 12 else "length",
                       "finish_cousin": "stop" if len(out) < 12 else "length",
                       "finish_changed": (n < 12) != (len(out) < 12),
                       "correct_original": co, "correct_cousin": cc, "flip": None if co is None else co != cc,
                       "checker": None if co is None else "math", "answer_original": None if co is None else str(n),
                       "answer_cousin": None if co is None else str(len(out)), "original_text": otext, "cousin_text": ctext,
                       "div_original_start": None, "div_original_end": None,
                       "div_cousin_start": None, "div_cousin_end": None, "error": None}
                if fd is not None:
                    row["div_original_start"], row["div_original_end"] = ospans[fd] if fd < n else (len(otext),) * 2
                    row["div_cousin_start"], row["div_cousin_end"] = (
                        cspans[fd] if fd < len(out) else (len(ctext),) * 2)
                drift_rows[c].append(row)
    if drift:  # one row the student's engine failed: no metrics, an error
        bad = drift_rows["student"][-1]
        for k in ("kld_tokens", "rest_mass_tokens", "margin_tokens", "same_top1_tokens", "dp_tokens", "kld_mean",
                  "kld_max", "same_top1", "nll_original", "nll_cousin", "chrf", "rouge_l", "flip"):
            bad[k] = None
        bad["error"] = "engine failed on this row"

    for m in models:
        _write(pa.Table.from_pylist(gens[m], schema.GENERATIONS), schema.GENERATIONS, layout.generations(m),
               rows_per_file)
    summary = None
    if drift:
        spec = BootstrapSpec(resamples=50, level=0.95, seed=0, quantile_resamples=20)
        summaries = {}
        for c, (kind, _, _) in COUSINS.items():
            table = pa.Table.from_pylist(drift_rows[c], schema.DRIFT)
            _write(table, schema.DRIFT, layout.drift(c), rows_per_file)
            summaries[c] = summarise(c, kind, table, spec)
        # A crashed attempt's leftovers are never data: they would duplicate rows if read.
        write_parquet_atomic(table.slice(0, 5), layout.drift(c).join("_tmp", "part-leftover.parquet"))
        noise = summaries.pop("noise-floor")
        # the capability-against-cost plane, from made-up accounting: the student is cheap, less accurate
        acct = {m: {"labelled_rows": 40, "correct_rows": correct, "labelled_prompts": 20, "accuracy_se": 0.05,
                    "tokens_per_correct": tpc, "cost_per_1m_output_tokens": cost}
                for m, correct, tpc, cost in ((ORIGINAL, 30, 12.0, 2.0), ("q8", 30, 11.5, 1.5),
                                              ("student", 18, 15.0, 0.5), ("noise-floor", 30, 12.0, 2.0))}
        kinds = {ORIGINAL: "original", **{c: k for c, (k, _, _) in COUSINS.items()}}
        summary = {"run_id": run_id, "original": ORIGINAL, "score_topk": 20, "prompts": prompts,
                   "bootstrap": {"resamples": spec.resamples, "level": spec.level, "seed": spec.seed,
                                 "quantile_resamples": spec.quantile_resamples},
                   "kld_bound": "a lower bound", "answer_match": "contains", "noise_floor": noise,
                   "cousins": sorted(summaries.values(), key=lambda s: -(s["metrics"]["kld_mean"]["value"] or 0)),
                   "computed": datetime.now(timezone.utc).isoformat(), "timings": {"diff_s": 0.1, "report_s": 0.1},
                   "cost_currency": "EUR", "plane": plane(acct, kinds, level=spec.level, currency="EUR")}
        layout.summary.write_text_atomic(json.dumps(summary, indent=1, allow_nan=False))
        layout.report.write_text_atomic(f"<!DOCTYPE html><html><body><h1>drift report {run_id}</h1></body></html>")

    n_rows = prompts * samples
    manifest = {
        "run_id": run_id, "status": manifest_status, "committed": datetime.now(timezone.utc).isoformat(),
        "resumed": False, "config_hash": "0123456789ab", "versions": {"cousins": "0.1.0"},
        "models": [{"name": m, "kind": "original" if m == ORIGINAL else COUSINS[m][0], "path": f"/models/{m}",
                    "fingerprint": "f" * 16, "dtype": "float32", "quantization": None, "text_only": False,
                    "reordered": m == "noise-floor"} for m in models],
        "corpus": {"path": "corpus.jsonl", "rows": prompts, "prompts": prompts, "error_rows": 0},
        "sampling": {"temperature": 0.0, "max_tokens": 16, "logprobs": 2}, "samples": samples, "seed": 0,
        "row_counts": {m: {"model": m, "rows": n_rows, "error_rows": 0, "prompts": prompts, "samples": samples,
                           "output_tokens": sum(g["output_tokens"] for g in gens[m]), "tokens_per_s": math.nan}
                       for m in models},
    }
    if drift:
        manifest["drift"] = {s["name"]: {"kind": s["kind"], "kld_mean": s["metrics"]["kld_mean"]["value"]}
                             for s in [*summary["cousins"], summary["noise_floor"]]}
    if manifest_status is not None:
        layout.manifest.write_text_atomic(json.dumps(manifest, indent=2))  # NaN as JSON allows it to be read
    return {"run_id": run_id, "prompts": prompts, "samples": samples, "drift_rows": drift_rows,
            "summary": summary, "gens": gens}


def write_runs(root: Location, *, prompts: int = 60, rows_per_file: int = 40) -> dict:
    """The fixture root: a committed drift run, a committed generation run, a run without a
    manifest and one whose manifest is not committed."""
    runs = {DRIFT_RUN: write_run(root, DRIFT_RUN, prompts=prompts, rows_per_file=rows_per_file)}
    runs[GEN_RUN] = write_run(root, GEN_RUN, prompts=12, samples=1, drift=False, seed=1)
    write_run(root, PENDING_RUN, prompts=6, manifest_status=None, seed=2)
    write_run(root, FAILED_RUN, prompts=6, manifest_status="failed", seed=3)
    return runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = resolve(str(tmp_path_factory.mktemp("query") / "out"))
    return root, write_runs(root)


# --- the library ----------------------------------------------------------------------------------


def test_only_committed_runs_are_listed(runs):
    root, _ = runs
    listed = {r["run_id"]: r for r in list_runs(root)}
    assert set(listed) == {DRIFT_RUN, GEN_RUN}
    d = listed[DRIFT_RUN]
    assert d["kind"] == "drift" and d["status"] == "committed" and d["created"] and d["committed"]
    assert [m["name"] for m in d["models"]] == [ORIGINAL, *COUSINS]
    assert d["rows"] == {m: 120 for m in [ORIGINAL, *COUSINS]}
    assert listed[GEN_RUN]["kind"] == "generate"
    for hidden in (PENDING_RUN, FAILED_RUN, "nope"):
        with pytest.raises(NotFound):
            get_run(root, hidden)
        with pytest.raises(NotFound):
            drift_page(root, hidden)


def test_manifest_config_and_json_safety(runs):
    root, _ = runs
    run = get_run(root, DRIFT_RUN)
    assert run["manifest"]["row_counts"][ORIGINAL]["tokens_per_s"] is None  # NaN in the file, null out
    json.dumps(run, allow_nan=False)
    cfg = get_config(root, DRIFT_RUN)
    assert cfg["run"]["run_id"] == DRIFT_RUN and cfg["storage"]["options"]["secret"] == "***"


@pytest.mark.parametrize("bad", ["..", "../x", "a/b", "/etc", ".hidden", "s3://bucket/x", "file:///etc",
                                 "a\\b", "", "x" * 201, "a b", "é"])
def test_names_that_could_be_paths_are_refused(runs, bad):
    root, _ = runs
    with pytest.raises(BadInput):
        get_run(root, bad)
    with pytest.raises(BadInput):
        drift_page(root, DRIFT_RUN, cousin=bad)
    with pytest.raises(BadInput):
        get_summary(root, DRIFT_RUN, bad)


def test_summary_per_cousin_with_the_noise_floor(runs):
    root, _ = runs
    full = get_summary(root, DRIFT_RUN)
    assert [c["name"] for c in full["cousins"]] == ["student", "q8"] and full["noise_floor"]["name"] == "noise-floor"
    one = get_summary(root, DRIFT_RUN, "q8")
    assert one["cousin"]["name"] == "q8" and one["noise_floor"]["metrics"]["kld_mean"]["value"] == 0
    assert len(one["cousin"]["metrics"]["kld_mean"]["ci"]) == 2
    assert one["plane"] == full["plane"]  # the frontier compares every model: the whole plane
    with pytest.raises(NotFound, match="no cousin"):
        get_summary(root, DRIFT_RUN, "q4")
    with pytest.raises(NotFound, match="not a drift run"):
        get_summary(root, GEN_RUN)


def _expected(runs, key=lambda r: True):
    rows = [r for c in runs[DRIFT_RUN]["drift_rows"].values() for r in c if key(r)]
    return sorted(rows, key=lambda r: (r["kld_mean"] is None, -(r["kld_mean"] or 0), r["cousin"],
                                       r["prompt_id"], r["sample_index"]))


def test_pages_follow_a_total_order_across_files(runs):
    root, made = runs
    expected = _expected(made)
    seen = []
    for offset in range(0, len(expected), 47):  # pages straddle the 40-row part files
        page = drift_page(root, DRIFT_RUN, limit=47, offset=offset)
        assert page["total"] == len(expected) == 360
        seen += [(r["cousin"], r["prompt_id"], r["sample_index"]) for r in page["rows"]]
    assert seen == [(r["cousin"], r["prompt_id"], r["sample_index"]) for r in expected]
    assert expected[-1]["error"] is not None  # the null-KLD error row sorts last
    assert drift_page(root, DRIFT_RUN, offset=1000)["rows"] == []


def test_filters_and_sorts(runs):
    root, made = runs
    page = drift_page(root, DRIFT_RUN, cousin="student", category="arithmetic", flips_only=True, limit=1000)
    want = _expected(made, lambda r: r["cousin"] == "student" and r["category"] == "arithmetic" and r["flip"])
    assert page["total"] == len(want) > 0 and [r["prompt_id"] for r in page["rows"]] == [r["prompt_id"] for r in want]
    top = drift_page(root, DRIFT_RUN, limit=5)["rows"]  # top-N by KLD is the default
    assert [r["cousin"] for r in top] == ["student"] * 5
    low = drift_page(root, DRIFT_RUN, metric="chrf", max_value=50, sort="chrf", descending=False, limit=1000)
    assert low["rows"] and all(r["chrf"] <= 50 for r in low["rows"])
    assert [r["chrf"] for r in low["rows"]] == sorted(r["chrf"] for r in low["rows"])
    assert drift_page(root, DRIFT_RUN, min_value=0.5)["total"] == len(
        _expected(made, lambda r: (r["kld_mean"] or 0) >= 0.5))
    errs = drift_page(root, DRIFT_RUN, errors=True)
    assert errs["total"] == 1 and errs["rows"][0]["error"]
    tokens = drift_page(root, DRIFT_RUN, cousin="q8", limit=2, fields=["kld_tokens"])["rows"]
    assert set(tokens[0]) == {"cousin", "prompt_id", "sample_index", "kld_tokens"}
    assert "kld_tokens" not in drift_page(root, DRIFT_RUN, limit=1)["rows"][0]  # lists are opt-in


@pytest.mark.parametrize("kwargs", [{"limit": 0}, {"limit": MAX_LIMIT + 1}, {"offset": -1},
                                    {"offset": MAX_OFFSET + 1}, {"sort": "kld_tokens"},
                                    {"sort": "__import__('os')"}, {"metric": "original_text", "min_value": 1},
                                    {"metric": "nope"}, {"metric": "chrf", "min_value": math.nan},
                                    {"fields": ["nope"]}, {"category": "x" * 501}])
def test_bad_page_parameters(runs, kwargs):
    root, _ = runs
    with pytest.raises(BadInput):
        drift_page(root, DRIFT_RUN, **kwargs)


def test_prompt_view_side_by_side(runs):
    root, made = runs
    view = prompt_view(root, DRIFT_RUN, ODD_ID)
    assert view["original"] == ORIGINAL and view["prompt"]["prompt_id"] == ODD_ID
    assert [s["sample_index"] for s in view["samples"]] == [0, 1]
    gens = view["samples"][0]["generations"]
    assert [g["model"] for g in gens] == [ORIGINAL, *COUSINS]
    assert gens[0]["vs_original"] is None
    for g in gens[1:]:
        row = next(r for r in made[DRIFT_RUN]["drift_rows"][g["model"]]
                   if r["prompt_id"] == ODD_ID and r["sample_index"] == 0)
        vs = g["vs_original"]
        assert vs["first_divergence"] == row["first_divergence"] and vs["exact_match"] == row["exact_match"]
        # the final answers the checker read, where the prompt is labelled
        assert (vs["checker"], vs["answer_original"], vs["answer_cousin"]) == (
            row["checker"], row["answer_original"], row["answer_cousin"])
        if row["first_divergence"] is not None:
            assert vs["cousin_span"] == [row["div_cousin_start"], row["div_cousin_end"]]
    assert len(prompt_view(root, DRIFT_RUN, ODD_ID, sample_index=1)["samples"]) == 1
    with pytest.raises(NotFound):
        prompt_view(root, DRIFT_RUN, "no-such-prompt")
    gen_only = prompt_view(root, GEN_RUN, ODD_ID)
    assert [g["model"] for g in gen_only["samples"][0]["generations"]] == [ORIGINAL]


def test_report(runs):
    root, _ = runs
    assert get_report(root, DRIFT_RUN).startswith(b"<!DOCTYPE html>")
    with pytest.raises(NotFound):
        get_report(root, GEN_RUN)


# --- the CLI --------------------------------------------------------------------------------------


def run_cli(capsys, *args) -> tuple[int, str, str]:
    rc = main(["query", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_tables_and_json(runs, capsys):
    root, _ = runs
    r = ["--root", root.url]
    rc, out, _ = run_cli(capsys, "runs", *r)
    assert rc == 0 and out.splitlines()[0].split()[:4] == ["run", "status", "created", "kind"]
    assert DRIFT_RUN in out and GEN_RUN in out and PENDING_RUN not in out and "2 committed run(s)" in out
    rc, out, _ = run_cli(capsys, "runs", "--json", *r)
    assert {x["run_id"] for x in json.loads(out)} == {DRIFT_RUN, GEN_RUN}

    rc, out, _ = run_cli(capsys, "show", DRIFT_RUN, *r)
    assert rc == 0 and "student" in out and "distilled" in out
    rc, out, _ = run_cli(capsys, "config", DRIFT_RUN, *r)
    assert f"run_id: {DRIFT_RUN}" in out
    rc, out, _ = run_cli(capsys, "summary", DRIFT_RUN, *r)
    assert rc == 0 and out.index("student") < out.index("q8") < out.index("noise-floor") and "[CI]" in out
    plane = out[out.index("capability against cost"):].splitlines()
    assert plane[1].split()[:4] == ["model", "kind", "correct/labelled", "accuracy"]
    rows = {line.split()[0]: line for line in plane[3:]}
    assert set(rows) == {ORIGINAL, "q8", "student", "noise-floor"}
    assert rows["q8"].startswith("q8") and "30/40" in rows["q8"] and "75.0% [" in rows["q8"]
    assert rows["q8"].endswith("yes") and rows["student"].endswith("yes") and rows["noise-floor"].endswith("reference")
    assert rows[ORIGINAL].endswith("no: q8 (within CI)")  # as accurate, dearer and wordier: within the CIs
    rc, out, _ = run_cli(capsys, "summary", DRIFT_RUN, "--cousin", "q8", *r)
    assert "noise floor [CI]" in out and "kld_mean" in out
    plane = out[out.index("capability against cost"):].splitlines()
    assert [line.split()[0] for line in plane[3:]] == [ORIGINAL, "q8"] and "EUR" in plane[0]
    rc, out, _ = run_cli(capsys, "drift", DRIFT_RUN, "--cousin", "q8", "--limit", "3", *r)
    lines = out.splitlines()
    assert rc == 0 and lines[0].startswith("cousin") and len(lines) == 6 and lines[-1].startswith("rows 1-3 of 120")
    rc, out, _ = run_cli(capsys, "drift", DRIFT_RUN, "--min-kld", "0.5", "--json", *r)
    assert json.loads(out)["rows"] and all(x["kld_mean"] >= 0.5 for x in json.loads(out)["rows"])
    rc, out, _ = run_cli(capsys, "drift", DRIFT_RUN, "--flips-only", "--json", "--fields", "flip,kld_mean", *r)
    page = json.loads(out)
    assert page["rows"] and all(x["flip"] for x in page["rows"])
    rc, out, _ = run_cli(capsys, "prompt", DRIFT_RUN, ODD_ID, *r)
    assert rc == 0 and "sample 1" in out and "(original)" in out
    rc, out, _ = run_cli(capsys, "prompt", DRIFT_RUN, ODD_ID, "--json", *r)
    assert json.loads(out)["prompt"]["prompt_id"] == ODD_ID
    rc, out, _ = run_cli(capsys, "report", DRIFT_RUN, *r)
    assert out.startswith("<!DOCTYPE html>")


def test_cli_errors(runs, capsys):
    root, _ = runs
    rc, _, err = run_cli(capsys, "show", PENDING_RUN, "--root", root.url)
    assert rc == 1 and "no committed run" in err
    rc, _, err = run_cli(capsys, "drift", DRIFT_RUN, "--cousin", "../../etc", "--root", root.url)
    assert rc == 2 and "invalid cousin" in err
    for what in ("drift", "summary"):  # a generation run is not an empty drift run
        rc, _, err = run_cli(capsys, what, GEN_RUN, "--root", root.url)
        assert rc == 1 and f"run '{GEN_RUN}'" in err and "not a drift run" in err, (what, err)
    for flag in ("--sort", "--metric"):  # refused by the parser, listing the choices
        with pytest.raises(SystemExit) as e:
            run_cli(capsys, "drift", DRIFT_RUN, flag, "nope", "--root", root.url)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "invalid choice: 'nope'" in err and "'kld_mean'" in err


def test_untrusted_text_reaches_a_terminal_as_visible_escapes():
    from cousins.query.render import json_safe, terminal_safe

    hostile = "id\x1b]0;owned\x07 \x1b[2J\x9b31m\r\x00 ok\ttab\nline"
    shown = terminal_safe(hostile)
    assert not any(ord(c) < 32 and c not in "\t\n" or 0x7f <= ord(c) <= 0x9f for c in shown)
    assert shown == "id\\x1b]0;owned\\x07 \\x1b[2J\\x9b31m\\x0d\\x00 ok\ttab\nline"
    dumped = json_safe(json.dumps({"prompt": hostile}, ensure_ascii=False))
    assert json.loads(dumped) == {"prompt": hostile} and "\x9b" not in dumped and "\x1b" not in dumped


def test_runs_in_progress_failed_and_damaged_are_listed_as_such(tmp_path, capsys):
    """--all (state=all) lists runs in progress and failed runs with what they published and when;
    a committed run whose manifest is damaged is listed as damaged and hides no other run; `show`
    on a run in progress says so."""
    root = resolve(str(tmp_path / "out"))
    write_run(root, "ok-1", prompts=6, drift=False, seed=4)
    write_run(root, PENDING_RUN, prompts=6, manifest_status=None, seed=2)
    write_run(root, FAILED_RUN, prompts=6, manifest_status="failed", seed=3)
    for bad, text in (("bad-shape", '{"status": "committed", "models": 7, "row_counts": []}'),
                      ("bad-json", '{"status": "committed", "mod')):
        write_run(root, bad, prompts=6, drift=False, seed=5)
        (tmp_path / "out" / "runs" / bad / "manifest.json").write_text(text)
    listed = {r["run_id"]: r for r in list_runs(root)}
    assert set(listed) == {"ok-1", "bad-shape", "bad-json"}
    assert listed["ok-1"]["status"] == "committed" and listed["bad-json"]["status"] == "damaged"
    assert listed["bad-shape"]["status"] == "damaged" and "manifest" in listed["bad-shape"]["detail"]
    every = {r["run_id"]: r for r in list_runs(root, "all")}
    assert every[PENDING_RUN]["status"] == "in progress" and every[FAILED_RUN]["status"] == "failed"
    assert "prompts" in every[PENDING_RUN]["stages_done"] and every[PENDING_RUN]["updated"]
    assert sum(every[PENDING_RUN]["parts"].values()) >= 1
    with pytest.raises(BadInput):
        list_runs(root, "sometimes")
    rc, out, _ = run_cli(capsys, "runs", "--all", "--root", root.url)
    assert rc == 0 and "in progress" in out and "failed" in out and "1 committed run(s), 4 other" in out
    rc, _, err = run_cli(capsys, "show", PENDING_RUN, "--root", root.url)
    assert rc == 1 and "it is in progress" in err and "stages published: " in err and "prompts" in err


def test_damaged_files_are_answered_as_damage_naming_the_run(tmp_path, capsys):
    """A truncated drift part, a corrupted prompts file and a truncated summary.json: each read that
    meets one answers Damaged (the service's 500 with this message), never a traceback."""
    root = resolve(str(tmp_path / "out"))
    write_run(root, "hurt", prompts=12, rows_per_file=6, seed=6)
    run_dir = tmp_path / "out" / "runs" / "hurt"
    part = sorted((run_dir / "drift").glob("cousin=*/part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(Damaged, match=r"run 'hurt' has damaged data: ArrowInvalid"):
        drift_page(root, "hurt")
    summary = run_dir / "summary.json"
    summary.write_text(summary.read_text()[:50])
    with pytest.raises(Damaged, match=r"run 'hurt' has damaged data: JSONDecodeError"):
        get_summary(root, "hurt")
    for p in (run_dir / "prompts").glob("part-*.parquet"):
        p.write_bytes(b"not parquet at all")
    with pytest.raises(Damaged):
        prompt_view(root, "hurt", "p0000")
    assert Damaged.status == 500
    rc, _, err = run_cli(capsys, "summary", "hurt", "--root", root.url)
    assert rc == 1 and err.startswith("error: run 'hurt' has damaged data") and "Traceback" not in err


def test_a_storage_root_that_is_gone_is_unavailable_not_an_empty_store(tmp_path, capsys):
    """A store with no run yet lists none; a root that no longer exists (an unmounted volume) is
    Unavailable (the service's 503) for the listing and for a run, not an empty list or 'no run'."""
    empty = resolve(str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    assert list_runs(empty) == []
    root = resolve(str(tmp_path / "out"))
    write_run(root, "kept", prompts=4, rows_per_file=4, seed=1)
    assert [r["run_id"] for r in list_runs(root)] == ["kept"]
    (tmp_path / "out").rename(tmp_path / "unmounted")
    with pytest.raises(Unavailable, match=r"the storage root .*/out does not exist"):
        list_runs(root)
    with pytest.raises(Unavailable):
        get_manifest(root, "kept")
    assert Unavailable.status == 503
    rc, _, err = run_cli(capsys, "runs", "--root", root.url)
    assert rc == 1 and err.startswith("error: the storage root ") and "Traceback" not in err
