"""The benchmark job keeps working: a smoke run at tiny sizes. Its figures are printed, not asserted
(speed is measured by the benchmark itself, on a quiet machine, never by a test)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_benchmark_smoke_run_writes_its_result(tiny_teacher, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "benchmark.py"), f"model.path={tiny_teacher}",
         f"storage.root={tmp_path / 'runs'}", "bench.prompts=8", "bench.repeats=1", "bench.two_node=false",
         "bench.drift=false", "run.sampling.max_tokens=16", f"bench.out={out}", "ray.num_cpus=2"],
        capture_output=True, text=True, timeout=850, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(out.read_text())
    assert result["device"].startswith(("cpu:", "gpu:"))
    s = result["summary"]
    for name in ("pipeline_over_bare", "bare_tokens_per_s", "pipeline_startup_s", "bytes_per_output_token",
                 "engine_peak_rss_mib"):
        assert name in s, name
    rep = result["repetitions"][0]
    assert rep["pipeline"]["rows"] == 8 and rep["bare"]["rows"] == 8
    print("\n" + "\n".join(proc.stdout.strip().splitlines()[-9:]))


def test_ray_data_llm_comparison_runs_the_same_prompts_through_rays_own_processor(tiny_teacher, tmp_path):
    """bench.ray_data_llm (on in the GPU check): Ray's LLM processor on the benchmark's prompts. Its
    engine actors ask for a whole GPU, so this local Ray has one logical GPU for the CPU engine. In
    a process of its own: ray.data.llm leaves state behind that made a later test's Ray Data hang."""
    script = f"""
import json, sys
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
import ray
from conftest import compose
from cousins.bench import suite as bench
from cousins.contract.config import resolve_paths, to_config
cfg = resolve_paths(to_config(compose("model.path={tiny_teacher}", "storage.root={tmp_path}",
                                      "run.sampling.max_tokens=16", "run.sampling.logprobs=5",
                                      config_name="benchmark")))
ray.init(address="local", num_cpus=2, num_gpus=1, object_store_memory=256 << 20, include_dashboard=False)
try:
    print("RESULT", json.dumps(bench.ray_data_llm(cfg, 8)))
finally:
    ray.shutdown()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    got = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    samples = 1  # conf/benchmark.yaml: run.samples
    assert got["rows"] == 8 * samples and 0 < got["output_tokens"] <= 8 * samples * 16
    print(f"\nray.data.llm: {got}")
