"""Start or join Ray. On a cluster (``RAY_ADDRESS`` set, e.g. inside a Ray Job) connect to it;
otherwise start a local instance sized for a small machine."""

from __future__ import annotations

import os
import socket
import sys
from urllib.parse import urlsplit

from recsys.execution import ClusterView

QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_LOG_LEVEL": "WARNING", "RAY_TRAIN_V2_ENABLED": "1"}


def init_ray(num_cpus: int | None = None, object_store_bytes: int = 1 << 30) -> None:
    """Idempotent. Caps the local object store (Ray's default would take ~7.5 GB of /dev/shm)."""
    import ray

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


def cluster_view() -> ClusterView:
    """What ``recsys.execution.choose_path`` needs to know, without starting Ray for nothing:

    - Ray already running in this process: count its alive nodes;
    - ``RAY_ADDRESS`` naming another machine: a cluster (not contacted here);
    - ``RAY_ADDRESS`` naming this machine (``auto``, a local address, inside a Ray Job on the
      head): connect, as any later stage would, and count the nodes;
    - otherwise no Ray at all: this machine alone.
    """
    address = os.environ.get("RAY_ADDRESS", "").strip()
    running = ray_running()
    if address and not running and not is_local_address(address):
        return ClusterView(remote_address=address)
    if address and not running:
        init_ray()
    elif not running:
        return ClusterView()
    import ray

    remote = address if address and not is_local_address(address) else ""
    return ClusterView(nodes=sum(1 for node in ray.nodes() if node.get("Alive")), remote_address=remote)


def ray_running() -> bool:
    """Ray is initialised in this process (never imports Ray: importing it costs about a second)."""
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def is_local_address(address: str) -> bool:
    """Whether a Ray address (``auto``, ``host:port``, ``ray://host:port``, ``http://host:port``)
    names this machine: its host resolves to an address a socket here can bind to."""
    if address == "auto":
        return True
    host = urlsplit(address if "://" in address else f"//{address}").hostname or ""
    if host in ("", "localhost"):
        return True
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_UDP)
    except OSError:
        return False
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.bind((sockaddr[0], 0))
            return True
        except OSError:
            continue
    return False
