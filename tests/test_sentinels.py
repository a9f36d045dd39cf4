"""Nothing a user owns is ever destroyed. A sentinel file is planted in every location a user can
name (storage.root, an export's out, a run id that already exists, model.path and a cousin's path
with a build, COUSINS_MODEL_CACHE, HF_HOME, the scale benchmark's copy id); the jobs, the library
calls behind them and the CLI commands are run against them; every sentinel survives, and each
refusal is one clear line naming the location and the setting to change."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, compose
from cousins.contract.config import resolve_paths, to_config
from cousins.export.config import ExportConfig, ExportError, FiltersConfig
from cousins.export.write import export
from cousins.orchestrate.pipeline import open_run, run_drift
from cousins.run.lifecycle import RunConflict
from cousins.run.removal import NotOurs
from cousins.run.storage import resolve
from fake_engine import FakeBackend

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SENTINEL = "users-own-file.txt"


class Sentinels:
    """Planted files, each with its own content; `intact()` lists those missing or changed."""

    def __init__(self):
        self.files: dict[Path, str] = {}

    def plant(self, where: Path, name: str = SENTINEL) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        f = where / name
        f.write_text(f"{where} belongs to the user")
        self.files[f] = f.read_text()
        return where

    def broken(self) -> list[str]:
        return [str(f) for f, text in self.files.items() if not f.is_file() or f.read_text() != text]


@pytest.fixture(scope="module")
def user(ray_local, tmp_path_factory):
    """A user's machine: their data, models, caches; a drift run committed under their storage.root."""
    home = tmp_path_factory.mktemp("user")
    s = Sentinels()
    places = {"root": s.plant(home / "data"), "runs": s.plant(home / "data" / "runs"),
              "taken": s.plant(home / "data" / "runs" / "taken"), "out": s.plant(home / "exports"),
              "model": s.plant(home / "my-7b"), "cousin": s.plant(home / "my-7b-int8"),
              "cache": s.plant(home / "cache"), "hf": s.plant(home / "hf")}
    (places["model"] / "config.json").write_text("{}")
    old = {k: os.environ.get(k) for k in ("COUSINS_MODEL_CACHE", "HF_HOME")}
    os.environ.update(COUSINS_MODEL_CACHE=str(places["cache"]), HF_HOME=str(places["hf"]))
    cfg = resolve_paths(to_config(compose(
        f"model.path={home / 'teacher'}", f"storage.root={places['root']}", "corpus.limit=8", "run=greedy",
        "run.sampling.max_tokens=8", "engine.batch_size=8", "run.run_id=theirs", "drift.bootstrap=20",
        "cousins=none", f"+cousins.q={{kind:quantized,path:'{home / 'q'}'}}", config_name="drift")))
    run_drift(cfg, backend=FakeBackend())
    yield s, places, cfg
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert not s.broken(), f"sentinels lost: {s.broken()}"


def _one_line(e: BaseException, *needles: str) -> None:
    msg = str(e)
    assert "\n" not in msg.strip(), msg
    for n in needles:
        assert n in msg, (n, msg)


def test_a_run_under_a_users_storage_root_writes_beside_their_files(user):
    s, places, _ = user
    assert (places["root"] / "runs" / "theirs" / "manifest.json").exists()
    assert not s.broken()


def test_a_run_id_whose_directory_holds_foreign_files_is_refused_before_any_write(user):
    s, places, cfg = user
    cfg.run.run_id = "taken"
    with pytest.raises(RunConflict) as e:
        open_run(cfg)
    _one_line(e.value, str(places["taken"]), "run.run_id", "did not write")
    assert sorted(p.name for p in places["taken"].iterdir()) == [SENTINEL]


def test_the_export_refuses_a_users_out_and_replaces_only_its_own_previous_export(user):
    s, places, _ = user
    cfg = ExportConfig(run_id="theirs", out=str(places["out"]), filters=FiltersConfig(drop_truncated=False))
    cfg.storage.root = str(places["root"])
    with pytest.raises(ExportError) as e:
        export(cfg)
    _one_line(e.value, f"out: '{places['out']}'", "never deletes or overwrites", "Point out at a new")
    assert sorted(p.name for p in places["out"].iterdir()) == [SENTINEL]
    cfg.out = str(places["out"] / "sft")  # a new location inside theirs: written, and theirs kept
    first = export(cfg)
    again = export(cfg)  # a previous export of the project's: replaced whole
    assert first.rows_out == again.rows_out > 0
    assert sorted(p.name for p in places["out"].iterdir()) == ["sft", SENTINEL]
    assert not [p for p in places["out"].iterdir() if "cousins-tmp" in p.name]
    assert not s.broken()


def test_the_scale_benchmark_never_replaces_a_real_run(user):
    from cousins.bench.scale import synthesize

    s, places, _ = user
    root = resolve(str(places["root"]))
    manifest = (places["root"] / "runs" / "theirs" / "manifest.json").read_bytes()
    for taken in ("theirs", "taken"):
        with pytest.raises(NotOurs) as e:
            synthesize(root, "theirs", 2, out_id=taken)
        _one_line(e.value, "copy id", "Name another id")
    assert (places["root"] / "runs" / "theirs" / "manifest.json").read_bytes() == manifest
    assert synthesize(root, "theirs", 2, out_id="theirs-x2") == synthesize(root, "theirs", 3, out_id="theirs-x2")
    assert json.loads((places["root"] / "runs" / "theirs-x2" / "_SYNTHETIC.json").read_text())["factor"] == 3
    assert not s.broken()


def test_builds_never_replace_a_users_model_or_cousin_directory(user):
    from cousins.family.builds import ensure_model
    from cousins.family.quantize import build_quantized

    s, places, _ = user
    with pytest.raises(NotOurs) as e:
        ensure_model(str(places["model"]), "tiny-teacher", 0)
    _one_line(e.value, "model.path", str(places["model"]), "set its build to null")
    with pytest.raises(NotOurs) as e:
        build_quantized(places["model"], places["cousin"], "rtn-int8", setting="cousins.q.path")
    _one_line(e.value, "cousins.q.path", str(places["cousin"]))
    assert not s.broken()


def test_the_model_cache_replaces_only_its_own_copies(user, s3_server):
    import s3fs

    from cousins.engine.checkpoints import local_copy

    s, places, _ = user
    fs = s3fs.S3FileSystem()
    bucket = f"sentinel-models-{os.getpid()}"
    fs.mkdir(bucket)
    url = f"s3://{bucket}/tiny"
    fs.pipe_file(f"{url}/config.json", b"{}")
    # the user's own directory at the very name the cache would use for this model
    key = hashlib.sha256(f"{url}|all".encode()).hexdigest()[:20]
    s.plant(places["cache"] / key)
    with pytest.raises(NotOurs) as e:
        local_copy(url)
    _one_line(e.value, "COUSINS_MODEL_CACHE", str(places["cache"] / key))
    meta = local_copy(url, meta=True)  # another entry: fetched beside the user's files, then refetched
    fs.pipe_file(f"{url}/tokenizer_config.json", b"{}")
    assert local_copy(url, meta=True) == meta and (Path(meta) / "tokenizer_config.json").exists()
    assert not [p for p in places["cache"].iterdir() if "cousins-tmp" in p.name]
    assert not s.broken()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=240)


def _refused(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert any(line.startswith("error: ") for line in proc.stderr.splitlines()), proc.stderr[-2000:]
    for n in needles:
        assert n in proc.stderr, (n, proc.stderr[-2000:])
    assert "Started a local Ray" not in proc.stderr  # refused before any cluster work


def test_every_cli_command_refuses_a_users_location_in_one_line(user, tiny_teacher):
    s, places, _ = user
    home = places["root"].parent
    cli = ["-m", "cousins.cli"]
    _refused(_cli(*cli, "models", "build", "--force", "--out", str(places["model"]), cwd=home),
             "--out", str(places["model"]))
    _refused(_cli(*cli, "corpus", "demo", "--out", str(places["out"] / SENTINEL), cwd=home),
             "--out", "not this corpus")
    _refused(_cli(str(ROOT / "jobs" / "export.py"), "run_id=theirs", f"storage.root={places['root']}",
                  f"out={places['out']}", cwd=home), "out: ", str(places["out"]))
    _refused(_cli(str(ROOT / "jobs" / "generate.py"), f"model.path={tiny_teacher}", f"storage.root={places['root']}",
                  "run.run_id=taken", cwd=home), "run.run_id", str(places["taken"]))
    _refused(_cli(str(ROOT / "jobs" / "drift.py"), f"model.path={places['model']}", "model.build=tiny-teacher",
                  f"storage.root={places['root']}", "cousins=none",
                  f"+cousins.q={{path: '{places['cousin']}', build: rtn-int8, kind: quantized}}", cwd=home),
             "model.path", "cousins.q.path")
    assert not s.broken()
