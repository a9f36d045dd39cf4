"""Integration: a drift run on real vLLM whose models are named as users name theirs
(cousins/engine/checkpoints.py). Named to sort after test_cluster.py: after an in-process drift run,
that module's autoscaler test hung in Ray Data's first read in the same pytest process, as it did
after test_benchmark's in-process ray.data.llm run (commit a851e80).

- the original is a hub id (`acme/tiny-teacher` at tag v1) resolved offline from a Hugging Face
  cache the test builds, in the engine actors' processes too;
- `stored` is a checkpoint on a real S3-speaking server (moto), fetched once into the node's cache;
- `lora` is a LoRA adapter (PEFT layout) on the original, merged into its weights on the node
  (token-level: scored and diffed like any cousin);
- `served` is the same adapter served by vLLM (enable_lora; text only: vLLM's prompt logprobs
  under an adapter are wrong or fail): its greedy answers must equal the merged ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from conftest import ROOT, compose
from cousins.engine import checkpoints
from cousins.contract.config import resolve_paths, to_config
from cousins.contract.validate import validate
from cousins.family.prepare import prepare_before_ray
from cousins.orchestrate.pipeline import run_drift
from cousins.family.quantize import build_quantized
from cousins.run.layout import RunLayout, part_files
from cousins.run.storage import resolve
from model_fixtures import hub_cache, make_lora

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def _rows(loc):
    t = pads.dataset(part_files(loc), filesystem=loc.arrow_fs(), format="parquet").to_table()
    return {(r["prompt_id"], r["sample_index"]): r for r in t.to_pylist()}


@pytest.fixture(scope="module")
def run(own_ray, s3_server, tiny_teacher, tmp_path_factory):
    import ray
    import s3fs

    base = tmp_path_factory.mktemp("named")
    saved = {k: os.environ.get(k) for k in ("HF_HOME", "HF_HUB_OFFLINE", "COUSINS_MODEL_CACHE")}
    os.environ.update(HF_HOME=str(base / "hf"), HF_HUB_OFFLINE="1", COUSINS_MODEL_CACHE=str(base / "cache"))
    hub_cache(base / "hf", "acme/tiny-teacher", tiny_teacher, tag="v1")
    checkpoints.metadata_dir.cache_clear()
    int8 = build_quantized(tiny_teacher, base / "int8", "rtn-int8")
    fs = s3fs.S3FileSystem()
    fs.mkdir("named-models")
    for f in Path(int8).iterdir():
        fs.put_file(str(f), f"named-models/int8/{f.name}")
    make_lora(tiny_teacher, base / "adapter", merged=base / "merged", scale=0.2)
    # workers inherit this environment (the job forwards HF_* and COUSINS_MODEL_CACHE the same way)
    ray.init(address="local", num_cpus=2, object_store_memory=512 << 20, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}})
    try:
        cfg = resolve_paths(to_config(compose(
            "model.path=acme/tiny-teacher", "model.revision=v1", "model.build=null", "model.dtype=float32",
            f"storage.root={base / 'out'}", "cousins=none", "corpus.limit=12", "run.sampling.max_tokens=16",
            "engine.max_model_len=256", "run.run_id=named", "drift.bootstrap=100", "drift.noise_floor=false",
            "+cousins.stored={path: 's3://named-models/int8', kind: quantized}",
            f"+cousins.lora={{lora: '{base / 'adapter'}', kind: other}}",
            f"+cousins.served={{lora: '{base / 'adapter'}', lora_mode: serve, text_only: true, kind: other}}",
            config_name="drift")))
        validate(cfg)
        prepare_before_ray(cfg, scoring=True)
        result, summary = run_drift(cfg)
        yield cfg, RunLayout(resolve(cfg.storage.root), result.run_id), result, summary, base
    finally:
        ray.shutdown()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        checkpoints.metadata_dir.cache_clear()


def test_every_named_model_generates_without_error_and_the_run_commits(run):
    _, layout, result, summary, _ = run
    for m in result.models:
        assert m.error_rows == 0, m
    manifest = json.loads(layout.manifest.fs.cat_file(layout.manifest.path))
    models = {m["name"]: m for m in manifest["models"]}
    assert models["tiny-teacher"]["path"] == "acme/tiny-teacher" and models["tiny-teacher"]["revision"] == "v1"
    assert models["tiny-teacher"]["fingerprint"] and models["lora"]["lora"].endswith("adapter")
    assert {c["name"] for c in summary["cousins"]} == {"stored", "lora", "served"}


def test_the_stored_checkpoint_was_fetched_once_into_the_node_cache(run):
    cache = run[4] / "cache"
    whole = [p for p in cache.iterdir() if (p / checkpoints.FETCHED).exists() and (p / "model.safetensors").exists()]
    assert len(whole) == 1, sorted(p.name for p in cache.iterdir())  # one engine's fetch (the driver's: small files)
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]


def test_the_merged_adapter_answers_as_vllm_serving_it_and_drifts(run):
    _, layout, _, summary, base = run
    lora, served = _rows(layout.generations("lora")), _rows(layout.generations("served"))
    original = _rows(layout.generations("tiny-teacher"))
    assert lora.keys() == served.keys() == original.keys()
    same = sum(lora[k]["output_token_ids"] == served[k]["output_token_ids"] for k in lora)
    changed = sum(lora[k]["output_token_ids"] != original[k]["output_token_ids"] for k in lora)
    assert same == len(lora)  # greedy, fp32: token for token
    assert changed >= len(lora) // 2  # and the adapter does change the model
    s = {c["name"]: c["metrics"] for c in summary["cousins"]}
    assert s["lora"]["kld_mean"]["value"] > 1e-3
    assert s["served"]["exact_match"]["value"] == s["lora"]["exact_match"]["value"]
    assert "kld_mean" not in s["served"]  # text only


def test_a_served_adapter_in_a_drift_run_must_be_text_only(run, tiny_teacher, tmp_path):
    from cousins.contract.config import ConfigError
    from cousins.family.prepare import check_models

    base = run[4]
    cfg = resolve_paths(to_config(compose(
        f"model.path={tiny_teacher}", f"storage.root={tmp_path}", "cousins=none",
        f"+cousins.served={{lora: '{base / 'adapter'}', lora_mode: serve}}", config_name="drift")))
    with pytest.raises(ConfigError, match="lora_mode=serve cannot be scored"):
        check_models(cfg, scoring=True)
    check_models(cfg)  # a generate run may serve it
