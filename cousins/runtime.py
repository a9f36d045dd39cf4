"""Connecting to Ray: a cluster when one is named (or RAY_ADDRESS is set by `ray job submit`),
otherwise a fresh local Ray owned by this process."""

from __future__ import annotations

import os

from cousins.config import RayConfig


# Storage credentials and endpoints reach every worker through the job's runtime environment,
# never through the config, the manifest or the logs.
FORWARDED_ENV_PREFIXES = ("AWS_", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_", "HF_HUB_OFFLINE")


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


def init_ray(rc: RayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    runtime_env = {"env_vars": forwarded_env()}
    address = rc.address or os.environ.get("RAY_ADDRESS")
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # A driver started by `ray job submit` / `cousins submit`: the job's runtime env already
        # carries the working dir and the credentials, and Ray refuses a second one beside it.
        ray.init(address=address)
        return
    if address:
        ray.init(address=address, runtime_env=runtime_env)
        return
    # address="local" never attaches to a cluster some other process left running.
    ray.init(
        address="local",
        num_cpus=rc.num_cpus,
        object_store_memory=int(rc.object_store_gib * (1 << 30)) if rc.object_store_gib else None,
        include_dashboard=False,
        runtime_env=runtime_env,
    )


def root_cause(e: BaseException) -> str:
    """The innermost error of a chain (Ray wraps task errors), as one line: 'Type: message'."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None) or e.__cause__
        if not isinstance(inner, BaseException):
            break
        e = inner
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"
