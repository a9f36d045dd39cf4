"""Shared fixtures. The tiny teacher is built once per machine into models/ (as the demo does);
Ray is started once per test module that asks for it, on a fresh local instance."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_TEACHER = ROOT / "models" / "tiny-teacher"


@pytest.fixture(scope="session")
def tiny_teacher() -> str:
    from cousins.models import ensure_model

    ensure_model(str(TINY_TEACHER), "tiny-teacher", 0)
    return str(TINY_TEACHER)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    # address="local": never attach to a cluster some other process left running.
    ray.init(address="local", num_cpus=2, object_store_memory=512 << 20, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_config(tiny_teacher, tmp_path):
    """A composed, validated job config on the tiny teacher and the demo corpus, writing to tmp_path."""

    def make(*overrides: str):
        from cousins.config import resolve_paths, to_config, validate

        cfg = resolve_paths(to_config(compose(
            f"model.path={tiny_teacher}", f"storage.root={tmp_path / 'out'}", *overrides)))
        validate(cfg)
        return cfg

    return make


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import cousins.config  # noqa: F401 - registers the structured config

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return hydra_compose(config_name="generate", overrides=list(overrides))


os.environ.setdefault("RAY_DEDUP_LOGS", "0")
