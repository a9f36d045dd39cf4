"""The job as a user runs it: the `cousins generate` console script, its own local Ray, a summary table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from cousins.run.runtime import NATIVE_LOG_LINE

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_generate_job_end_to_end(tiny_teacher, tmp_path):
    cli = Path(sys.executable).parent / "cousins"
    proc = subprocess.run(
        [str(cli), "generate", f"model.path={tiny_teacher}", "corpus.limit=6", "run.samples=2",
         "run.sampling.max_tokens=8", "storage.root=out", "run.run_id=job-test", "ray.num_cpus=2",
         "ray.object_store_gib=0.5"],
        capture_output=True, text=True, timeout=540, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Ray's C++ log lines (the driver's core worker copies its errors to stderr) stay in its log files
    assert not [x for x in proc.stderr.splitlines() if NATIVE_LOG_LINE.match(x.encode())], proc.stderr
    assert "generate tiny-teacher · 100%" in proc.stderr  # the project's own progress still shows
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert lines[header].split()[:5] == ["model", "prompts", "samples", "rows", "error"]
    row = lines[header + 2].split()
    assert row[:5] == ["tiny-teacher", "6", "2", "12", "0"]
    run = tmp_path / "out" / "runs" / "job-test"
    assert f"committed at {run}" in proc.stdout  # relative storage.root resolved against the start dir
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "committed" and manifest["row_counts"]["tiny-teacher"]["rows"] == 12

    # The same run id with another config is refused, naming the keys that differ.
    again = subprocess.run([str(cli), "generate", f"model.path={tiny_teacher}", "corpus.limit=7",
                            "run.samples=3", "run.sampling.max_tokens=8", "storage.root=out",
                            "run.run_id=job-test", "ray.num_cpus=1"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert again.returncode != 0
    assert "differing keys: corpus.limit, run.samples" in again.stderr
    assert "Started a local Ray" not in again.stderr  # refused before any cluster work

    # The same config again (placement may differ) finds the committed run and reports it.
    same = subprocess.run([str(cli), "generate", f"model.path={tiny_teacher}", "corpus.limit=6",
                           "run.sampling.max_tokens=8", "storage.root=out", "run.run_id=job-test",
                           "engine.num_actors=2"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert same.returncode == 0, same.stderr[-2000:]
    assert "job-test was already committed" in same.stdout and "Started a local Ray" not in same.stderr


def test_cli_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "cousins.cli", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60).stdout
    for cmd in ("models", "generate", "corpus"):
        assert cmd in out
