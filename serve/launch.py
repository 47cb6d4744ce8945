"""Start the application on a running Ray instance and keep it up (``recsys serve``).

The endpoint binds to 127.0.0.1 unless a host is given; any other host is reachable from other
machines, so it is said out loud (and an API key is advised).
"""

from __future__ import annotations

import signal
import sys
import time
from contextlib import contextmanager
from typing import Callable

from ray import serve

from serve.app import build_app

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def exposure_warning(host: str, api_key_env: str | None) -> str | None:
    """The warning for a host that is not the loopback interface, else None."""
    if host in LOCAL_HOSTS:
        return None
    advice = "" if api_key_env else " Set an API key (--api-key-env) before exposing it."
    return (f"warning: binding to {host}: the endpoint is reachable from other machines, not only this one."
            f"{advice}")


def prepare(args: dict, host: str = "127.0.0.1") -> serve.Application:
    """Build the app from ``args`` (``ServeArgs``): the run directory and the arguments are checked
    here, before Ray starts. Warns on stderr when ``host`` is not the loopback interface."""
    app = build_app(args)
    warning = exposure_warning(host, args.get("api_key_env"))
    if warning:
        print(warning, file=sys.stderr)
    return app


def start(app: serve.Application, host: str = "127.0.0.1", port: int = 8000, name: str = "retriever",
          logging_config: dict | None = None) -> str:
    """Start Serve's HTTP proxy on host:port and run ``app``; returns the base URL once the app is
    ready. Initialise Ray first (``pipelines.ray_env.init_ray``), or Serve starts it with defaults.
    ``logging_config``: Serve's ``LoggingConfig`` for its controller, proxy and the app's replicas
    (None: Serve's default, INFO with an access log line per request)."""
    serve.start(http_options={"host": host, "port": port}, logging_config=logging_config)
    serve.run(app, name=name, route_prefix="/", blocking=False, logging_config=logging_config)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}"


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; `kill`, `docker stop`, a Kubernetes pod's end


@contextmanager
def stop_signals_interrupt():
    """While serving, SIGINT and SIGTERM raise KeyboardInterrupt, whatever this process inherited: a
    command started in the background by a non-interactive shell (`recsys serve ... &` in a script)
    ignores SIGINT, and Python then installs no Ctrl-C handler at all (2026-12-07: such a `recsys
    serve` never stopped on SIGINT); SIGTERM would otherwise end the process without shutting Serve
    down, which leaves the app deployed on a cluster that RAY_ADDRESS named. The previous handlers
    come back after."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, interrupt) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def serve_until_interrupted(app: serve.Application, host: str, port: int, on_ready: Callable[[str], None]) -> None:
    """``start`` the app, call ``on_ready(url)``, and keep the process (and with it a local Ray
    instance) alive until Ctrl-C or SIGTERM, which shut Serve down, also while the app is still
    starting."""
    with stop_signals_interrupt():
        try:
            on_ready(start(app, host, port))
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            print("interrupted: shutting Serve down", file=sys.stderr, flush=True)
            serve.shutdown()
