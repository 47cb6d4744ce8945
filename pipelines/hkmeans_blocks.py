"""Hierarchical k-means over Ray Data blocks, for embedding tables too big for one machine.

The driver never holds the whole table:
1. faiss picks the top-level centroids on a sample that fits (``top_sample`` rows);
2. Lloyd steps refine them over the blocks: each block returns per-cluster sums and counts
   (``accumulate_centroids``), the driver adds them up and divides;
3. every block is labelled with its nearest top centroid, the rows are grouped by label, and
   each group (about 1/K of the data) is clustered by ``fit_subtree`` in its own task.
The tree differs from the in-process fit, whose top level runs faiss over all rows at once;
below the top level the two are the same algorithm with the same per-path seeds.
"""

from __future__ import annotations

import pickle
from functools import partial

import numpy as np
import ray

from recsys.semantic_ids import HierarchicalKMeans, HKMeansConfig, NodeSplit, SubtreeTask, assemble_tree, fit_subtree
from recsys.semantic_ids.kmeans import accumulate_centroids, assign_nearest, faiss_kmeans, node_seed


def _vectors_and_rows(batch: dict) -> dict:
    return {"row": batch["item_id"] - 1, "x": np.stack(batch["vector"]).astype(np.float32)}


def _partial_sums(batch: dict, centroids: np.ndarray) -> dict:
    labels, _ = assign_nearest(batch["x"], centroids)
    sums, counts = accumulate_centroids(batch["x"], labels, len(centroids))
    return {"sums": sums[None], "counts": counts[None]}


def _label(batch: dict, centroids: np.ndarray) -> dict:
    labels, _ = assign_nearest(batch["x"], centroids)
    return {**batch, "label": labels}


def _fit_group(group: dict, cfg: HKMeansConfig) -> dict:
    """All rows of one top cluster -> its subtree, pickled: a Ray Data column holds bytes, and
    these bytes are made and read by this job only, never taken from outside."""
    order = np.argsort(group["row"])
    rows, x = group["row"][order], group["x"][order]
    result = fit_subtree(SubtreeTask((int(group["label"][0]),), rows, x, cfg))
    singles = {}  # items alone in their leaf: a chain below a shallow leaf is centred on the item's vector
    for block in result.leaves:
        alone = block.items[np.bincount(block.codes)[block.codes] == 1]
        singles.update(zip(alone.tolist(), x[np.searchsorted(rows, alone)]))
    return {"label": group["label"][:1], "result": np.array([pickle.dumps((result, singles))], dtype=object)}


class _Rows:
    """The few rows ``assemble_tree`` reads (single-item leaves), without the whole table."""

    def __init__(self, n: int, rows: dict[int, np.ndarray]):
        self.n, self.rows = n, rows

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        return np.stack([self.rows[int(i)] for i in np.atleast_1d(index)])


def fit_over_blocks(embeddings_path: str, cfg: HKMeansConfig, n_items: int, top_sample: int,
                    refine_iters: int) -> HierarchicalKMeans:
    """Fit from an embeddings parquet whose item ids are 1..n_items, block by block."""
    ds = ray.data.read_parquet(embeddings_path).map_batches(_vectors_and_rows, batch_format="numpy").materialize()
    sample = np.concatenate([b["x"] for b in ds.random_sample(min(1.0, top_sample / n_items), seed=cfg.seed)
                             .iter_batches(batch_format="numpy")])
    k = min(cfg.branching, len(sample))
    centroids, _ = faiss_kmeans(sample, k, niter=cfg.niter, seed=node_seed(cfg.seed, ()))
    for _ in range(refine_iters):
        parts = ds.map_batches(partial(_partial_sums, centroids=centroids), batch_format="numpy").take_all()
        sums, counts = sum(p["sums"] for p in parts), sum(p["counts"] for p in parts)
        moved = counts > 0  # an emptied cluster keeps its old centroid for this step
        centroids[moved] = (sums[moved] / counts[moved, None]).astype(np.float32)
    labelled = ds.map_batches(partial(_label, centroids=centroids), batch_format="numpy")
    groups = labelled.groupby("label", num_partitions=max(1, min(k, 64))).map_groups(
        partial(_fit_group, cfg=cfg), batch_format="numpy")
    results, rows = [], {}
    for row in groups.take_all():
        result, singles = pickle.loads(row["result"])
        results.append(result)
        rows.update(singles)
    used = np.array(sorted(r.path[0] for r in results), dtype=np.int64)
    root = NodeSplit((), used, centroids[used], np.empty(0, dtype=np.int64))
    return HierarchicalKMeans.from_tree(cfg, assemble_tree(root, results, _Rows(n_items, rows), cfg.max_levels))
