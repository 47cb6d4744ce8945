"""Hierarchical clustering of one user's whole history into virtual items, after TWIN-V2
(Si et al., CIKM 2024), arXiv:2407.16357.

TWIN-V2 groups a user's behaviours by engagement (play completion), then clusters each group's
item embeddings recursively with k-means until every cluster holds at most gamma items. Each
cluster becomes a *virtual item*: the mean of its members' numeric features and embeddings, plus
the categorical features of the member nearest the centroid; its size n enters the ranker's
attention as ln n.

Grouping. Our datasets have no engagement signal (no play completion, no ratings we trust, no
repeats), so the only grouping signal is recency. ``bands`` splits the history into that many
contiguous, equal-length recency bands (oldest first) and clusters each band on its own, so a
cluster never mixes behaviours from distant periods. The default, and what ships, is
``bands=1`` (no grouping), because:
- recency already reaches the ranker twice: every virtual item carries its members' mean
  position (a cross feature of TWIN-V2's relevance), and a separate short-term attention reads
  the last 20 items raw;
- bands defined as fractions of the history move with every appended event, so an incremental
  update (a new event joins its nearest cluster) could not keep a banded clustering consistent
  without re-clustering the whole history;
- without an engagement signal, the grouping's purpose in the paper (never let a skipped play
  and a completed play share a cluster) has nothing to act on.
``bands > 1`` stays available for experiments.

Splitting. A group of n > gamma items is clustered into k = min(ceil(n / gamma), 16) clusters by
seeded k-means++ and Lloyd steps in numpy; each cluster still above gamma is split again. The
branching cap keeps each level at O(n * 16 * D), so 10^5-event histories stay cheap without
faiss. If k-means cannot separate a group (e.g. all its vectors are equal), the group is cut
into ceil(n / gamma) contiguous runs of positions instead: when every member looks the same,
recency is the only remaining distinction. Seeds derive from (seed, band, node path), never from
traversal order, so the result is a pure function of the inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_BRANCHING = 16  # children per k-means split; deeper trees instead of wider ones
LLOYD_STEPS = 20


@dataclass(frozen=True)
class VirtualItems:
    """One row per cluster, C clusters, ordered by each cluster's oldest member."""

    item: np.ndarray  # (C,) int64: the member nearest the cluster's centroid (its categorical features stand for it)
    size: np.ndarray  # (C,) int64: members per cluster, n
    vector: np.ndarray  # (C, D) float32: mean of the members' embeddings
    position: np.ndarray  # (C,) float32: mean position of the members in the history (0 = oldest)
    members: np.ndarray  # (L,) int64: cluster index of each history event

    @property
    def compression(self) -> float:
        """History length / number of clusters (1.0 for an empty history)."""
        return len(self.members) / len(self.item) if len(self.item) else 1.0


def cluster_history(items: np.ndarray, vectors: np.ndarray, gamma: int, *, bands: int = 1,
                    seed: int = 0) -> VirtualItems:
    """Cluster a history of L events into virtual items of at most ``gamma`` members each.

    items: (L,) item ids, oldest first; vectors: (L, D) the events' item embeddings.
    Returns ``VirtualItems`` (see the class). Raises ValueError naming ``history.gamma`` or
    ``history.bands`` for bad settings, and saying what is wrong with bad inputs.
    """
    if isinstance(gamma, bool) or not isinstance(gamma, (int, np.integer)) or gamma < 2:
        raise ValueError(f"history.gamma must be an integer >= 2 (a cluster of at most gamma items), got {gamma!r}")
    if isinstance(bands, bool) or not isinstance(bands, (int, np.integer)) or bands < 1:
        raise ValueError(f"history.bands must be an integer >= 1 (1 = no recency grouping), got {bands!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"history.seed must be an integer >= 0, got {seed!r}")
    items = np.asarray(items)
    vectors = np.asarray(vectors)
    if items.ndim != 1 or not np.issubdtype(items.dtype, np.integer):
        raise ValueError(f"history items must be a 1-D integer array, got shape {items.shape} dtype {items.dtype}")
    if vectors.ndim != 2 or len(vectors) != len(items):
        raise ValueError(f"history vectors must be (L, D) with L = {len(items)} items, got shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError("history vectors hold NaN or infinite values")
    x = vectors.astype(np.float64)
    n_events = len(items)
    labels = np.full(n_events, -1, dtype=np.int64)
    n_clusters = 0
    for band, positions in enumerate(np.array_split(np.arange(n_events), min(bands, max(n_events, 1)))):
        for cluster in _split_group(x, positions, int(gamma), (int(seed), band)):
            labels[cluster] = n_clusters
            n_clusters += 1
    return _virtual_items(items.astype(np.int64), x, labels, n_clusters)


def _split_group(x: np.ndarray, positions: np.ndarray, gamma: int, root: tuple[int, ...]) -> list[np.ndarray]:
    """Positions of one group -> list of position arrays, each of at most gamma members."""
    done: list[np.ndarray] = []
    stack = [(positions, root)]
    while stack:
        members, path = stack.pop()
        if len(members) <= gamma:
            if len(members):
                done.append(members)
            continue
        k = min(math.ceil(len(members) / gamma), MAX_BRANCHING)
        child = kmeans_labels(x[members], k, np.random.default_rng(list(path)))
        parts = [members[child == c] for c in range(k)]
        parts = [p for p in parts if len(p)]
        if len(parts) < 2:  # k-means could not separate them: cut by recency
            parts = np.array_split(members, math.ceil(len(members) / gamma))
        stack.extend((part, path + (i,)) for i, part in enumerate(parts))
    return done


def kmeans_labels(x: np.ndarray, k: int, rng: np.random.Generator, steps: int = LLOYD_STEPS) -> np.ndarray:
    """k-means++ seeding and Lloyd steps on x (n, D) -> labels (n,) in [0, k); some may be unused."""
    n = len(x)
    centroids = [x[int(rng.integers(n))]]
    nearest = ((x - centroids[0]) ** 2).sum(axis=1)  # (n,)
    for _ in range(1, k):
        total = nearest.sum()
        if total <= 0:  # every point sits on a centroid already
            break
        pick = int(rng.choice(n, p=nearest / total))
        centroids.append(x[pick])
        nearest = np.minimum(nearest, ((x - x[pick]) ** 2).sum(axis=1))
    c = np.stack(centroids)  # (k', D)
    labels = np.zeros(n, dtype=np.int64)
    for step in range(steps):
        dist = (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None, :]  # (n, k')
        new = dist.argmin(axis=1)
        if step and np.array_equal(new, labels):
            break
        labels = new
        counts = np.bincount(labels, minlength=len(c))
        sums = np.zeros_like(c)
        np.add.at(sums, labels, x)
        keep = counts > 0  # an emptied centroid stays where it was
        c[keep] = sums[keep] / counts[keep, None]
    return labels


def _virtual_items(items: np.ndarray, x: np.ndarray, labels: np.ndarray, n_clusters: int) -> VirtualItems:
    # Order clusters by their oldest member, so the output does not depend on traversal order.
    first = np.full(n_clusters, len(labels), dtype=np.int64)
    np.minimum.at(first, labels, np.arange(len(labels)))
    rank = np.empty(n_clusters, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(n_clusters)
    labels = rank[labels] if n_clusters else labels
    size = np.bincount(labels, minlength=n_clusters).astype(np.int64)  # (C,)
    sums = np.zeros((n_clusters, x.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, x)
    mean = sums / np.maximum(size, 1)[:, None]  # (C, D)
    position = np.bincount(labels, weights=np.arange(len(labels), dtype=np.float64), minlength=n_clusters)
    position = position / np.maximum(size, 1)
    dist = ((x - mean[labels]) ** 2).sum(axis=1)  # (L,) each event to its own centroid
    order = np.lexsort((np.arange(len(labels)), dist, labels))  # by cluster, distance, then oldest first
    head = np.ones(len(order), dtype=bool)
    head[1:] = labels[order][1:] != labels[order][:-1]
    representative = items[order[head]]  # (C,) one per cluster, in cluster order
    return VirtualItems(item=representative.astype(np.int64), size=size, vector=mean.astype(np.float32),
                        position=position.astype(np.float32), members=labels.astype(np.int64))
