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


class LeafBlock(NamedTuple):
    """Items that end in leaves just below one node: item ``items[i]``'s leaf is ``parent +
    (codes[i],)``. One block per node holds all of its leaf children (of one or many items each)."""

    parent: Path_
    codes: np.ndarray  # (m,) int64
    items: np.ndarray  # (m,) int64 rows of the full embedding matrix


class SubtreeResult(NamedTuple):
    path: Path_
    nodes: list[TreeNode]  # every split node inside the subtree, its root included
    leaves: list[LeafBlock]


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
    ordered = split.labels[order]
    starts = np.searchsorted(ordered, split.codes, side="left").tolist()
    ends = np.searchsorted(ordered, split.codes, side="right").tolist()
    for code, start, end in zip(split.codes.tolist(), starts, ends):
        members = order[start:end]
        yield split.path + (code,), item_index[members], vectors[members]


def _check_depth(path: Path_) -> None:
    if len(path) >= MAX_DEPTH:
        raise RuntimeError(f"hierarchical k-means reached depth {MAX_DEPTH} at path {path[:8]}...")


def _is_leaf(path: Path_, n: int, cfg: "HKMeansConfig") -> bool:
    _check_depth(path)
    return n == 1 or (cfg.max_levels > 0 and len(path) == cfg.max_levels)


def fit_subtree(task: SubtreeTask) -> SubtreeResult:
    """Cluster one subtree depth first. Top-level and picklable: Ray can run it as a task.
    The leaf children of a split are kept as one block (most leaves are single items under a
    node that took direct codes), so no per-item work follows them."""
    nodes: list[TreeNode] = []
    leaves: list[LeafBlock] = []
    item_index = np.asarray(task.item_index, dtype=np.int64)
    if _is_leaf(task.path, len(item_index), task.config):
        return SubtreeResult(task.path, [], [LeafBlock(task.path[:-1], np.full(len(item_index), task.path[-1]), item_index)])
    stack = [(task.path, item_index, task.vectors)]
    while stack:
        path, item_index, vectors = stack.pop()
        _check_depth(path)  # a pushed child is never a leaf, but the recursion must narrow
        split = split_node(vectors, item_index, path, task.config)
        nodes.append(TreeNode(path, split.codes, split.centroids))
        sizes = np.bincount(split.labels)
        if len(path) + 1 == task.config.max_levels:  # every child is a leaf
            leaves.append(LeafBlock(path, split.labels, item_index))
            continue
        single = sizes[split.labels] == 1
        if single.any():
            leaves.append(LeafBlock(path, split.labels[single], item_index[single]))
        inner = sizes[split.codes] > 1  # children that split again
        if inner.any():
            deeper = split._replace(codes=split.codes[inner], centroids=split.centroids[inner])
            stack.extend(reversed(list(_children(deeper, item_index, vectors))))
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
    blocks: list[LeafBlock] = []
    for result in results:
        nodes.extend(result.nodes)
        blocks.extend(result.leaves)
    depth = max_levels or max(len(block.parent) + 1 for block in blocks)
    codes = np.zeros((len(embeddings), depth), dtype=np.int64)  # a chain below a shallow leaf is code 0
    leaf_depth = np.full(len(embeddings), -1, dtype=np.int64)
    for block in blocks:
        d = len(block.parent)
        if d:
            codes[block.items, :d] = block.parent
        codes[block.items, d] = block.codes
        leaf_depth[block.items] = d + 1
    if (leaf_depth < 0).any():
        missing = np.flatnonzero(leaf_depth < 0)
        raise ValueError(f"{len(missing)} item(s) reached no leaf (missing subtree results?), "
                         f"rows {missing[:10].tolist()}")
    return _flatten(sorted(nodes, key=lambda node: (len(node.path), node.path)), codes, leaf_depth, embeddings)


def _flatten(nodes: list[TreeNode], codes: np.ndarray, leaf_depth: np.ndarray, embeddings: np.ndarray) -> FlatTree:
    """Split nodes sorted by (depth, path), the items' codes (N, L) and leaf depths (N,) -> flat
    table; parents precede their children.

    Vectorised over levels: the nodes at depth d are the distinct (parent node, code) pairs of the
    items, and since parents are numbered in path order, sorting the pairs gives the (depth, path)
    order of the rows. The rows that are not chain rows are the split nodes' children, node by
    node in that same order, so each split node's centroid table fills a run of rows.
    """
    tokens, parent, first_item, row_depth = [], [], [], []
    node_of_item = np.zeros(len(codes), dtype=np.int64)  # depth 0: every item is under the root
    stride = int(codes.max()) + 1
    n_rows = 0
    for d in range(1, codes.shape[1] + 1):
        keys, first, inverse = np.unique(node_of_item * stride + codes[:, d - 1], return_index=True,
                                         return_inverse=True)
        tokens.append(codes[first, d - 1])
        parent.append(node_of_item[first])
        first_item.append(first)
        row_depth.append(np.full(len(keys), d))
        node_of_item = n_rows + 1 + inverse.reshape(-1)
        n_rows += len(keys)
    tokens, parent = np.concatenate(tokens), np.concatenate(parent)
    first_item, row_depth = np.concatenate(first_item), np.concatenate(row_depth)
    chain = leaf_depth[first_item] < row_depth  # below a lone item's leaf: code 0, its own vector
    split_rows = np.flatnonzero(~chain)
    sizes = [len(node.codes) for node in nodes]
    if len(split_rows) != sum(sizes) or not np.array_equal(tokens[split_rows], np.concatenate([n.codes for n in nodes])):
        raise RuntimeError("hierarchical k-means: the split nodes' codes do not match the items' codes")
    centroids = np.empty((n_rows, nodes[0].centroids.shape[1]), dtype=np.float32)
    starts = split_rows[np.cumsum([0] + sizes[:-1])].tolist()  # a split node's children are consecutive rows
    for node, start in zip(nodes, starts):
        centroids[start:start + len(node.codes)] = node.centroids
    if chain.any():  # embeddings may be a table that holds only these rows (pipelines.hkmeans_blocks)
        centroids[chain] = embeddings[first_item[chain]]
    n_children = np.bincount(parent, minlength=n_rows + 1)
    child_offset = np.where(n_children > 0, np.searchsorted(parent, np.arange(n_rows + 1)), 0)
    return FlatTree(centroids, tokens, parent, child_offset, n_children, codes)
