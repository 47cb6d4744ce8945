"""Start or join Ray. On a cluster (``RAY_ADDRESS`` set, e.g. inside a Ray Job) connect to it;
otherwise start a local instance sized for a small machine.

A healthy local run prints no warning or error lines. Each measure below removes the cause of one
line Ray would otherwise print, or (the auth notice) drops that one line by its text; levels are
left alone (``RAY_BACKEND_LOG_LEVEL`` is untouched), so real warnings and errors still show:
- ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0`` (local only): Ray Train V2 starts a watcher actor per
  fit that polls for node drains (spot preemption). Its constructor takes the worker actors' handles
  and it restarts forever, which makes Ray's core worker log an error-level line for every fit
  ("has constructor arguments in the object store and max_restarts > 0", ray-project/ray#53727).
  A single local node has no drains to watch; on a cluster the watcher stays on.
- Token auth: Ray 2.59+ turns it on for a new local instance and says so in a warning ("Token
  authentication is enabled ... Set RAY_AUTH_MODE=disabled to opt out"). Token auth is this
  project's choice too (cluster.yaml, README), so that notice is dropped. Setting
  ``RAY_AUTH_MODE=token`` here instead would not work: Ray reads the mode when it is imported, and a
  mode set after that makes ``ray.init`` fail to authenticate to its own GCS.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from urllib.parse import urlsplit

from recsys.execution import ClusterView

QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_LOG_LEVEL": "WARNING", "RAY_TRAIN_V2_ENABLED": "1"}
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
AUTH_NOTICE = "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


class DropAuthNotice(logging.Filter):
    """Drops Ray's notice that it chose token auth for a local instance; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(AUTH_NOTICE)


def quiet_auth_notice() -> None:
    """Idempotent: one filter on the logger that announces the default."""
    log = logging.getLogger(AUTH_LOGGER)
    if not any(isinstance(f, DropAuthNotice) for f in log.filters):
        log.addFilter(DropAuthNotice())


def on_cluster() -> bool:
    """True when this process joins an existing cluster (``RAY_ADDRESS``, as inside a Ray Job)."""
    return bool(os.environ.get("RAY_ADDRESS"))


def init_ray(num_cpus: int | None = None, object_store_bytes: int = 1 << 30) -> None:
    """Idempotent. Caps the local object store (Ray's default would take ~7.5 GB of /dev/shm)."""
    import ray

    for key, value in {**QUIET_ENV, **({} if on_cluster() else LOCAL_ENV)}.items():
        os.environ.setdefault(key, value)  # a value the user set wins
    if ray.is_initialized():
        return
    if on_cluster():
        ray.init(log_to_driver=True)
        return
    quiet_auth_notice()
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
