"""Models named as users name them (cousins/engine/checkpoints.py): local directories, hub ids resolved
from a Hugging Face cache the test builds (never the network), stored checkpoints fetched once per
node from a real S3-speaking server; and the builds that must never replace a user's directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, compose
from cousins.engine import checkpoints
from cousins.contract.refs import kind
from cousins.engine.checkpoints import CheckpointError, local_copy
from cousins.contract.config import ConfigError, resolve_paths, to_config
from cousins.contract.validate import validate
from model_fixtures import hub_cache


def test_references_are_told_apart():
    assert kind("Qwen/Qwen2.5-7B-Instruct") == "hub"
    assert kind("hf://Qwen/Qwen2.5-7B-Instruct") == "hub"
    assert kind("s3://bucket/models/q4") == "url" and kind("gs://b/m") == "url"
    assert kind("/models/teacher") == "local" and kind("./models/x") == "local" and kind("~/m") == "local"
    # a relative directory the project builds is local even before it exists
    assert kind("models/tiny-teacher", build="tiny-teacher") == "local"
    assert kind("a/b/c") == "local"  # three parts: never a hub id


def test_resolve_paths_keeps_hub_ids_and_urls_and_anchors_local_paths(tiny_teacher, tmp_path):
    cfg = to_config(compose(f"model.path={tiny_teacher}", f"storage.root={tmp_path}", "cousins=none",
                            "+cousins.big={path: Qwen/Qwen2.5-7B-Instruct, revision: v1, kind: other}",
                            "+cousins.stored={path: 's3://bucket/models/q4', kind: quantized}",
                            "+cousins.local={path: rel/model, build: rtn-int8, kind: quantized}",
                            config_name="drift"))
    resolve_paths(cfg, base="/base")
    assert cfg.cousins["big"].path == "Qwen/Qwen2.5-7B-Instruct"
    assert cfg.cousins["stored"].path == "s3://bucket/models/q4"
    assert cfg.cousins["local"].path == "/base/rel/model"


@pytest.fixture
def hub(tiny_teacher, tmp_path, monkeypatch):
    home = tmp_path / "hf"
    commit = hub_cache(home, "acme/tiny-teacher", tiny_teacher, tag="v1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoints.metadata_dir.cache_clear()
    yield home, commit
    checkpoints.metadata_dir.cache_clear()


def test_a_hub_id_resolves_from_the_cache_at_a_branch_a_tag_or_a_commit(hub):
    home, commit = hub
    for revision in (None, "main", "v1", commit):
        path = Path(local_copy("acme/tiny-teacher", revision=revision))
        assert path.name == commit and (path / "config.json").exists() and (path / "model.safetensors").exists()
    meta = checkpoints.metadata_dir("hf://acme/tiny-teacher")
    assert (Path(meta) / "tokenizer.json").exists()
    assert checkpoints.context_length(checkpoints.model_config("acme/tiny-teacher")) == 1024


def test_a_hub_id_that_cannot_be_had_says_what_to_do(hub):
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set and the cache"):
        local_copy("acme/not-there")
    with pytest.raises(CheckpointError, match="revision"):
        local_copy("acme/tiny-teacher", revision="no-such-branch")


def test_validation_sends_a_hub_id_to_the_hub_not_to_a_local_directory(hub, tiny_teacher, tmp_path):
    cfg = resolve_paths(to_config(compose("model.path=acme/tiny-teacher", "model.build=null",
                                          f"storage.root={tmp_path}", config_name="generate")))
    assert cfg.model.path == "acme/tiny-teacher"
    validate(cfg)  # no "model directory not found"
    from cousins.family.prepare import check_models

    check_models(cfg)  # its config and tokenizer come from the cache
    from cousins.orchestrate.manifest import model_fingerprint

    assert model_fingerprint("acme/tiny-teacher") is not None


def _upload(fs, src: str, url: str) -> None:
    for f in Path(src).iterdir():
        if f.is_file():
            fs.put_file(str(f), f"{url}/{f.name}")


@pytest.fixture
def stored(s3_server, tiny_teacher, tmp_path, monkeypatch):
    import s3fs

    fs = s3fs.S3FileSystem()
    bucket = f"models-{os.getpid()}-{tmp_path.name[-6:].lower().replace('_', '-')}"
    fs.mkdir(bucket)
    url = f"s3://{bucket}/tiny"
    _upload(fs, tiny_teacher, url)
    monkeypatch.setenv("COUSINS_MODEL_CACHE", str(tmp_path / "cache"))
    return fs, url


def test_a_stored_checkpoint_is_fetched_once_and_again_when_it_changed(stored):
    fs, url = stored
    first = Path(local_copy(url))
    assert (first / "model.safetensors").exists() and (first / checkpoints.FETCHED).exists()
    stamp = (first / checkpoints.FETCHED).stat().st_mtime_ns
    assert Path(local_copy(url)) == first and (first / checkpoints.FETCHED).stat().st_mtime_ns == stamp
    meta = Path(local_copy(url, meta=True))
    assert (meta / "config.json").exists() and not (meta / "model.safetensors").exists()
    # a new upload at the same URL (another size) is fetched again
    fs.pipe_file(f"{url}/generation_config.json", b'{"bos_token_id": 1, "eos_token_id": 2, "note": "new"}')
    again = Path(local_copy(url))
    assert json.loads((again / "generation_config.json").read_text())["note"] == "new"


def test_engine_actors_of_one_node_fetch_a_stored_checkpoint_once(stored, tmp_path):
    """Four processes at once (an engine actor each): one downloads, the others wait on the lock
    and find the copy whole."""
    _, url = stored
    code = ("import sys, time; from cousins.engine.checkpoints import local_copy; "
            "print(local_copy(sys.argv[1]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(4)]
    outs = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert len(outs) == 1 and all(p.returncode == 0 for p in procs)
    cache = Path(os.environ["COUSINS_MODEL_CACHE"])
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_a_storage_url_with_nothing_there_is_a_clear_error(stored):
    _, url = stored
    with pytest.raises(CheckpointError, match="nothing there"):
        local_copy(url + "-absent")


# --- builds never replace a directory the project did not make ----------------------------------

def _users_model(tmp_path, tiny_teacher) -> Path:
    mine = tmp_path / "my-7b"
    shutil.copytree(tiny_teacher, mine)
    (mine / "cousins_recipe.json").unlink()
    return mine


def test_a_build_refuses_a_users_model_directory_and_leaves_it_whole(tiny_teacher, tmp_path):
    from cousins.family.builds import ensure_model
    from cousins.run.removal import NotOurs
    from cousins.family.quantize import build_quantized

    mine = _users_model(tmp_path, tiny_teacher)
    before = sorted((p.name, p.stat().st_size) for p in mine.iterdir())
    with pytest.raises(NotOurs, match="model.path.*never deletes or overwrites"):
        ensure_model(str(mine), "tiny-teacher", 0)
    with pytest.raises(NotOurs, match="cousins.q.path"):
        build_quantized(tiny_teacher, mine, "rtn-int8", setting="cousins.q.path")
    assert sorted((p.name, p.stat().st_size) for p in mine.iterdir()) == before


def test_every_build_target_that_is_not_ours_is_named_before_anything_is_built(tiny_teacher, tmp_path):
    from cousins.family.prepare import check_build_targets

    mine = _users_model(tmp_path, tiny_teacher)
    other = _users_model(tmp_path / "b", tiny_teacher) if (tmp_path / "b").mkdir() is None else None
    cfg = resolve_paths(to_config(compose(f"model.path={mine}", f"storage.root={tmp_path}", "cousins=none",
                                          f"+cousins.q={{path: '{other}', build: rtn-int8, kind: quantized}}",
                                          config_name="drift")))
    with pytest.raises(ConfigError) as e:
        check_build_targets(cfg)
    assert len(e.value.problems) == 2
    assert "model.path" in e.value.problems[0] and "cousins.q.path" in e.value.problems[1]


def test_cli_force_rebuilds_only_the_projects_own_build(tiny_teacher, tmp_path):
    mine = _users_model(tmp_path, tiny_teacher)
    out = subprocess.run([sys.executable, "-m", "cousins.cli", "models", "build", "--force", "--out", str(mine)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "did not write" in out.stderr
    assert (mine / "model.safetensors").exists()


def test_a_merged_adapter_has_the_weights_of_w_plus_scaled_b_a(tiny_teacher, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from model_fixtures import make_lora

    monkeypatch.setenv("COUSINS_MODEL_CACHE", str(tmp_path / "cache"))
    make_lora(tiny_teacher, tmp_path / "adapter", merged=tmp_path / "reference", scale=0.2)
    merged = Path(checkpoints.merged_lora(tiny_teacher, str(tmp_path / "adapter")))
    assert checkpoints.merged_lora(tiny_teacher, str(tmp_path / "adapter")) == str(merged)  # made once
    ours, ref = load_file(str(merged / "model.safetensors")), load_file(str(tmp_path / "reference" / "model.safetensors"))
    base = load_file(f"{tiny_teacher}/model.safetensors")
    assert ours.keys() == ref.keys()
    changed = [k for k in ours if not (ours[k] == base[k]).all()]
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")) for k in changed)
    assert max(float((ours[k] - ref[k]).abs().max()) for k in ours) < 1e-6
    assert (merged / "tokenizer.json").exists() and (merged / "config.json").exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8, "lora_alpha": 8}')
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        checkpoints.merged_lora(tiny_teacher, str(tmp_path / "bad"))
