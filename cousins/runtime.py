"""Connecting to Ray: a cluster when one is named (or RAY_ADDRESS is set by `ray job submit`),
otherwise a fresh local Ray owned by this process."""

from __future__ import annotations

import os

from cousins.config import RayConfig


def init_ray(rc: RayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    address = rc.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # address="local" never attaches to a cluster some other process left running.
    ray.init(
        address="local",
        num_cpus=rc.num_cpus,
        object_store_memory=int(rc.object_store_gib * (1 << 30)) if rc.object_store_gib else None,
        include_dashboard=False,
    )
