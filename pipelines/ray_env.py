"""Start or join Ray. On a cluster (``RAY_ADDRESS`` set, e.g. inside a Ray Job) connect to it;
otherwise start a local instance sized for a small machine."""

from __future__ import annotations

import os

import ray

QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_LOG_LEVEL": "WARNING", "RAY_TRAIN_V2_ENABLED": "1"}


def init_ray(num_cpus: int | None = None, object_store_bytes: int = 1 << 30) -> None:
    """Idempotent. Caps the local object store (Ray's default would take ~7.5 GB of /dev/shm)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    # The dashboard stays on (bound to localhost): Ray Train's placement-group cleaner reads the
    # State API it serves, and without it logs a warning every few seconds and frees nothing.
    ray.init(num_cpus=num_cpus, object_store_memory=object_store_bytes, include_dashboard=True,
             dashboard_host="127.0.0.1", log_to_driver=True, logging_level="warning")
