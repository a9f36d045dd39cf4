"""On a CUDA GPU (skipped without one; scripts/gpu_check.sh runs them): the engine actor on real
vLLM with its core in a process of its own (the GPU default), a generation run whose engines hold
GPUs through Ray, and, with two GPUs or more, a tensor-parallel engine in its placement group."""

from __future__ import annotations

import pyarrow as pa
import pytest

from conftest import ROOT, compose, cuda_gpus
from cousins.engine import actors
from cousins.engine import rows as engine_rows
from cousins.engine import backend as engine
from cousins.contract.config import resolve_paths, to_config

pytestmark = [pytest.mark.gpu, pytest.mark.integration, pytest.mark.timeout(900), pytest.mark.usefixtures("own_ray")]


def _rows(n: int) -> pa.Table:
    t = pa.table({"prompt_id": [f"p{i}" for i in range(n)], "category": [None] * n,
                  "messages": [[{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}] for i in range(n)]})
    return engine_rows.expand_samples(t, samples=1, base_seed=7)


def test_a_gpu_engine_runs_its_core_in_its_own_process_and_fills_every_row(tiny_teacher):
    spec = engine.EngineSpec(model_name="tiny-teacher", model_path=tiny_teacher, dtype="float32", quantization=None,
                             max_model_len=256, kv_cache_bytes=256 << 20, tensor_parallel_size=1, max_num_seqs=64,
                             enforce_eager=True, max_logprobs=20)
    actor = actors.EngineActor(spec, engine.Sampling(temperature=0.8, top_p=0.95, top_k=0, max_tokens=32, logprobs=5))
    assert type(actor.llm.llm_engine.engine_core).__name__ == "SyncMPClient"
    out = actor(_rows(64))
    assert out.num_rows == 64 and out.column("error").null_count == 64
    assert all(len(lp) == n for lp, n in zip(out.column("output_logprobs").to_pylist(),
                                             out.column("output_tokens").to_pylist()))


def _generate(tmp_path, run_id: str, *overrides):
    import ray

    from cousins.orchestrate.pipeline import run_generate

    cfg = resolve_paths(to_config(compose(f"model.path={ROOT / 'models' / 'tiny-teacher'}",
                                          f"storage.root={tmp_path}", f"run.run_id={run_id}", "corpus.limit=64",
                                          "engine.gpus_per_actor=1", "engine.kv_cache_gib=1", *overrides)))
    ray.init(address="local", include_dashboard=False)
    try:
        return run_generate(cfg).models[0]
    finally:
        ray.shutdown()


def test_a_generation_run_on_gpu_engines_counts_gpu_seconds(tiny_teacher, tmp_path):
    m = _generate(tmp_path, "gpu-one")
    assert m.rows == 128 and m.error_rows == 0 and m.accelerator == "gpu" and m.accelerator_s > 0


@pytest.mark.skipif(cuda_gpus() < 2, reason="needs two CUDA GPUs")
def test_a_tensor_parallel_engine_runs_in_its_placement_group(tiny_teacher, tmp_path):
    m = _generate(tmp_path, "gpu-tp2", "engine.tensor_parallel_size=2")
    assert m.rows == 128 and m.error_rows == 0
