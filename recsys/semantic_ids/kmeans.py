"""k-means building blocks shared by RQ-VAE codebook init and hierarchical k-means.

Every function is pure (numpy in, numpy out) and picklable by reference, so a Ray task can
run any of them on a block of data. faiss does the clustering: on one node it is 40-100x
faster than Lloyd steps orchestrated by Ray (docs RAY-NOTES.md), so Ray only fans out
independent subtrees and, for data that does not fit one machine, assigns/accumulates over
blocks (``assign_nearest`` + ``accumulate_centroids``).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from recsys.faiss_lib import faiss


def node_seed(seed: int, path: tuple[int, ...]) -> int:
    """A faiss seed derived from (seed, node path) only, never from traversal order, so a
    subtree clusters identically in whatever process or order it runs."""
    digest = hashlib.blake2b(repr((int(seed), tuple(int(p) for p in path))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF  # faiss takes a C int


def assign_nearest(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (n, D), centroids (k, D) -> (labels (n,) int64, squared distances (n,) float32)."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    dist, labels = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)  # (n, 1) each
    return labels[:, 0].astype(np.int64), dist[:, 0]


def faiss_kmeans(x: np.ndarray, k: int, *, niter: int, seed: int,
                 max_points_per_centroid: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cluster x (n, D) into k <= n centroids -> (centroids (k, D) float32, labels (n,) int64).

    ``max_points_per_centroid=0`` trains on all n points; faiss's own default (256) trains on
    a sample of only 256 * k points. Labels are the nearest final centroid, so they agree with
    a later greedy descent through the same centroids.
    """
    n, dim = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= n points, got k={k}, n={n}")
    mppc = max_points_per_centroid or math.ceil(n / k)
    km = faiss.Kmeans(dim, k, niter=niter, seed=seed, verbose=False,
                      max_points_per_centroid=mppc, min_points_per_centroid=1)  # 1: no small-n warnings
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)  # (k, D)
    return centroids, assign_nearest(x, centroids)[0]


def accumulate_centroids(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums (k, D) float64 and counts (k,) int64 of one block; add these over
    blocks and divide to run a Lloyd update on data that does not fit one process."""
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, x.astype(np.float64))
    return sums, np.bincount(labels, minlength=k).astype(np.int64)


def mean_centroids(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Member means (k, D) float32; an empty cluster's row is NaN (callers drop empties)."""
    sums, counts = accumulate_centroids(x, labels, k)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / counts[:, None]).astype(np.float32)


def balanced_assign(x: np.ndarray, centroids: np.ndarray, n_candidates: int = 16) -> np.ndarray:
    """Capacity-constrained greedy assignment -> labels (n,); no cluster exceeds ceil(n / k).

    EAGER's released code uses constrained k-means; this is the simple greedy version: visit
    all (item, candidate-centroid) pairs in increasing distance (ties by item, then centroid)
    and give each item the first centroid that still has room. Only each item's
    ``n_candidates`` nearest centroids are visited, which bounds memory at n * n_candidates;
    the few items left over take their nearest centroid with room. O(n * n_candidates) Python
    steps: fine per node, slow for millions of points at the top level.
    """
    n, k = len(x), len(centroids)
    capacity = math.ceil(n / k)
    m = min(k, n_candidates)
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    dist, cand = index.search(np.ascontiguousarray(x, dtype=np.float32), m)  # (n, m) each
    items = np.repeat(np.arange(n), m)
    order = np.lexsort((cand.ravel(), items, dist.ravel()))  # by distance, then item, then centroid
    labels = np.full(n, -1, dtype=np.int64)
    load = np.zeros(k, dtype=np.int64)
    remaining = n
    for item, cluster in zip(items[order].tolist(), cand.ravel()[order].tolist()):
        if labels[item] < 0 and load[cluster] < capacity:
            labels[item] = cluster
            load[cluster] += 1
            remaining -= 1
            if remaining == 0:
                break
    for item in np.flatnonzero(labels < 0).tolist():  # every candidate was full
        d = ((centroids - x[item]) ** 2).sum(axis=1)  # (k,)
        d[load >= capacity] = np.inf
        labels[item] = int(np.argmin(d))
        load[labels[item]] += 1
    return labels
