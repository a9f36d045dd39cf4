"""Runs that survive: a killed driver, a killed engine actor, an object store that goes away.

Each fault runs the job as a user would (a subprocess with its own local Ray, or the pipeline on
this module's Ray), then checks the committed rows: exactly prompts x samples, zero duplicates.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from conftest import ROOT, compose
from cousins.contract.config import resolve_paths, to_config
from cousins.contract.validate import validate
from cousins.orchestrate.pipeline import run_generate
from cousins.run.layout import RunLayout, part_files
from cousins.run.storage import resolve

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

JOB = [sys.executable, str(ROOT / "jobs" / "generate.py")]


def committed_keys(root: str, run_id: str, model: str = "tiny-teacher") -> list[tuple]:
    out = RunLayout(resolve(root), run_id).generations(model)
    t = pads.dataset(part_files(out), filesystem=out.arrow_fs(), format="parquet").to_table(
        columns=["prompt_id", "sample_index", "model"])
    return list(zip(*(t.column(c).to_pylist() for c in t.column_names)))


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended (rc={proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def kill_group(proc: subprocess.Popen) -> None:
    """Stop what the job started: its process group (it was started in a session of its own)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def test_driver_killed_mid_generation_then_rerun_completes(tiny_teacher, tmp_path):
    args = [*JOB, f"model.path={tiny_teacher}", "corpus.limit=48", "run.samples=4", "run.sampling.max_tokens=48",
            "engine.batch_size=16", "storage.rows_per_file=16", "storage.root=out", "run.run_id=killed",
            "ray.num_cpus=2", "ray.object_store_gib=0.5"]
    gens = tmp_path / "out" / "runs" / "killed" / "generations" / "model=tiny-teacher"
    t0 = time.monotonic()
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: len(list(gens.glob("part-*.parquet"))) >= 2, 300, "two published parts", proc)
        proc.send_signal(signal.SIGKILL)  # the driver only; its Ray goes with its process group below
        proc.wait(timeout=30)
    finally:
        kill_group(proc)
    parts_before = len(list(gens.glob("part-*.parquet")))
    assert not (tmp_path / "out" / "runs" / "killed" / "manifest.json").exists()
    assert not (gens / "_SUCCESS").exists()

    rerun = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout and "rows from an earlier attempt" in rerun.stdout
    keys = committed_keys(str(tmp_path / "out"), "killed")
    assert len(keys) == 48 * 4 and len(set(keys)) == len(keys)
    manifest = json.loads((gens.parent.parent / "manifest.json").read_text())
    stats = manifest["row_counts"]["tiny-teacher"]
    assert manifest["resumed"] and stats["rows"] == 192 and 0 < stats["new_rows"] < 192
    print(f"\n[driver kill] parts before kill: {parts_before}; rows expected 192, found {len(keys)}, "
          f"duplicates {len(keys) - len(set(keys))}, regenerated {stats['new_rows']}; "
          f"{time.monotonic() - t0:.0f}s")


def _descendant_pids(root: int) -> dict[int, str]:
    """Processes below `root` (our own Ray's), with their command lines."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            names[int(p.name)] = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(p.name))
    out, todo = {}, [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out[c] = names.get(c, "")
            todo.append(c)
    return out


def test_engine_actor_killed_mid_run_is_restarted_and_every_row_lands(ray_local, tiny_teacher, tmp_path):
    cfg = resolve_paths(to_config(compose(
        f"model.path={tiny_teacher}", f"storage.root={tmp_path}", "corpus.limit=40", "run.samples=4",
        "run.sampling.max_tokens=48", "engine.batch_size=16", "storage.rows_per_file=16", "run.run_id=actor-kill")))
    validate(cfg)
    gens = tmp_path / "runs" / "actor-kill" / "generations" / "model=tiny-teacher"
    killed: list[int] = []

    def killer():
        def engine_pid():
            # the process holding the engine: its host (engine.keep_processes), else the pool's actor
            found = [pid for pid, cmd in _descendant_pids(os.getpid()).items()
                     if "EngineHost" in cmd or "EngineActor" in cmd]
            return found[0] if found else None

        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (engine_pid() and list(gens.glob("part-*.parquet"))):
            time.sleep(0.2)
        pid = engine_pid()
        if pid:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    t0 = time.monotonic()
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = run_generate(cfg)
    thread.join(timeout=5)
    assert killed, "the engine actor was never seen"
    keys = committed_keys(str(tmp_path), "actor-kill")
    assert len(keys) == 160 and len(set(keys)) == 160
    retries = result.models[0].retries
    assert retries["engine_starts"] >= 2, retries  # the killed engine was replaced
    print(f"\n[actor kill] rows expected 160, found {len(keys)}, duplicates 0; retries {retries}; "
          f"{time.monotonic() - t0:.0f}s")


def test_object_store_going_away_fails_clearly_and_the_rerun_completes(s3_server, tiny_teacher, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("outage")
    args = [*JOB, f"model.path={tiny_teacher}", "corpus.limit=48", "run.samples=4", "run.sampling.max_tokens=48",
            "engine.batch_size=16", "storage.rows_per_file=16", "storage.root=s3://outage/cousins",
            "run.run_id=outage", "ray.num_cpus=2", "ray.object_store_gib=0.5"]
    prefix = "outage/cousins/runs/outage"
    parts = lambda: [p for p in fs.ls(f"{prefix}/generations/model=tiny-teacher", refresh=True)  # noqa: E731
                     if p.endswith(".parquet")] if fs.exists(f"{prefix}/generations/model=tiny-teacher") else []
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: len(parts()) >= 1, 300, "a part on S3", proc)
        s3_server.stop()
        t_down = time.monotonic()
        proc.wait(timeout=240)
        failed_after = time.monotonic() - t_down
        stderr = proc.stderr.read()
    finally:
        kill_group(proc)
        s3_server.start()  # back on the same port, with the same data
    assert proc.returncode != 0
    assert "run outage failed" in stderr and "rerun with the same run.run_id" in stderr, stderr[-2000:]
    last = stderr.strip().splitlines()[-2]  # the job's own verdict names the storage and its endpoint
    assert "the storage is unreachable: s3://outage/cousins (endpoint http://127.0.0.1:" in last, last
    assert not fs.exists(f"{prefix}/manifest.json")
    assert not fs.exists(f"{prefix}/generations/model=tiny-teacher/_SUCCESS")

    rerun = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    keys = committed_keys("s3://outage/cousins", "outage")
    assert len(keys) == 192 and len(set(keys)) == 192
    print(f"\n[s3 outage] job failed {failed_after:.1f}s after the server went away; rerun: rows expected 192, "
          f"found {len(keys)}, duplicates 0")
