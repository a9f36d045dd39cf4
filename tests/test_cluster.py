"""Scale out: a real Ray head started by the test with a job submitted through the Job API, and a
two-node cluster whose engine actors land on both nodes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from conftest import ROOT, compose, free_port
from cousins.drift.answers import Rule
from cousins.contract.config import resolve_paths, to_config
from cousins.contract.validate import validate
from cousins.run.layout import RunLayout, part_files
from cousins.run.storage import resolve

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900), pytest.mark.usefixtures("own_ray")]
BIN = Path(sys.executable).parent


def _pids_of(marker: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker.encode() in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


def stop_processes_of(temp_dir: str) -> None:
    """Stop every process whose command line names `temp_dir` (a Ray we started there): TERM, then KILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _pids_of(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)


@pytest.fixture
def ray_head():
    """`ray start --head` on loopback, in a temp dir of its own; stopped by the ids of its processes
    (never `ray stop`, which would stop every Ray on the machine)."""
    temp_dir = tempfile.mkdtemp(prefix="crh", dir="/tmp")  # short: Ray's socket paths must fit
    dash = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}",
           "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats", "--object-store-memory=536870912",
           # every agent port of its own, so another Ray on this machine cannot take them first
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        stop_processes_of(temp_dir)


def test_generation_job_submitted_to_a_real_head_succeeds(ray_head, tiny_teacher, tmp_path):
    address, env = ray_head
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(BIN / "cousins"), "submit", "--address", address, "--python", sys.executable, "--",
         f"model.path={tiny_teacher}", "corpus.limit=6", "run.samples=2", "run.sampling.max_tokens=8",
         f"storage.root={tmp_path / 'out'}", "run.run_id=submitted"],
        capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert proc.stdout.startswith("submitted raysubmit_") and "SUCCEEDED" in proc.stdout
    assert "run submitted committed at" in proc.stdout  # the job's own summary, followed live
    manifest = json.loads((tmp_path / "out" / "runs" / "submitted" / "manifest.json").read_text())
    assert manifest["row_counts"]["tiny-teacher"]["rows"] == 12
    job_id = proc.stdout.split()[1].rstrip(":")
    status = subprocess.run([str(BIN / "cousins"), "status", job_id, "--address", address],
                            capture_output=True, text=True, timeout=60, env=env)
    assert status.stdout.strip().endswith("SUCCEEDED")
    print(f"\n[submit] {job_id} SUCCEEDED in {time.monotonic() - t0:.0f}s")

    # The same job with a Python that lacks the project (this venv's base interpreter): one line
    # naming what is missing, and the job fails at once instead of in a traceback from an import.
    bare = os.path.join(sys.base_prefix, "bin", "python3")
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(BIN / "cousins"), "submit", "--address", address, "--python", bare, "--",
         f"model.path={tiny_teacher}", f"storage.root={tmp_path / 'out'}", "run.run_id=bare"],
        capture_output=True, text=True, timeout=300, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.strip()]
    assert proc.returncode == 1 and lines[-1].endswith("FAILED"), proc.stdout[-3000:]
    assert lines[-2].startswith(f"error: the cluster's Python ({bare}) cannot run the generate job: it lacks "
                                "the packages ray, ") and "hydra-core" in lines[-2], lines[-2]
    assert "Traceback" not in proc.stdout and not (tmp_path / "out" / "runs" / "bare").exists()
    print(f"[submit] with a bare Python: FAILED in {time.monotonic() - t0:.0f}s with one line")


def _fake_autoscaling_config(gcs_port: int, max_workers: int) -> dict:
    """Ray's fake multi-node provider: 'nodes' are extra raylets on this machine, started and
    stopped by the autoscaler exactly as it would start and stop cloud VMs."""
    return {
        "cluster_name": "cousins-fake", "max_workers": max_workers,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{gcs_port}"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2, "GPU": 0}, "node_config": {}, "max_workers": 0},
            "gpu-worker": {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 256 << 20}, "node_config": {},
                           "min_workers": 0, "max_workers": max_workers},
        },
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1,
        "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


def test_autoscaler_grows_the_cluster_for_engine_actors_and_shrinks_it_back(tiny_teacher, tmp_path):
    """A head with no GPU, a run asking for two 1-GPU engine actors: the autoscaler adds two GPU
    workers, the run finishes on them, and idle workers are removed again."""
    import threading

    import ray

    from cousins.orchestrate.pipeline import run_generate

    temp_dir = tempfile.mkdtemp(prefix="cas", dir="/tmp")
    gcs = free_port()
    config = Path(temp_dir) / "autoscaling.json"
    config.write_text(json.dumps(_fake_autoscaling_config(gcs, max_workers=2)))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           f"--autoscaling-config={config}", "--dashboard-host=127.0.0.1", f"--dashboard-port={free_port()}",
           f"--ray-client-server-port={free_port()}", "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}",
           "--disable-usage-stats", "--object-store-memory=268435456",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    t0 = time.monotonic()
    seen: list[tuple[float, int]] = []
    stop = threading.Event()

    def alive() -> int:
        return sum(1 for n in ray.nodes() if n["Alive"])

    def watch():
        while not stop.is_set():
            seen.append((time.monotonic() - t0, alive()))
            stop.wait(1.0)

    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
        ray.init(address=f"127.0.0.1:{gcs}")
        before = alive()
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        cfg = resolve_paths(to_config(compose(
            f"model.path={tiny_teacher}", f"storage.root={tmp_path}", "run=greedy", "corpus.limit=24",
            "run.sampling.max_tokens=16", "engine.batch_size=4", "engine.num_actors=2", "engine.gpus_per_actor=1",
            "engine.cpus_per_actor=1", "run.run_id=autoscaled")))
        validate(cfg)
        result = run_generate(cfg)
        done_at = time.monotonic() - t0
        assert result.models[0].rows == 24 and result.models[0].error_rows == 0
        out = RunLayout(resolve(str(tmp_path)), "autoscaled").generations("tiny-teacher")
        nodes = Counter(pads.dataset(part_files(out), format="parquet").to_table(
            columns=["engine_node"]).column("engine_node").to_pylist())
        head = ray.get_runtime_context().get_node_id()
        assert head not in nodes and len(nodes) == 2, nodes  # both engines ran on added GPU workers
        deadline = time.monotonic() + 120
        while alive() > before and time.monotonic() < deadline:
            time.sleep(2)
        stop.set()
        watcher.join(timeout=5)
        after, shrunk_at = alive(), time.monotonic() - t0
        peak = max(n for _, n in seen)
        grew_at = next(t for t, n in seen if n == peak)
        assert before == 1 and peak == 3 and after == 1, seen
        print(f"\n[autoscaler] nodes before {before}, peak {peak} at {grew_at:.0f}s, run done at {done_at:.0f}s, "
              f"back to {after} at {shrunk_at:.0f}s; rows per worker {sorted(nodes.values())}")
    finally:
        stop.set()
        ray.shutdown()
        stop_processes_of(temp_dir)  # the head and every node it launched, by process id
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved
        assert not _pids_of(temp_dir), "processes of the fake cluster survived"


@pytest.fixture(scope="module")
def two_nodes():
    """A two-node cluster in this process (ray.cluster_utils), started once for the module's tests
    that need one: two nodes of 2 CPUs and one (logical) GPU each, told apart by a custom resource."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 1, "resources": {"node_a": 1}, "object_store_memory": 256 << 20})
    cluster.add_node(num_cpus=2, num_gpus=1, resources={"node_b": 1}, object_store_memory=256 << 20)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def on_two_nodes(two_nodes):
    """This process connected to the two-node cluster (the fake engine importable on every worker)."""
    import ray

    ray.init(address=two_nodes.address, runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}})
    try:
        yield two_nodes
    finally:
        ray.shutdown()


def test_two_node_cluster_spreads_engines_and_matches_one_node(on_two_nodes, tiny_teacher, tmp_path):
    import ray

    from cousins.orchestrate.pipeline import run_generate

    t0 = time.monotonic()
    nodes = {n["NodeID"]: ("node_a" if "node_a" in n["Resources"] else "node_b")
             for n in ray.nodes() if n["Alive"]}
    assert sorted(nodes.values()) == ["node_a", "node_b"]

    def run(run_id: str, actors: int):
        cfg = resolve_paths(to_config(compose(
            f"model.path={tiny_teacher}", f"storage.root={tmp_path}", "run=greedy", "corpus.limit=32",
            "run.sampling.max_tokens=16", "engine.batch_size=4", f"engine.num_actors={actors}",
            "engine.gpus_per_actor=1", "engine.cpus_per_actor=0.5", f"run.run_id={run_id}")))
        validate(cfg)
        run_generate(cfg)
        out = RunLayout(resolve(str(tmp_path)), run_id).generations("tiny-teacher")
        t = pads.dataset(part_files(out), format="parquet").to_table(
            columns=["prompt_id", "output_token_ids", "engine_node"])
        return {r["prompt_id"]: r for r in t.to_pylist()}

    two = run("two-nodes", 2)
    split = Counter(nodes[r["engine_node"]] for r in two.values())
    one = run("one-node", 1)
    assert len(two) == len(one) == 32
    assert set(split) == {"node_a", "node_b"}, split  # engine actors ran on both nodes
    assert len({r["engine_node"] for r in one.values()}) == 1
    assert {k: r["output_token_ids"] for k, r in two.items()} == {k: r["output_token_ids"] for k, r in one.items()}
    print(f"\n[two nodes] rows per node {dict(split)}; greedy outputs equal the one-actor run's; "
          f"{time.monotonic() - t0:.0f}s")


def test_the_diff_spreads_over_two_nodes_and_equals_a_one_node_diff(on_two_nodes, tmp_path, monkeypatch):
    """A drift run (fake engines, no vLLM) on a two-node cluster: its drift rows are computed on
    both nodes; recomputing the diff on one node (a local one-node Ray) gives the same rows."""
    import ray

    import cousins.drift.rows

    monkeypatch.setattr(cousins.drift.rows, "SMALL_DIFF_ROWS", 0)  # partitioned, though the run is small

    from cousins.drift.diff import recompute
    from cousins.drift.summary import BootstrapSpec
    from cousins.orchestrate.pipeline import run_drift
    from cousins.contract.records import DriftDone
    from cousins.run.lifecycle import committed, read_marker
    from fake_engine import FakeBackend

    cfg = resolve_paths(to_config(compose(
        f"model.path={tmp_path / 'teacher'}", f"storage.root={tmp_path / 'out'}", "run=greedy", "corpus.limit=48",
        "run.sampling.max_tokens=8", "engine.batch_size=16", "engine.cpus_per_actor=0.5", "run.run_id=diff-2n",
        "drift.bootstrap=20", "drift.noise_floor=false", "cousins=none", f"+cousins.q={{kind:quantized,path:'{tmp_path / 'q'}'}}",
        config_name="drift")))
    d = cfg.drift
    spec = BootstrapSpec.of(d)
    drift = {}
    result, _ = run_drift(cfg, backend=FakeBackend())
    for nodes in (2, 1):
        if nodes == 1:
            ray.shutdown()  # off the two-node cluster, onto a one-node Ray of its own
            ray.init(address="local", num_cpus=2, object_store_memory=256 << 20, include_dashboard=False,
                     runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}})
        try:
            if nodes == 1:
                recompute(resolve(cfg.storage.root), result.run_id, bootstrap=spec, rule=Rule(d.answer_match),
                          worst_n=d.worst_n)
            run = committed(resolve(cfg.storage.root), result.run_id)
            stage = run.layout.drift("q")
            marker = read_marker(stage, DriftDone)
            assert marker.rows == 48 and len(marker.nodes) == nodes, marker  # computed on every node
            drift[nodes] = run.read(stage).sort_by([("prompt_id", "ascending"), ("sample_index", "ascending")])
        finally:
            if nodes == 1:
                ray.shutdown()  # (on_two_nodes' own shutdown is then a no-op)
    assert drift[2].equals(drift[1]) and drift[1].column("error").null_count == 48
