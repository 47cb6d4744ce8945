"""What ``recsys history`` computes for one user, without Ray: the cluster sets of the user's
whole history at every cutoff an example reads, and the settings that make them.

Leakage. A ranker's example reads the user's history *before its target*. The leave-one-out
split (``recsys.data.split``) gives a user with items s[0..n-1] three examples: test s[:n-1] ->
s[n-1], validation s[:n-2] -> s[n-2], and the ranker's training transition s[:n-3] -> s[n-3]
(``LeaveOneOutSplit.full_histories``). Each gets its own clustering, stored under its label with
its cutoff (n-1, n-2, n-3): clusters computed over the whole history would put the target itself,
and later events, into the virtual items of its own example. ``serve`` clusters all n events:
that is what a served request, which has no held-out target, reads and what appends update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from recsys.config import require, require_range
from recsys.history.clustering import cluster_history
from recsys.history.store import ClusterSet

# label -> how many of the user's last events its clustering leaves out (see the module docstring)
CUTOFFS = {"serve": 0, "test": 1, "valid": 2, "train": 3}


@dataclass
class HistoryConfig:
    """``history.*``: the clustering of ``recsys history`` and of the store's incremental updates."""

    gamma: int = 8  # the most items a cluster (virtual item) may hold; TWIN-V2's gamma
    bands: int = 1  # recency bands clustered apart (1 = none; see recsys.history.clustering)
    seed: int = 0
    use_ray: bool = True  # False clusters in this process (tests, small data)
    blocks: int = 8  # Ray Data blocks the users are spread over
    cpus_per_task: float = 0.5

    def __post_init__(self):
        require(not isinstance(self.gamma, bool) and isinstance(self.gamma, int) and self.gamma >= 2,
                f"history.gamma={self.gamma!r} is out of range; allowed: an integer >= 2 (a cluster of at most "
                "gamma items; 1 would keep every item alone, which is no clustering)")
        require_range("history.bands", self.bands, 1)
        require_range("history.seed", self.seed, 0)
        require_range("history.blocks", self.blocks, 1, 100_000)
        require_range("history.cpus_per_task", self.cpus_per_task, 0.01, 1024)


def user_cluster_sets(items: np.ndarray, vectors: np.ndarray, cfg: HistoryConfig) -> list[ClusterSet]:
    """One user's items (n,) in time order and the catalogue's content vectors (N, D), row i - 1
    for item i -> the cluster sets of every label whose cutoff leaves at least one event."""
    items = np.asarray(items, dtype=np.int64)
    sets = []
    for label, back in CUTOFFS.items():
        cutoff = len(items) - back
        if cutoff < 1 or (label != "serve" and len(items) < 3):  # too short for the split: serve only
            continue
        prefix = items[:cutoff]
        clusters = cluster_history(prefix, vectors[prefix - 1], cfg.gamma, bands=cfg.bands, seed=cfg.seed)
        sets.append(ClusterSet(label, cutoff, cfg.gamma, clusters))
    return sets


class Compression(NamedTuple):
    """History length against clusters, over the serve sets of many users."""

    users: int
    events: int
    clusters: int
    ratio: float  # events / clusters, over all users
    mean_user_ratio: float  # the mean of each user's events / clusters
    long_users: int  # users with more than ``long`` events
    long_ratio: float | None  # events / clusters over those users

    def as_dict(self) -> dict:
        return self._asdict()


def compression(lengths: np.ndarray, n_clusters: np.ndarray, long: int = 20) -> Compression:
    """Per-user history lengths (U,) and cluster counts (U,) -> their compression figures."""
    lengths, n_clusters = np.asarray(lengths, dtype=np.float64), np.asarray(n_clusters, dtype=np.float64)
    if len(lengths) == 0:
        return Compression(0, 0, 0, 1.0, 1.0, 0, None)
    is_long = lengths > long
    return Compression(
        users=len(lengths), events=int(lengths.sum()), clusters=int(n_clusters.sum()),
        ratio=round(float(lengths.sum() / n_clusters.sum()), 4),
        mean_user_ratio=round(float((lengths / n_clusters).mean()), 4),
        long_users=int(is_long.sum()),
        long_ratio=round(float(lengths[is_long].sum() / n_clusters[is_long].sum()), 4) if is_long.any() else None)
