"""Benchmarks, measured in one run and printed as ratios (jobs/benchmark.py drives them).

1. pipeline / bare vLLM: the generation stage's steady-state throughput against vLLM's `LLM` in
   one process on the same model, prompts, sampling, seeds and logprobs, and on a CPU engine with
   the same threads as an engine actor (its `engine.cpus_per_actor`). Steady state for the
   pipeline is output tokens over the engines' working window (first batch begun to last batch
   done, from the run's ledger); the rest of the stage's wall time is reported as start-up. Bare
   vLLM runs in a subprocess: a warm-up call, then one timed `generate` of every prompt.
2. drift: the diff's arithmetic time as a share of generation time, and scoring against generation
   (one cousin, the same prompts): steady state (the engines' working windows of both passes, as
   in 1) and wall (each pass also pays its engine start-up); with bench.exact_kld, the same run in
   drift.kld=exact, its extra pass against the top-k run's whole time.
3. bytes on storage per generated token (zstd Parquet, with the run's top-k logprobs) and the peak
   RSS of an engine actor process.
4. two nodes against one (`two_node`): a local two-node Ray cluster, one engine actor per node,
   against one actor on one node, with the rows per node.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile

from cousins.contract.config import Config


def _spread(values: list[float]) -> dict:
    v = [x for x in values if x is not None]
    if not v:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v), "values": v}


def bare_vllm(cfg: Config, limit: int) -> dict:
    """vLLM's LLM in a fresh process (`python -m cousins.engine.backend`) on the run's first `limit` prompts,
    as the pipeline sends them: the same engine spec, sampling, seeds and logprobs."""
    from cousins.run import corpus
    from cousins.engine import backend as engine
    from cousins.engine import plan
    from cousins.engine.rows import row_seed

    path = cfg.corpus.path
    with open(path, "rb") as f:  # one local file: the bare engine needs no Ray to read it
        rows, _ = corpus.parse_file(f.read(), source=path, fmt=corpus.format_of(path, cfg.corpus.format),
                                    fields=cfg.corpus.fields, max_chars=cfg.corpus.max_chars)
    rows = rows[:limit]  # the pipeline's corpus.limit keeps the first N in file order too
    entry = plan.model_entries(cfg)[0]
    job = engine.bare_job(plan.engine_spec(cfg, entry), plan.sampling(cfg),
                          messages=[r["messages"] for r in rows for _ in range(cfg.run.samples)],
                          seeds=[row_seed(cfg.run.sampling.seed, r["prompt_id"], i)
                                 for r in rows for i in range(cfg.run.samples)])
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    env = dict(os.environ)
    if cfg.engine.gpus_per_actor == 0:
        # The CPUs an engine actor has: Ray gives an actor OMP_NUM_THREADS = its num_cpus, so a
        # bare engine with the whole machine would be measuring more cores, not less overhead.
        env["OMP_NUM_THREADS"] = str(max(1, int(cfg.engine.cpus_per_actor)))
    try:
        out = subprocess.run([sys.executable, "-m", "cousins.engine.backend", f.name], capture_output=True, text=True,
                             timeout=1200, env=env)
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        raise RuntimeError(f"bare vLLM run failed:\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "omp_num_threads": env.get("OMP_NUM_THREADS")}


def ray_data_llm(cfg: Config, limit: int) -> dict:
    """The same prompts, seeds, sampling and top-k logprobs through Ray's own LLM batch processor
    (`ray.data.llm`, vLLM's async engine in actors, its engine core in a process of its own) on
    the connected Ray, with the pipeline's engine settings and actor count: wall time (engine
    start included, as the pipeline's wall is) and output tokens, for the pipeline's wall rate
    against it. Its engine actors ask Ray for whole GPUs: a run for GPU engines."""
    import time

    import ray.data
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from cousins.run import corpus
    from cousins.engine import backend as engine
    from cousins.engine import plan
    from cousins.engine.rows import row_seed

    path = cfg.corpus.path
    with open(path, "rb") as f:
        rows, _ = corpus.parse_file(f.read(), source=path, fmt=corpus.format_of(path, cfg.corpus.format),
                                    fields=cfg.corpus.fields, max_chars=cfg.corpus.max_chars)
    s = plan.sampling(cfg)
    items = [{"messages": r["messages"], "seed": row_seed(cfg.run.sampling.seed, r["prompt_id"], i)}
             for r in rows[:limit] for i in range(cfg.run.samples)]
    kw = engine.llm_kwargs(plan.engine_spec(cfg, plan.model_entries(cfg)[0]), on_cpu=cfg.engine.gpus_per_actor == 0)
    model = kw.pop("model")
    for k in ("tokenizer", "distributed_executor_backend"):  # (it sets the executor from tp x pp itself)
        kw.pop(k)
    processor = build_processor(
        vLLMEngineProcessorConfig(model_source=model, engine_kwargs=kw, batch_size=cfg.engine.batch_size,
                                  concurrency=cfg.engine.num_actors, log_engine_metrics=False,
                                  detokenize_stage=False),
        preprocess=lambda row: {"messages": list(row["messages"]), "sampling_params": {
            **engine.sampling_kwargs(s, row["seed"], detokenize=bool(s.stop)), "flat_logprobs": False}},
        postprocess=lambda row: {"tokens": row["num_generated_tokens"]})
    t0 = time.perf_counter()
    out = processor(ray.data.from_items(items)).take_all()
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in out)
    return {"rows": len(out), "output_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def pipeline_steady(cfg: Config, limit: int, tag: str) -> dict:
    """A generation run of `limit` prompts on the connected Ray. Steady-state throughput is the
    output tokens over the engines' working window (first batch begun to last batch done: reading,
    batching, generation and writing overlap in it; engine start-up and the final read-back are
    outside it and reported as start-up)."""
    from cousins.orchestrate.pipeline import run_generate

    c = copy.deepcopy(cfg)
    c.corpus.limit, c.run.run_id, c.cousins = limit, f"bench-{tag}", {}
    r = run_generate(c).models[0]
    window = r.retries.get("busy_window_s")
    return {"rows": r.rows, "output_tokens": r.output_tokens, "wall_s": r.wall_s, "engine_s": r.engine_s,
            "busy_window_s": window, "peak_rss_mib": r.retries.get("peak_rss_mib"), "run_id": c.run.run_id,
            "steady_tokens_per_s": _steady(r), "startup_s": r.wall_s - window if window else None,
            "wall_tokens_per_s": r.output_tokens / r.wall_s if r.wall_s else None}


def _steady(r) -> float | None:
    """A generation stage's steady-state tokens/s: the sum over its engine actors of each one's
    tokens over its own working window (the ledger's), else tokens over the pool's window."""
    if r.retries.get("steady_tokens_per_s"):
        return r.retries["steady_tokens_per_s"]
    window = r.retries.get("busy_window_s")
    return r.new_output_tokens / window if window else None


def bytes_per_token(cfg: Config, run_id: str) -> float:
    from cousins.run.lifecycle import committed
    from cousins.run.layout import part_files
    from cousins.run.storage import resolve

    run = committed(resolve(cfg.storage.root, **cfg.storage.options), run_id)
    loc = run.layout.generations(cfg.model.name)
    size = sum(loc.fs.size(f) for f in part_files(loc))
    tokens = run.read(loc, ["output_tokens"]).column("output_tokens")
    return size / max(1, sum(x or 0 for x in tokens.to_pylist()))


def drift_overhead(cfg: Config, limit: int, tag: str, cousin_path: str, kld: str = "topk") -> dict:
    """One quantized cousin against the original on `limit` prompts: generation, scoring, diff times
    (and with kld="exact", the exact-KLD pass's)."""
    from cousins.contract.config import CousinConfig
    from cousins.family.prepare import prepare_before_ray
    from cousins.orchestrate.pipeline import run_drift

    c = copy.deepcopy(cfg)
    c.corpus.limit, c.run.run_id = limit, f"bench-{tag}-drift" + ("-exact" if kld == "exact" else "")
    c.drift.kld = kld
    c.cousins = {"rtn-int8": CousinConfig(path=cousin_path, kind="quantized", build="rtn-int8")}
    c.drift.noise_floor = False
    prepare_before_ray(c)
    _, summary = run_drift(c)
    t = summary["timings"]
    gb, sb = t.get("generate_busy_s"), t.get("score_busy_s")
    return {"generate_s": t["generate_s"], "score_s": t["score_s"], "diff_s": t["diff_s"], "report_s": t["report_s"],
            "kld_s": t.get("kld_s"),
            "kld_mean": {s["name"]: (s["metrics"].get("kld_mean") or {}).get("value") for s in summary["cousins"]},
            "generate_busy_s": gb, "score_busy_s": sb,
            "diff_share_of_generation": t["diff_s"] / t["generate_s"],
            "score_over_generation": t["score_s"] / t["generate_s"],
            "score_over_generation_steady": sb / gb if sb and gb else None}


def two_nodes(cfg: Config, limit: int, tag: str, samples: int | None = None) -> dict:
    """One engine actor on one node against two actors on a two-node local cluster (own Ray), on
    `limit` prompts x `samples` (default: the config's run.samples). Each side's wall time is
    split by the ledger's timeline: the lead-in before the first batch (Ray Data and actor start,
    the engines' loads), the working window, and what follows the last batch (the last writes,
    verify, commit)."""
    from collections import Counter

    import ray
    from ray.cluster_utils import Cluster

    from cousins.orchestrate.pipeline import run_generate
    from cousins.run.lifecycle import committed
    from cousins.run.storage import resolve

    # Two CPUs a node: with one, an engine actor and Ray Data's read/write tasks deadlock silently.
    # Both "nodes" share this machine, so each is given half its cores for the engine's threads:
    # vLLM's CPU backend binds every engine to the same cores by default, which on one machine
    # would make two engines take turns rather than run side by side as on two machines.
    half_a, half_b = _halves(sorted(os.sched_getaffinity(0)))
    bind = lambda cores: {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores))}  # noqa: E731
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 1, "resources": {"node_a": 1}, "object_store_memory": 256 << 20,
        "env_vars": bind(half_a)})
    cluster.add_node(num_cpus=2, num_gpus=1, resources={"node_b": 1}, object_store_memory=256 << 20,
                     env_vars=bind(half_b))
    samples = samples or cfg.run.samples
    out = {"samples": samples}
    try:
        ray.init(address=cluster.address)
        names = {n["NodeID"]: ("node_a" if "node_a" in n["Resources"] else "node_b") for n in ray.nodes()}
        # Batches small enough that two actors both get several: Ray Data hands the first actor
        # ready as many batches as it takes in flight, so a few large ones may all go to it.
        batch_size = max(8, min(cfg.engine.batch_size, limit * samples // 8))
        for actors in (1, 2):
            c = copy.deepcopy(cfg)
            c.corpus.limit, c.run.run_id, c.cousins = limit, f"bench-{tag}-nodes{actors}", {}
            c.run.samples = samples
            c.engine.num_actors, c.engine.gpus_per_actor, c.engine.cpus_per_actor = actors, 1, 0.5
            c.engine.batch_size = batch_size
            r = run_generate(c).models[0]
            done = committed(resolve(c.storage.root), c.run.run_id)
            split = Counter(names.get(x, x) for x in done.read(done.layout.generations(c.model.name),
                                                               ["engine_node"]).column("engine_node").to_pylist())
            out[f"actors_{actors}"] = {"wall_s": r.wall_s, "output_tokens": r.output_tokens,
                                       "tokens_per_s": r.output_tokens / r.wall_s,
                                       "busy_window_s": r.retries.get("busy_window_s"),
                                       "steady_tokens_per_s": _steady(r), "per_actor": r.retries.get("actors"),
                                       "rows_per_node": dict(split), **wall_split(r)}
        out["cores_per_node"], out["batch_size"] = [half_a, half_b], batch_size
        out["speedup"] = out["actors_2"]["tokens_per_s"] / out["actors_1"]["tokens_per_s"]
        a1, a2 = out["actors_1"]["steady_tokens_per_s"], out["actors_2"]["steady_tokens_per_s"]
        out["speedup_steady"] = a2 / a1 if a1 and a2 else None
        two = out["actors_2"]
        out["outside_window_share"] = (1 - two["busy_window_s"] / two["wall_s"]) if two["busy_window_s"] else None
        if a1 and a2:
            # The wall speedup this size allows at best: one actor's time outside its window
            # (start-up, which more engines do not shorten) plus the work at two actors' steady rate.
            ideal = out["actors_1"]["outside_window_s"] + out["actors_1"]["output_tokens"] / a2
            out["speedup_bound_at_this_size"] = out["actors_1"]["wall_s"] / ideal
    finally:
        ray.shutdown()
        cluster.shutdown()
    return out


def wall_split(r) -> dict:
    """A generation stage's wall time split by its ledger's timeline (seconds): before the first
    batch began (Ray Data and actor start, the engines' loads: each engine's load and when it was
    ready are listed), the working window, and after the last batch was done."""
    t = r.retries or {}
    window, first, last = t.get("busy_window_s"), t.get("first_batch_at_s"), t.get("last_batch_done_at_s")
    return {"lead_in_s": first, "after_last_batch_s": r.wall_s - last if last is not None else None,
            "outside_window_s": r.wall_s - window if window is not None else None,
            "engine_load_s": t.get("engine_load_s"), "engine_ready_at_s": t.get("engine_ready_at_s"),
            "engine_load_began_at_s": t.get("engine_load_began_at_s")}


def diff_scale(cfg: Config, run_id: str, factors: list[int]) -> dict:
    """The diff of `run_id` (a committed drift run) copied 1x, 8x, ... its prompts, recomputed in a
    fresh driver on one local node and on two (one CPU each): wall time, driver peak RSS, and
    throughput in prompts x cousins per second."""
    from ray.cluster_utils import Cluster

    from cousins.bench.scale import measure, synthesize
    from cousins.run.storage import resolve

    root = resolve(cfg.storage.root, **cfg.storage.options)
    runs = {f: synthesize(root, run_id, f) for f in factors}
    out: dict = {"source_run": run_id, "factors": factors}
    for nodes in (1, 2):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 512 << 20})
        if nodes == 2:
            cluster.add_node(num_cpus=1, object_store_memory=512 << 20)
        try:
            for f, rid in runs.items():
                m = measure(root.url, rid, cluster.address)
                m["throughput"] = m["prompts"] * m["cousins"] / m["wall_s"]
                out[f"nodes_{nodes}_x{f}"] = m
                print(f"diff x{f} on {nodes} node(s): {m['wall_s']:.1f} s, driver peak RSS "
                      f"{m['driver_peak_rss_mib']:.0f} MiB", flush=True)
        finally:
            cluster.shutdown()
    lo, hi = min(factors), max(factors)
    out["rss_growth"] = out[f"nodes_1_x{hi}"]["driver_peak_rss_mib"] / out[f"nodes_1_x{lo}"]["driver_peak_rss_mib"]
    out["two_node_throughput_ratio"] = out[f"nodes_2_x{hi}"]["throughput"] / out[f"nodes_1_x{hi}"]["throughput"]
    return out


def _halves(cores: list[int]) -> tuple[list[int], list[int]]:
    """This machine's cores split in two (one each on a single-core machine)."""
    if len(cores) < 2:
        return cores, cores
    return cores[:len(cores) // 2], cores[len(cores) // 2:]


def summarise(reps: list[dict]) -> dict:
    """Medians and spread of the ratios over repetitions."""
    get = lambda *path: [_dig(r, path) for r in reps]  # noqa: E731
    return {
        "pipeline_over_bare": _spread([p / b if p and b else None for p, b in zip(
            get("pipeline", "steady_tokens_per_s"), get("bare", "tokens_per_s"))]),
        "pipeline_steady_tokens_per_s": _spread(get("pipeline", "steady_tokens_per_s")),
        "bare_tokens_per_s": _spread(get("bare", "tokens_per_s")),
        "pipeline_over_bare_default_detokenize": _spread([p / b if p and b else None for p, b in zip(
            get("pipeline", "steady_tokens_per_s"), get("bare", "default_detokenize_tokens_per_s"))]),
        "pipeline_startup_s": _spread(get("pipeline", "startup_s")),
        # wall rates (engine start-up included on both sides): Ray's own LLM batch processor
        "pipeline_over_ray_data_llm_wall": _spread([p / r if p and r else None for p, r in zip(
            get("pipeline", "wall_tokens_per_s"), get("ray_data_llm", "tokens_per_s"))]),
        "ray_data_llm_tokens_per_s": _spread(get("ray_data_llm", "tokens_per_s")),
        "bare_import_plus_load_s": _spread([a + b if a is not None and b is not None else None for a, b in zip(
            get("bare", "import_s"), get("bare", "load_s"))]),
        "drift_diff_share_of_generation": _spread(get("drift", "diff_share_of_generation")),
        "drift_score_over_generation_steady": _spread(get("drift", "score_over_generation_steady")),
        "drift_score_over_generation_wall": _spread(get("drift", "score_over_generation")),
        # drift.kld=exact: its extra pass over the whole top-k drift run (generate + score + diff)
        "drift_exact_kld_extra_over_topk_drift": _spread([e / (d["generate_s"] + d["score_s"] + d["diff_s"])
                                                          if e is not None and d else None for e, d in zip(
                                                              get("drift_exact", "kld_s"), get("drift"))]),
        "bytes_per_output_token": _spread(get("bytes_per_output_token")),
        "engine_peak_rss_mib": _spread(get("pipeline", "peak_rss_mib")),
        "two_nodes_speedup": _spread(get("two_nodes", "speedup")),
        "two_nodes_speedup_steady": _spread(get("two_nodes", "speedup_steady")),
        "two_nodes_outside_window_share": _spread(get("two_nodes", "outside_window_share")),
        "two_nodes_speedup_bound": _spread(get("two_nodes", "speedup_bound_at_this_size")),
        "two_nodes_long_speedup": _spread(get("two_nodes_long", "speedup")),
        "two_nodes_long_speedup_steady": _spread(get("two_nodes_long", "speedup_steady")),
        "diff_scale_driver_rss_growth": _spread(get("diff_scale", "rss_growth")),
        "diff_scale_two_node_throughput_ratio": _spread(get("diff_scale", "two_node_throughput_ratio")),
        **{f"drift_parallel_{n}x1_{k}": _spread(get("drift_parallel", f"nodes_{n}", *path)) for n in (2, 4)
           for k, path in (("speedup", ("speedup",)), ("startup_share", ("parallel", "startup_share")),
                           ("projected_8", ("projected_speedup_8_slots",)), ("kept_speedup", ("kept_speedup",)),
                           ("parallel_over_fresh", ("parallel_over_fresh",)))},
    }


def _dig(d, path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


TARGETS = {"pipeline_over_bare": (">=", 0.95), "drift_diff_share_of_generation": ("<=", 0.02),
           "drift_score_over_generation_steady": ("<=", 0.5), "two_nodes_speedup_steady": (">=", 1.7),
           "two_nodes_speedup": (">=", 1.5), "two_nodes_long_speedup": (">=", 1.5),
           "bytes_per_output_token": ("<=", 120.0), "diff_scale_driver_rss_growth": ("<=", 1.15),
           "drift_parallel_4x1_speedup": (">=", 1.8), "drift_parallel_4x1_startup_share": ("<=", 0.5),
           "diff_scale_two_node_throughput_ratio": (">=", 1.7)}


def table(summary: dict) -> str:
    lines = [f"{'figure':<34} {'median':>10} {'min':>10} {'max':>10} {'n':>3}  target"]
    for name, s in summary.items():
        if s["median"] is None:
            continue
        target = TARGETS.get(name)
        mark = ""
        if target:
            ok = s["median"] >= target[1] if target[0] == ">=" else s["median"] <= target[1]
            mark = f"{target[0]} {target[1]:g} {'met' if ok else 'MISSED'}"
        lines.append(f"{name:<34} {s['median']:>10.4g} {s['min']:>10.4g} {s['max']:>10.4g} {s['n']:>3}  {mark}")
    return "\n".join(lines)


def device() -> str:
    """The machine in words: the GPU's name, else the CPU model and core count."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"gpu: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    except ImportError:
        pass
    name = "unknown cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {name}, {os.cpu_count()} cores"
