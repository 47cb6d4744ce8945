"""Where a stage runs: in this process, or on Ray.

Each stage with a Ray path (embed, ids) has a ``use_ray`` key: ``true`` and ``false`` force a
path, ``auto`` (the default) decides here, from what Ray would add:

- On a cluster (more than one alive Ray node, or ``RAY_ADDRESS`` naming another machine) Ray
  spreads the work over nodes the in-process path cannot reach: Ray.
- A configuration that only Ray can run (hierarchical k-means with ``ids.hkmeans_top=blocks``
  reads its table block by block from Ray Data): Ray.
- On one node the in-process path already uses every core (torch's and faiss's threads), so Ray
  runs the same kernels on the same cores and adds its start-up (ray.init, worker processes, a
  model load per actor, a Ray Train worker group) and per-task or per-epoch overhead. Measured on
  this 2-core machine: Beauty's 12k-item embedding, its k-means and an RQ-VAE on 500 vectors all
  run faster in-process (docs/experiments/ray-paths.md). In-process.

The decision is pure (``choose_path``); ``pipelines.ray_env.cluster_view`` looks at the cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

from recsys.config import require

USE_RAY_CHOICES = ("auto", True, False)


def check_use_ray(key: str, value: object) -> None:
    """``value`` must be auto, true or false (1 and 0 are refused: YAML spells booleans)."""
    require(isinstance(value, bool) or value == "auto",
            f"{key}={value!r} is not allowed; choose auto, true or false")


@dataclass(frozen=True)
class ClusterView:
    """What a stage knows about Ray before choosing: alive nodes (0 = Ray is not running in this
    process and none was asked for) and whether ``RAY_ADDRESS`` names another machine."""

    nodes: int = 0
    remote_address: str = ""

    @property
    def is_cluster(self) -> bool:
        return self.nodes > 1 or bool(self.remote_address)

    def describe(self) -> str:
        if self.remote_address:
            return f"the Ray cluster at {self.remote_address}"
        return f"a Ray cluster of {self.nodes} nodes"


@dataclass(frozen=True)
class Placement:
    """The chosen path and why, in words a log line can carry."""

    use_ray: bool
    reason: str

    def line(self, stage: str) -> str:
        return f"{stage}: {'on Ray' if self.use_ray else 'in-process'} ({self.reason})"


def choose_path(key: str, setting: bool | str, cluster: ClusterView, work: str,
                ray_only: str = "") -> Placement:
    """Decide where a stage runs.

    key: the config key that forces a path (named in the reason); setting: its value.
    work: the stage's work in words (e.g. "12101 texts"). ray_only: why this configuration has
    no in-process path ("" when it has one); with ``setting=False`` that is a ValueError.
    """
    check_use_ray(key, setting)
    if setting is False:
        require(not ray_only, f"{key}=false, but {ray_only}; set {key}=auto or true")
        return Placement(False, f"{key}=false")
    if setting is True:
        return Placement(True, f"{key}=true")
    if ray_only:
        return Placement(True, f"auto: {ray_only}")
    if cluster.is_cluster:
        return Placement(True, f"auto: {cluster.describe()}; {key}=false keeps it in this process")
    return Placement(False, f"auto: one node, {work}; Ray would run the same work on the same cores plus its "
                            f"start-up and per-task overhead; {key}=true forces Ray")
