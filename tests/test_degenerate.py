"""Degenerate inputs end in a clear outcome (docs/degenerate-inputs.md): a corpus with no usable
prompt, one prompt, every prompt over the context length, corpus.limit=0, a cousin identical to
the original, no labelled prompt, an export whose filters drop every row, a resumed run whose
corpus changed. No traceback reaches the user, and no "rerun to resume" advice for a failure a
rerun cannot fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, compose
from cousins.contract.config import ConfigError, resolve_paths, to_config
from cousins.contract.validate import validate
from cousins.drift.table import drift_table
from cousins.engine.plan import same_as_original
from cousins.export.card import filter_table
from cousins.export.config import ExportConfig, ExportError
from cousins.export.write import export
from cousins.orchestrate.accounting import summary_table
from cousins.orchestrate.pipeline import open_run, run_drift, run_generate
from cousins.orchestrate.stages import stage_prompts
from cousins.run.corpus import NoUsablePrompt
from cousins.run.lifecycle import RunState
from cousins.run.storage import mark_done, resolve
from fake_engine import FakeBackend

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _corpus(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _cfg(tmp: Path, run_id: str, corpus: Path, *overrides: str, config_name: str = "drift"):
    cousins = ["cousins=none", f"+cousins.q={{kind:quantized,path:'{tmp / 'q'}'}}"] if config_name == "drift" else []
    return resolve_paths(to_config(compose(
        f"model.path={tmp / 'teacher'}", f"storage.root={tmp / 'out'}", f"corpus.path={corpus}", "run=greedy",
        "run.sampling.max_tokens=12", "engine.batch_size=8", f"run.run_id={run_id}", "drift.bootstrap=50",
        *cousins, *overrides, config_name=config_name)))


BAD = ["{not json", '{"x": 1}', "[1, 2]"]


def test_a_corpus_with_no_usable_prompt_is_refused_by_generate_and_drift_and_a_fixed_one_then_runs(ray_local, tmp_path):
    corpus = _corpus(tmp_path / "c.jsonl", BAD)
    for run_id, job, name in (("g", run_generate, "generate"), ("d", run_drift, "drift")):
        cfg = _cfg(tmp_path, run_id, corpus, config_name=name)
        with pytest.raises(NoUsablePrompt) as e:
            job(cfg, backend=FakeBackend())
        msg = str(e.value)
        assert "\n" not in msg and "has no usable prompt: all 3 of its rows are error rows" in msg
        assert "c.jsonl row 0: malformed JSON" in msg and "no 'prompt' field" in msg and "fix the corpus" in msg
        run = tmp_path / "out" / "runs" / run_id
        assert not (run / "manifest.json").exists() and not (run / "prompts" / "_SUCCESS").exists()
        assert not (run / "generations").exists()  # no engine stage began
    _corpus(corpus, [{"prompt": "what is 2+3?", "reference": "5"}, *BAD])  # fixed: the same run id reads it again
    result = run_generate(_cfg(tmp_path, "g", corpus, config_name="generate"), backend=FakeBackend())
    assert (result.prompts, result.corpus_errors, result.state) == (1, 3, RunState.RESUME)


def test_the_job_says_it_in_one_line_without_a_traceback_or_resume_advice(tiny_teacher, tmp_path):
    corpus = _corpus(tmp_path / "c.jsonl", BAD)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "generate.py"), f"model.path={tiny_teacher}", f"corpus.path={corpus}",
         f"storage.root={tmp_path / 'out'}", "run.run_id=bad", "ray.num_cpus=2", "ray.object_store_gib=0.5"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: corpus ") and "has no usable prompt" in last
    assert "Traceback" not in proc.stderr and "to resume" not in proc.stderr


def test_one_unlabelled_prompt_and_a_cousin_identical_to_the_original(ray_local, tmp_path):
    corpus = _corpus(tmp_path / "one.jsonl", [{"prompt": "tell me about rivers"}])
    cfg = _cfg(tmp_path, "one", corpus, f"+cousins.same={{kind:quantized,path:'{tmp_path / 'teacher'}'}}")
    assert same_as_original(cfg) == ["same"]
    result, summary = run_drift(cfg, backend=FakeBackend())
    assert summary["prompts"] == 1 and result.prompts == 1
    same = next(c["metrics"] for c in summary["cousins"] if c["name"] == "same")
    assert same["kld_mean"]["value"] == 0 and same["exact_match"]["value"] == 1
    assert same["flip_rate"]["value"] is None and same["accuracy_delta"]["value"] is None  # not measured, not zero
    table = drift_table(summary)
    assert "1 prompt(s): a bootstrap over fewer than two prompts has no spread" in table
    assert "flips and acc delta are '-': no compared prompt has a reference answer" in table


def test_every_prompt_over_the_context_commits_error_rows_and_says_so_and_their_export_is_empty(ray_local, tmp_path):
    corpus = _corpus(tmp_path / "long.jsonl", [{"prompt": f"a long question number {i}", "reference": "5"}
                                               for i in range(3)])
    result, summary = run_drift(_cfg(tmp_path, "long", corpus, "engine.max_model_len=8"), backend=FakeBackend())
    assert all(m.rows == m.error_rows == 3 for m in result.models)
    text = summary_table(result)
    assert "warning: every row of tiny-teacher is an error row (first: ValueError: prompt has" in text
    assert "engine.max_model_len is 8" in text
    assert "no token was compared" in drift_table(summary)
    cfg = ExportConfig(run_id="long", out=str(tmp_path / "sft"))
    cfg.storage.root = str(tmp_path / "out")
    exported = export(cfg)
    assert (exported.rows_in, exported.rows_out) == (3, 0) and len(exported.files) == 1
    assert "the filters dropped every row" in filter_table(exported)
    assert (tmp_path / "sft" / "part-00000.parquet").exists() and (tmp_path / "sft" / "README.md").exists()


def test_an_export_of_a_run_with_no_generations_is_refused_and_writes_nothing(tmp_path):
    run = tmp_path / "out" / "runs" / "empty"
    for stage in ("prompts", "errors", "generations/model=t"):
        (run / stage).mkdir(parents=True)
        mark_done(resolve(str(run / stage)), {"rows": 0})
    (run / "manifest.json").write_text(json.dumps({
        "run_id": "empty", "status": "committed", "models": [{"name": "t"}], "sampling": {"logprobs": 0}}))
    cfg = ExportConfig(run_id="empty", out=str(tmp_path / "sft"))
    cfg.storage.root = str(tmp_path / "out")
    with pytest.raises(ExportError, match="holds no generations of 't'.*nothing to export, and nothing was written"):
        export(cfg)
    assert not (tmp_path / "sft").exists()


def test_corpus_limit_zero_is_a_config_error(tmp_path):
    cfg = _cfg(tmp_path, "z", tmp_path / "c.jsonl", "corpus.limit=0", config_name="generate")
    with pytest.raises(ConfigError, match="corpus.limit must be >= 1 or null, got 0"):
        validate(cfg)


def test_a_resumed_run_keeps_its_prompts_and_says_when_the_corpus_changed(ray_local, tmp_path, capsys):
    corpus = _corpus(tmp_path / "c.jsonl", [{"prompt": f"q{i}"} for i in range(3)])
    cfg = _cfg(tmp_path, "r", corpus, config_name="generate")
    c = cfg.corpus

    def prompts(run):
        return stage_prompts(run, corpus_at=resolve(str(corpus)), fmt=c.format, fields=c.fields, limit=c.limit,
                             max_chars=c.max_chars)[1]

    assert prompts(open_run(cfg)) == 3
    assert prompts(open_run(cfg)) == 3 and "changed" not in capsys.readouterr().out
    _corpus(corpus, [{"prompt": f"q{i}"} for i in range(5)])
    assert prompts(open_run(cfg)) == 3  # the run's prompts are fixed once read
    out = capsys.readouterr().out
    assert "the corpus at" in out and "changed since this run read it (1 files" in out and "another run.run_id" in out


def test_a_reference_the_checker_cannot_read_is_an_error_row_naming_the_row_and_the_checker(ray_local, tmp_path):
    import pyarrow.parquet as pq

    from cousins.drift.answers import Rule

    corpus = _corpus(tmp_path / "c.jsonl", [{"prompt": "2+2?", "reference": "4"}, {"prompt": "3+3?", "reference": "six"},
                                            {"prompt": "hello"}])
    cfg = _cfg(tmp_path, "refs", corpus, "drift.answer_match=last_number", config_name="generate")
    c = cfg.corpus
    run = open_run(cfg)
    _, n_prompts, n_errors = stage_prompts(run, corpus_at=resolve(str(corpus)), fmt=c.format, fields=c.fields,
                                           limit=None, max_chars=c.max_chars, rule=Rule.of_config(cfg),
                                           answer=c.answer)
    assert (n_prompts, n_errors) == (2, 1)  # the unlabelled prompt stays; the unreadable reference does not
    errors = pq.read_table(str(tmp_path / "out" / "runs" / "refs" / "errors")).to_pylist()
    assert errors[0]["source_row"] == 1 and errors[0]["raw"] == "six"
    assert errors[0]["reason"] == "answer checker 'last_number' cannot read the reference: reference 'six' holds no number"
