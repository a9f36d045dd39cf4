"""Engines of several GPUs: the fit check against the cluster's shape and the engine core's process
(pure), then real local Ray clusters with logical GPUs, the fake engine starting its workers as
vLLM's Ray executor does (one Ray actor of one GPU per bundle of the placement group its engine
actor runs in)."""

from __future__ import annotations

import glob
import json
from collections import Counter

import pytest

from conftest import ROOT, compose
from cousins.contract.config import ConfigError, resolve_paths, to_config
from cousins.contract.validate import validate
from cousins.engine.backend import EngineSpec, Placement, core_in_own_process, llm_kwargs
from cousins.engine.placement import ANY_NODE, NodeShape, PlacementError, bundles, check_fits, strategy, uses_groups
from cousins.engine.plan import engine_spec, model_entries


def where(actors=1, tp=1, pp=1, gpus=1.0, cpus=1.0) -> Placement:
    return Placement(num_actors=actors, cpus_per_actor=cpus, gpus_per_actor=gpus, batch_size=8,
                     tensor_parallel_size=tp, pipeline_parallel_size=pp)


def test_an_engine_of_n_gpus_asks_for_n_bundles_of_one_gpu_the_first_holding_the_actor_cpus():
    w = where(tp=2)
    assert uses_groups(w) and not uses_groups(where(tp=1)) and not uses_groups(where(tp=2, gpus=0))
    assert bundles(w) == [{"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0}]
    assert strategy(w) == "STRICT_PACK"  # tensor-parallel workers stay on one node
    assert strategy(where(tp=2, pp=2)) == "PACK" and len(bundles(where(tp=2, pp=2))) == 4
    assert bundles(where(tp=2, cpus=0)) == [{"GPU": 1.0}, {"GPU": 1.0}]


def test_the_fit_check_counts_engines_per_node_and_refuses_what_no_node_can_hold():
    four = [NodeShape(gpus=4, cpus=8)]
    assert "hold 2" in check_fits(where(actors=2, tp=2), four)
    with pytest.raises(PlacementError, match=r"3 engine\(s\) of tensor_parallel_size=2 .* hold 2 such engine\(s\).*"
                                             r"engine.num_actors=2 fits"):
        check_fits(where(actors=3, tp=2), four)
    with pytest.raises(PlacementError, match="needs a node of at least 8 GPUs"):
        check_fits(where(tp=8), four)
    # Two nodes of two GPUs: two TP=2 engines (one per node), no TP=4 engine (it would span nodes).
    two_by_two = [NodeShape(gpus=2, cpus=4), NodeShape(gpus=2, cpus=4)]
    check_fits(where(actors=2, tp=2), two_by_two)
    with pytest.raises(PlacementError, match="at least 4 GPUs"):
        check_fits(where(tp=4), two_by_two)
    check_fits(where(tp=2, pp=2), two_by_two)  # pipeline stages may span nodes
    # The actor's CPUs count too; GPU shares pack several engines on one GPU.
    with pytest.raises(PlacementError):
        check_fits(where(actors=2, tp=2, cpus=6), four)
    check_fits(where(actors=4, gpus=0.5), [NodeShape(gpus=2, cpus=8)])
    with pytest.raises(PlacementError, match="a node with 1 GPU"):
        check_fits(where(), [NodeShape(gpus=0, cpus=64)])
    assert check_fits(where(gpus=0), []) == "CPU engines"


def test_an_autoscaler_node_type_that_holds_an_engine_lets_the_pool_wait_for_it():
    head = NodeShape(gpus=0, cpus=8)
    big = NodeShape(gpus=8, cpus=64, count=None, autoscaled=True)
    assert "autoscaler may add" in check_fits(where(actors=4, tp=4), [head, big])
    with pytest.raises(PlacementError, match="at least 16 GPUs"):
        check_fits(where(tp=16), [head, big])
    # An autoscaler whose node types are not published (Ray's v1 monitor): nothing refused up front.
    assert "autoscaler may add" in check_fits(where(actors=2, tp=8), [head, ANY_NODE])


def test_an_autoscaler_is_told_from_the_monitor_that_only_watches_a_local_cluster(monkeypatch):
    """(The local case's report is what `ray.init(address="local")` publishes; the autoscaler case's
    what the fake multi-node autoscaler of test_cluster publishes, both read on Ray 2.60.)"""
    import ray.experimental.internal_kv as kv

    from cousins.engine import placement as gpu_placement

    monkeypatch.delenv("RAY_enable_autoscaler_v2", raising=False)
    local = '{"autoscaler_report": {"legacy": true, "node_type_mapping": {"ab12": "node_ab12"}}}'
    typed = '{"autoscaler_report": {"legacy": true, "node_type_mapping": {"ab12": "ray.head.default"}}}'
    for status, running in ((None, True), (local, False), (typed, True)):
        monkeypatch.setattr(kv, "_internal_kv_get", lambda key, status=status: status)
        assert gpu_placement._autoscaler_running(wait_s=0.1) is running, status  # no report yet: not refused
    monkeypatch.setenv("RAY_enable_autoscaler_v2", "1")
    assert gpu_placement._autoscaler_running() is True


def test_parallel_engine_settings_are_checked_together_and_the_core_process_follows_the_device(tmp_path):
    def cfg(*overrides):
        return resolve_paths(to_config(compose(f"storage.root={tmp_path}", *overrides)))

    with pytest.raises(ConfigError) as e:
        validate(cfg("engine.gpus_per_actor=2", "engine.pipeline_parallel_size=0", "engine.core_process=maybe"))
    text = str(e.value)
    assert "engine.gpus_per_actor must be <= 1" in text and "pipeline_parallel_size must be >= 1" in text
    assert "engine.core_process must be one of auto, separate, in_actor" in text
    with pytest.raises(ConfigError, match="need GPUs"):
        validate(cfg("engine.tensor_parallel_size=2"))
    with pytest.raises(ConfigError, match="one GPU per worker"):
        validate(cfg("engine.pipeline_parallel_size=2", "engine.gpus_per_actor=0.5"))
    assert [core_in_own_process(c, on_cpu) for c in ("auto", "separate", "in_actor") for on_cpu in (True, False)] == [
        False, True, True, True, False, False]  # auto: vLLM's own default on GPU, in the actor on CPU
    entry = model_entries(cfg("engine.core_process=separate"))[0]
    assert engine_spec(cfg("engine.core_process=separate"), entry).core_process == "separate"


def test_vllm_gets_its_ray_executor_for_an_engine_of_several_gpus():
    spec = EngineSpec(model_name="m", model_path="/m", dtype="float32", quantization=None, max_model_len=64,
                      kv_cache_bytes=1 << 20, tensor_parallel_size=2, max_num_seqs=4, enforce_eager=True,
                      max_logprobs=20, pipeline_parallel_size=2)
    kw = llm_kwargs(spec, on_cpu=False)
    assert (kw["tensor_parallel_size"], kw["pipeline_parallel_size"], kw["distributed_executor_backend"]) == (2, 2,
                                                                                                              "ray")
    one = llm_kwargs(EngineSpec(**{**spec.__dict__, "tensor_parallel_size": 1, "pipeline_parallel_size": 1}),
                     on_cpu=False)
    assert one["distributed_executor_backend"] == "uni" and "gpu_memory_utilization" not in one


def test_engines_sharing_a_gpu_ask_vllm_for_their_share_of_its_memory(tmp_path):
    from cousins.engine.kld_actor import full_spec

    def spec(*overrides):
        cfg = resolve_paths(to_config(compose(f"storage.root={tmp_path}", *overrides)))
        return engine_spec(cfg, model_entries(cfg)[0])

    assert spec().gpu_memory_utilization is None  # CPU engines
    assert spec("engine.gpus_per_actor=1").gpu_memory_utilization == pytest.approx(0.9)
    half = spec("engine.gpus_per_actor=0.5")
    assert half.gpu_memory_utilization == pytest.approx(0.45)
    assert llm_kwargs(half, on_cpu=False)["gpu_memory_utilization"] == pytest.approx(0.45)
    assert "gpu_memory_utilization" not in llm_kwargs(half, on_cpu=True)
    # an exact-KLD actor holds two engines on its GPU: each asks for half
    assert full_spec(half).gpu_memory_utilization == pytest.approx(0.225)
    assert full_spec(spec()).gpu_memory_utilization is None


# --- on real local Ray clusters with logical GPUs -------------------------------------------------

def _config(tmp_path, *overrides):
    return resolve_paths(to_config(compose(
        f"model.path={tmp_path / 'teacher'}", f"storage.root={tmp_path / 'out'}", "corpus.limit=16",
        "run.sampling.max_tokens=8", "engine.batch_size=8", "engine.gpus_per_actor=1", "engine.start_timeout_s=120",
        *overrides)))


def _traces(trace_dir) -> list[dict]:
    return [json.load(open(p)) for p in sorted(glob.glob(f"{trace_dir}/*.json"))]


def _engine_groups_left() -> list:
    import ray

    return [g for g in ray.util.placement_group_table().values()
            if g["name"].startswith("cousins-engine") and g["state"] != "REMOVED"]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_two_engines_of_tp2_fill_a_four_gpu_node_and_a_third_is_refused_at_once(own_ray, tmp_path):
    import ray

    from cousins.orchestrate.pipeline import run_generate
    from fake_engine import FakeBackend

    ray.init(address="local", num_cpus=4, num_gpus=4, object_store_memory=256 << 20, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}})
    try:
        trace = tmp_path / "trace"
        trace.mkdir()
        result = run_generate(_config(tmp_path, "run.run_id=tp2", "engine.tensor_parallel_size=2",
                                      "engine.num_actors=2"), backend=FakeBackend(trace_dir=str(trace)))
        assert result.models[0].rows == 32 and result.models[0].error_rows == 0
        engines = _traces(trace)
        assert len(engines) == 2
        for e in engines:
            assert e["gpus"] == []  # the engine actor itself holds no GPU ...
            assert len(e["workers"]) == 2 and all(len(w["gpus"]) == 1 for w in e["workers"])  # ... its workers one each
            assert {w["node"] for w in e["workers"]} == {e["node"]}  # on the actor's node
        used = [g for e in engines for w in e["workers"] for g in w["gpus"]]
        assert sorted(used) == sorted(set(used)) and len(used) == 4  # exactly 2 GPUs an engine, none shared
        assert result.models[0].accelerator_s > 0
        # The stage's groups are gone once it ends: the next stage finds every GPU free.
        assert _engine_groups_left() == []
        assert ray.available_resources().get("GPU") == 4

        for i, (overrides, reason) in enumerate(((("engine.tensor_parallel_size=2", "engine.num_actors=3"),
                                                  "hold 2 such engine"),
                                                 (("engine.tensor_parallel_size=8",), "at least 8 GPUs"))):
            with pytest.raises(PlacementError, match=reason):
                run_generate(_config(tmp_path, f"run.run_id=too-big-{i}", *overrides), backend=FakeBackend())
            # refused before any stage (no prompts written), not after engine.start_timeout_s
            assert glob.glob(f"{tmp_path}/out/runs/too-big-{i}/*") and not glob.glob(
                f"{tmp_path}/out/runs/too-big-{i}/prompts*")
        assert _engine_groups_left() == []
    finally:
        ray.shutdown()


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_on_two_nodes_of_two_gpus_each_tp2_engine_keeps_to_one_node_and_tp4_is_refused(own_ray, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from cousins.orchestrate.pipeline import run_generate
    from fake_engine import FakeBackend

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 2,
                                                            "object_store_memory": 256 << 20})
    cluster.add_node(num_cpus=2, num_gpus=2, object_store_memory=256 << 20)
    try:
        ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}})
        trace = tmp_path / "trace"
        trace.mkdir()
        result = run_generate(_config(tmp_path, "run.run_id=tp2-nodes", "engine.tensor_parallel_size=2",
                                      "engine.num_actors=2", "engine.cpus_per_actor=0.5"),
                              backend=FakeBackend(trace_dir=str(trace)))
        assert result.models[0].rows == 32
        engines = _traces(trace)
        assert len(engines) == 2
        assert all({w["node"] for w in e["workers"]} == {e["node"]} for e in engines)
        assert Counter(e["node"] for e in engines) == Counter({n["NodeID"]: 1 for n in ray.nodes() if n["Alive"]})
        with pytest.raises(PlacementError, match="at least 4 GPUs"):
            run_generate(_config(tmp_path, "run.run_id=tp4", "engine.tensor_parallel_size=4"), backend=FakeBackend())
    finally:
        ray.shutdown()
        cluster.shutdown()
