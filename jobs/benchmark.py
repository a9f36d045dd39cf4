"""Benchmarks: pipeline against bare vLLM, drift overhead, bytes per token, one node against two.
Prints a table of medians and spread over repetitions and writes the whole result as JSON.

    python jobs/benchmark.py                                  # 128 prompts x 3 repetitions, locally
    python jobs/benchmark.py bench.prompts=16 bench.repeats=1 bench.two_node=false   # a smoke run
    python jobs/benchmark.py cousins=demo bench.drift_parallel=true bench.repeats=1 bench.bare=false \
        bench.drift=false bench.two_node=false bench.prompts=16       # the demo's cousins side by side
"""

import json
import os
import sys
import time

import hydra
from omegaconf import DictConfig

from cousins.bench import suite as bench
from cousins.contract.config import ConfigError, resolve_paths, to_config
from cousins.contract.redact import redacted
from cousins.contract.validate import validate
from cousins.family.prepare import prepare_before_ray
from cousins.run.runtime import init_ray


@hydra.main(version_base=None, config_path="../conf", config_name="benchmark")
def main(dcfg: DictConfig) -> None:
    cfg = resolve_paths(to_config(dcfg))
    b = cfg.bench
    try:
        validate(cfg)
        prepare_before_ray(cfg)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    tag = time.strftime("%Y%m%d-%H%M%S")

    def save(reps: list[dict]) -> dict:  # after every step: a stalled step loses nothing measured before it
        result = {"device": bench.device(), "tag": tag, "config": redacted(cfg), "repetitions": reps,
                  "summary": bench.summarise(reps)}
        with open(b.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
        return result

    int8 = os.path.join(os.path.dirname(cfg.model.path), f"{os.path.basename(cfg.model.path)}-rtn-int8")
    reps = []
    init_ray(cfg.ray, cfg.log)
    for i in range(b.repeats):
        rep = {"bare": bench.bare_vllm(cfg, b.prompts)} if b.bare else {}
        rep["pipeline"] = bench.pipeline_steady(cfg, b.prompts, f"{tag}-{i}")
        if b.ray_data_llm:
            rep["ray_data_llm"] = bench.ray_data_llm(cfg, b.prompts)
        rep["bytes_per_output_token"] = bench.bytes_per_token(cfg, rep["pipeline"]["run_id"])
        if b.drift:
            rep["drift"] = bench.drift_overhead(cfg, b.prompts, f"{tag}-{i}", int8)
            if b.exact_kld:
                rep["drift_exact"] = bench.drift_overhead(cfg, b.prompts, f"{tag}-{i}", int8, kld="exact")
        reps.append(rep)
        save(reps)
        print(f"repetition {i + 1}/{b.repeats} done", flush=True)
    if b.two_node and cfg.ray.address is None and not os.environ.get("RAY_ADDRESS"):
        import ray

        ray.shutdown()  # the two-node comparison brings its own local cluster
        for i, rep in enumerate(reps):
            rep["two_nodes"] = bench.two_nodes(cfg, b.prompts, f"{tag}-{i}")
            if b.two_node_long_samples > 1:
                rep["two_nodes_long"] = bench.two_nodes(cfg, b.prompts, f"{tag}-{i}-long", b.two_node_long_samples)
            save(reps)
    if b.scale and cfg.ray.address is None and not os.environ.get("RAY_ADDRESS"):
        import ray

        ray.shutdown()  # the scale comparison brings its own local clusters
        source = b.scale_run or (f"bench-{tag}-0-drift" if b.drift else None)
        if source is None:
            sys.exit("error: bench.scale needs bench.scale_run (a committed drift run) or bench.drift=true")
        reps[0]["diff_scale"] = bench.diff_scale(cfg, source, list(b.scale_factors))
        save(reps)
    if b.drift_parallel and cfg.ray.address is None and not os.environ.get("RAY_ADDRESS"):
        import ray

        from cousins.bench.parallel import drift_parallel

        ray.shutdown()  # each cluster size brings its own local cluster
        reps[0]["drift_parallel"] = drift_parallel(cfg, b.prompts, tag, list(b.parallel_nodes))
        save(reps)
    result = save(reps)
    print(f"device: {result['device']}; {b.prompts} prompts, {b.repeats} repetitions")
    print(bench.table(result["summary"]))
    print(f"result: {os.path.abspath(b.out)}")


if __name__ == "__main__":
    main()
