"""Shared fixtures. The tiny teacher is built once per machine into models/ (as the demo does).
One local Ray serves every test module that asks for `ray_local`; modules with a Ray of their own ask
for `own_ray`."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

from cousins.bench.vllm_server import free_port  # noqa: F401 - the tests' ports (servers they start)

ROOT = Path(__file__).resolve().parent.parent
TINY_TEACHER = ROOT / "models" / "tiny-teacher"


def cuda_gpus() -> int:
    """CUDA GPUs this machine has (0 without torch's CUDA build or a driver)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


# The longest test files (their module fixtures start engines, servers and clusters), longest
# first: `make test`'s processes take whole files in collection order (--dist loadfile), so these
# start at once and the short files fill the gaps, instead of a long one starting last.
SLOW_FILES = ["test_drift_vllm.py", "test_faults.py", "test_cluster.py", "test_realistic.py", "test_generate.py",
              "test_named_models_vllm.py", "test_benchmark.py", "test_engine_vllm.py", "test_placement.py",
              "test_pipeline.py", "test_schedule.py", "test_job.py"]


def pytest_collection_modifyitems(config, items):
    """Slow files first (SLOW_FILES; the sort is stable: a file's tests keep their order). Tests
    marked `gpu` are skipped without a CUDA GPU (scripts/gpu_check.sh runs them)."""
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
    gpu_tests = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_tests and cuda_gpus() == 0:
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_check.sh on a GPU machine)")
        for item in gpu_tests:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_teacher() -> str:
    from cousins.family.builds import ensure_model

    ensure_model(str(TINY_TEACHER), "tiny-teacher", 0)
    return str(TINY_TEACHER)


class SharedRay:
    """The suite's one local Ray, shared by the modules that ask for `ray_local` (starting a local
    Ray costs seconds; a module starting its own paid it again). A module that needs a Ray of its own
    (other resources, a cluster, its own environment) asks for `own_ray`, which stops this one first;
    the next module asking for `ray_local` starts it again. Only the Ray this object started is stopped."""

    def __init__(self):
        self.running = False

    def start(self):
        import ray

        if not self.running:
            if ray.is_initialized():  # a module that started its own Ray and did not ask for own_ray
                raise RuntimeError("a Ray this suite's ray_local did not start is still connected")
            # address="local": never attach to a cluster some other process left running.
            ray.init(address="local", num_cpus=2, object_store_memory=512 << 20, include_dashboard=False,
                     runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}})  # tests/fake_engine.py too
            self.running = True
        return ray

    def stop(self):
        if self.running:
            import ray

            ray.shutdown()
            self.running = False


SHARED_RAY = SharedRay()


@pytest.fixture(scope="session")
def shared_ray(s3_server):
    """It starts after the S3 test server, so Ray's workers see the server's endpoint and
    credentials in their environment, as a job's runtime env would give them; it stops first."""
    yield SHARED_RAY
    SHARED_RAY.stop()


@pytest.fixture(scope="module")
def ray_local(shared_ray):
    """A local Ray (2 CPUs, 512 MiB object store) for the module: the suite's shared one."""
    return shared_ray.start()


@pytest.fixture(scope="module")
def own_ray():
    """For a module whose tests start (and stop) a Ray of their own: the shared one is stopped first,
    since one process holds one Ray connection. (It needs nothing else: no S3 server.)"""
    SHARED_RAY.stop()


@pytest.fixture
def tiny_config(tiny_teacher, tmp_path):
    """A composed, validated job config on the tiny teacher and the demo corpus, writing to tmp_path."""

    def make(*overrides: str):
        from cousins.contract.config import resolve_paths, to_config
        from cousins.contract.validate import validate

        cfg = resolve_paths(to_config(compose(
            f"model.path={tiny_teacher}", f"storage.root={tmp_path / 'out'}", *overrides)))
        validate(cfg)
        return cfg

    return make


def compose(*overrides: str, config_name: str = "generate"):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import cousins.contract.config  # noqa: F401 - registers the structured config

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


class S3Server:
    """moto's S3 server on 127.0.0.1, in this process; stop() and start() keep its data and port."""

    def __init__(self):
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._cls = ThreadedMotoServer
        self.port = 0
        self.start()

    def start(self):
        self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.port = self.server.get_host_and_port()[1]

    def stop(self):
        """Gone for real: the listening socket is closed, so connections are refused (moto's own
        stop() leaves it bound, and clients would hang in its backlog instead)."""
        self.server.stop()
        self.server._server.server_close()

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "AKIDCOUSINSTEST", "AWS_SECRET_ACCESS_KEY": "cousins-test-secret-value",
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-speaking server for the suite; its endpoint and credentials are in os.environ
    while it lives, the way a user's shell would hold them."""
    server = S3Server()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Every Ray a test starts runs without token authentication, whatever ~/.ray holds: Ray keeps a
# process-wide view of the auth mode, and a test file that ran before (Serve) would otherwise leave
# it asking a later cluster (started with RAY_AUTH_MODE=disabled) for a token it never gets.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# An API key as a user's shell would hold it, before any Ray starts (its workers inherit it): the
# endpoint tests check that it reaches the server and no file of a run.
TEST_API_KEY_ENV, TEST_API_KEY = "COUSINS_TEST_API_KEY", "sk-cousins-test-key-never-written"
os.environ.setdefault(TEST_API_KEY_ENV, TEST_API_KEY)


@contextlib.contextmanager
def hide_context_proxies():
    """Start an in-process vLLM engine safely beside moto's Flask server.

    vLLM's CPU platform scans the globals of every loaded module for Triton kernels with
    `hasattr(value, "__dict__")`; a werkzeug LocalProxy (Flask's `request`, imported into this
    process by the S3 test server) raises RuntimeError outside a request instead of answering.
    Modules holding one are taken out of sys.modules while the engine starts, then put back.
    Engine actors in the product run in their own processes and never meet this."""
    try:
        from werkzeug.local import LocalProxy
    except ImportError:
        yield
        return
    hidden = {}
    for name, module in list(sys.modules.items()):
        namespace = getattr(module, "__dict__", None) or {}
        if any(type(v) is LocalProxy for v in list(namespace.values())):  # type(): never touches the proxy
            hidden[name] = sys.modules.pop(name)
    try:
        yield
    finally:
        sys.modules.update(hidden)


def at_once(actor, batches, timeout: float = 240, stagger_s: float = 0.0) -> list:
    """Each batch through `actor` in its own thread at once, as Ray Data's threads call an engine
    actor (started `stagger_s` apart, as batches arrive); the outputs in the batches' order."""
    import threading
    import time

    out: dict = {}
    threads = [threading.Thread(target=lambda i, t: out.__setitem__(i, actor(t)), args=(i, t))
               for i, t in enumerate(batches)]
    for t in threads:
        t.start()
        time.sleep(stagger_s)
    for t in threads:
        t.join(timeout=timeout)
    return [out[i] for i in range(len(batches))]
