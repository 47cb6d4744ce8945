"""Keep a user's virtual items current as events arrive, without re-clustering the history.

A new event's item joins the cluster whose centroid is nearest to its vector: the cluster's size
grows by one, its mean vector and mean position move by a running mean, and its representative
item becomes again the member nearest the new centroid. A cluster that grows past gamma is split
by ``cluster_history`` over its own members, so every cluster stays at most gamma. The work per
event is O(C * D) to find the cluster plus O(gamma * D) for the cluster it joins (a split:
k-means over gamma + 1 members), whatever the history's length.

Cluster order: ``cluster_history`` orders clusters by their oldest member. Here a split's first
part keeps the split cluster's index and its other parts are appended at the end, so the indices
of all other clusters never move. Nothing downstream reads the order (attention is permutation
invariant; each cluster carries its mean position).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from recsys.history.clustering import VirtualItems, cluster_history


def add_event(clusters: VirtualItems, history: np.ndarray, vector: np.ndarray, gamma: int,
              vectors_of: Callable[[np.ndarray], np.ndarray], seed: int = 0) -> VirtualItems:
    """``clusters`` of ``history[:-1]`` -> the clusters of ``history`` (L,), whose last item is
    the new event with content ``vector`` (D,). ``vectors_of(items) -> (n, D)`` gives member
    vectors (only the joined cluster's are read).

    For speed on long histories the joined cluster's row is updated in place in the arrays of
    ``clusters`` (no copy of the (C, D) vectors per event): keep using the returned value only."""
    position = len(history) - 1
    if len(clusters.members) != position:
        raise ValueError(f"clusters cover {len(clusters.members)} events but the history before the new event "
                         f"holds {position}")
    if len(clusters.item) == 0:
        return cluster_history(history, vectors_of(history), gamma, seed=seed)
    vec = clusters.vector  # (C, D) float32
    v = np.asarray(vector, dtype=vec.dtype)
    dist = np.einsum("ij,ij->i", vec, vec) - 2 * (vec @ v)  # (C,) squared distance less ||v||^2
    c = int(dist.argmin())
    n = int(clusters.size[c])
    clusters.size[c] = n + 1
    vec[c] = (vec[c].astype(np.float64) * n + v) / (n + 1)
    clusters.position[c] = (float(clusters.position[c]) * n + position) / (n + 1)
    members = np.append(clusters.members, c)  # (L,)
    rows = np.flatnonzero(members == c)
    x = vectors_of(history[rows]).astype(np.float64)  # (n + 1, D)
    clusters.item[c] = history[rows[int(((x - vec[c]) ** 2).sum(axis=1).argmin())]]
    grown = VirtualItems(item=clusters.item, size=clusters.size, vector=vec, position=clusters.position,
                         members=members)
    return grown if n + 1 <= gamma else _split(grown, c, rows, history, x, gamma, seed)


def _split(clusters: VirtualItems, c: int, rows: np.ndarray, history: np.ndarray, x: np.ndarray, gamma: int,
           seed: int) -> VirtualItems:
    """Replace cluster ``c`` (its events at ``rows``, vectors ``x``) by its own clustering."""
    parts = cluster_history(history[rows], x, gamma, seed=seed)  # members indexed 0..len(rows)-1
    base = len(clusters.item)
    new_index = np.array([c] + list(range(base, base + len(parts.item) - 1)), dtype=np.int64)
    members = clusters.members.copy()
    members[rows] = new_index[parts.members]
    keep = lambda old, new: np.concatenate([old[:c], new[:1], old[c + 1:], new[1:]])  # noqa: E731
    return VirtualItems(item=keep(clusters.item, parts.item), size=keep(clusters.size, parts.size),
                        vector=keep(clusters.vector, parts.vector).astype(np.float32),
                        position=keep(clusters.position, _positions(rows, parts)).astype(np.float32),
                        members=members)


def _positions(rows: np.ndarray, parts: VirtualItems) -> np.ndarray:
    """Mean history position per part (``parts.position`` counts within ``rows``)."""
    return (np.bincount(parts.members, weights=rows.astype(np.float64), minlength=len(parts.item))
            / parts.size).astype(np.float32)
