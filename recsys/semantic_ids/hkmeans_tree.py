"""Hierarchical k-means as pure functions over one node, so subtrees can run anywhere.

The recursion is ``split_node`` (one node -> its children) and ``fit_subtree`` (a whole
subtree, depth first). A node's faiss seed comes from ``(cfg.seed, path)`` alone, and node ids
are assigned only at the end by sorting paths, so the same tree results whatever order or
process the subtrees run in. ``assemble_tree`` turns the pieces into a flat table:

- rows ``r = 0..R-1`` are all non-root nodes in (depth, path) order; node id = r + 1, root = 0;
- ``centroids (R, D)``, ``tokens (R,)`` (the code of row r under its parent), ``parent (R,)``;
- ``child_offset (R+1,)``, ``n_children (R+1,)``: node u's children are rows
  ``child_offset[u] : child_offset[u] + n_children[u]``, in ascending token order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from recsys.semantic_ids.kmeans import balanced_assign, faiss_kmeans, mean_centroids, node_seed

if TYPE_CHECKING:
    from recsys.semantic_ids.hkmeans import HKMeansConfig

Path_ = tuple[int, ...]
MAX_DEPTH = 64  # guards max_levels=0 against a recursion that never narrows


class NodeSplit(NamedTuple):
    """One node split into its non-empty children."""

    path: Path_
    codes: np.ndarray  # (c,) int64 child tokens, ascending
    centroids: np.ndarray  # (c, D) float32, row i belongs to codes[i]
    labels: np.ndarray  # (n,) int64 child token of each item of the node


class TreeNode(NamedTuple):
    path: Path_
    codes: np.ndarray  # (c,) int64
    centroids: np.ndarray  # (c, D) float32


class SubtreeTask(NamedTuple):
    """Everything ``fit_subtree`` needs; plain arrays, so it pickles to a Ray task."""

    path: Path_
    item_index: np.ndarray  # (n,) int64 rows of the full embedding matrix, ascending
    vectors: np.ndarray  # (n, D) float32, aligned with item_index
    config: "HKMeansConfig"


class SubtreeResult(NamedTuple):
    path: Path_
    nodes: list[TreeNode]  # every split node inside the subtree, its root included
    leaves: list[tuple[Path_, np.ndarray]]  # (leaf path, item indices held there)


class FlatTree(NamedTuple):
    centroids: np.ndarray  # (R, D) float32
    tokens: np.ndarray  # (R,) int64
    parent: np.ndarray  # (R,) int64 node id of each row's parent
    child_offset: np.ndarray  # (R + 1,) int64
    n_children: np.ndarray  # (R + 1,) int64
    codes: np.ndarray  # (N, L) int64 codes of the fitted items


def split_node(vectors: np.ndarray, item_index: np.ndarray, path: Path_, cfg: "HKMeansConfig") -> NodeSplit:
    """Split the n items of node ``path``: vectors (n, D), item_index (n,) -> NodeSplit.

    A node with <= cfg.split_threshold items gives them direct codes 0..n-1 in item-index
    order (each child's centroid is the item's own vector, so decode is exact). Larger nodes
    run faiss k-means with k = min(K, n); ``balanced`` (or a degenerate split that leaves all
    items in one cluster, e.g. duplicates) reassigns by capacity and re-centres on the members.
    """
    n = len(item_index)
    if n <= cfg.split_threshold:
        order = np.argsort(item_index, kind="stable")
        labels = np.empty(n, dtype=np.int64)
        labels[order] = np.arange(n)
        return NodeSplit(path, np.arange(n, dtype=np.int64), vectors[order], labels)
    k = min(cfg.branching, n)
    centroids, labels = faiss_kmeans(vectors, k, niter=cfg.niter, seed=node_seed(cfg.seed, path),
                                     max_points_per_centroid=cfg.max_points_per_centroid)
    if cfg.balanced or len(np.unique(labels)) == 1:
        labels = balanced_assign(vectors, centroids, cfg.balance_candidates)
        centroids = mean_centroids(vectors, labels, k)
    used = np.unique(labels)  # empty clusters are dropped; codes may have gaps
    return NodeSplit(path, used.astype(np.int64), centroids[used], labels)


def _children(split: NodeSplit, item_index: np.ndarray, vectors: np.ndarray):
    """Yield (child path, item_index, vectors) per child; items keep their order."""
    order = np.argsort(split.labels, kind="stable")
    bounds = np.searchsorted(split.labels[order], split.codes, side="left").tolist() + [len(order)]
    for i, code in enumerate(split.codes.tolist()):
        members = order[bounds[i]:bounds[i + 1]]
        yield split.path + (code,), item_index[members], vectors[members]


def _is_leaf(path: Path_, n: int, cfg: "HKMeansConfig") -> bool:
    if len(path) >= MAX_DEPTH:
        raise RuntimeError(f"hierarchical k-means reached depth {MAX_DEPTH} at path {path[:8]}...")
    return n == 1 or (cfg.max_levels > 0 and len(path) == cfg.max_levels)


def fit_subtree(task: SubtreeTask) -> SubtreeResult:
    """Cluster one subtree depth first. Top-level and picklable: Ray can run it as a task."""
    nodes: list[TreeNode] = []
    leaves: list[tuple[Path_, np.ndarray]] = []
    stack = [(task.path, np.asarray(task.item_index, dtype=np.int64), task.vectors)]
    while stack:
        path, item_index, vectors = stack.pop()
        if _is_leaf(path, len(item_index), task.config):
            leaves.append((path, item_index))
            continue
        split = split_node(vectors, item_index, path, task.config)
        nodes.append(TreeNode(path, split.codes, split.centroids))
        stack.extend(reversed(list(_children(split, item_index, vectors))))
    return SubtreeResult(task.path, nodes, leaves)


def make_subtree_tasks(embeddings: np.ndarray, root: NodeSplit, cfg: "HKMeansConfig",
                       item_index: np.ndarray | None = None) -> list[SubtreeTask]:
    """One task per child of the root split; embeddings (N, D) aligned with item_index (N,)."""
    item_index = np.arange(len(embeddings)) if item_index is None else np.asarray(item_index, dtype=np.int64)
    return [SubtreeTask(path, idx, vecs, cfg) for path, idx, vecs in _children(root, item_index, embeddings)]


def assemble_tree(root: NodeSplit, results: list[SubtreeResult], embeddings: np.ndarray,
                  max_levels: int) -> FlatTree:
    """Join the root split and subtree results (in any order) into a FlatTree.

    Depth L = max_levels, or the deepest leaf when max_levels = 0. A single item whose leaf is
    shallower than L continues as a chain of code-0 nodes centred on its own vector.
    """
    nodes = [TreeNode(root.path, root.codes, root.centroids)]
    leaves: list[tuple[Path_, np.ndarray]] = []
    for result in results:
        nodes.extend(result.nodes)
        leaves.extend(result.leaves)
    depth = max_levels or max(len(path) for path, _ in leaves)
    codes = np.full((len(embeddings), depth), -1, dtype=np.int64)
    for path, items in leaves:
        codes[items] = list(path) + [0] * (depth - len(path))
        for d in range(len(path), depth):
            nodes.append(TreeNode(path + (0,) * (d - len(path)), np.zeros(1, np.int64), embeddings[items[:1]]))
    if (codes < 0).any():
        missing = np.flatnonzero((codes < 0).any(axis=1))
        raise ValueError(f"{len(missing)} item(s) reached no leaf (missing subtree results?), "
                         f"rows {missing[:10].tolist()}")
    return _flatten(sorted(nodes, key=lambda node: (len(node.path), node.path)), codes)


def _flatten(nodes: list[TreeNode], codes: np.ndarray) -> FlatTree:
    """Nodes sorted by (depth, path) -> flat table; parents precede their children."""
    node_id = {(): 0}
    centroids, tokens, parent = [], [], []
    offsets, counts = {}, {}
    for node in nodes:
        me = node_id[node.path]
        offsets[me], counts[me] = len(tokens), len(node.codes)
        for code, centroid in zip(node.codes.tolist(), node.centroids):
            node_id[node.path + (code,)] = len(tokens) + 1
            tokens.append(code)
            parent.append(me)
            centroids.append(centroid)
    n_nodes = len(tokens) + 1
    child_offset = np.zeros(n_nodes, dtype=np.int64)
    n_children = np.zeros(n_nodes, dtype=np.int64)
    for me, offset in offsets.items():
        child_offset[me], n_children[me] = offset, counts[me]
    return FlatTree(np.stack(centroids).astype(np.float32), np.asarray(tokens, dtype=np.int64),
                    np.asarray(parent, dtype=np.int64), child_offset, n_children, codes)
