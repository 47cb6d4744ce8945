"""Hierarchical k-means semantic IDs, after EAGER (Wang et al., 2024), arXiv:2406.14017.

Each level clusters the items of a parent cluster into K children; an item's code is its path.
Departures from the paper and its released code:
- A fixed depth L = ``max_levels`` (default 3) as TIGER/EAGER IDs are used; items still sharing
  a path get the collision level from ``SemanticIdIndex``. ``max_levels=0`` recurses until
  every leaf holds one item and pads shallower paths with code 0 (a one-item node's only child).
- A node with <= K items (``min_cluster_to_split``) is not clustered: its items take direct
  codes 0..n-1 in item-index order, so small clusters never collide.
- ``balanced=True`` replaces the released code's constrained k-means by unconstrained faiss
  k-means followed by a capacity-constrained greedy assignment (capacity ceil(n/K), see
  ``kmeans.balanced_assign``) and member-mean centroids.
Distribution: the top level runs in-process, the independent subtrees below it go through a
``map_fn`` (builtin ``map`` by default; a Ray-backed map fans them out as tasks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch

from recsys.config import require, require_range
from recsys.semantic_ids.base import (
    SemanticIdTokenizer, make_config, register_tokenizer, validate_codes, validate_embeddings,
)
from recsys.semantic_ids.hkmeans_tree import (
    FlatTree, NodeSplit, SubtreeResult, SubtreeTask, assemble_tree, fit_subtree, make_subtree_tasks, split_node,
)
from recsys.semantic_ids.kmeans import assign_nearest, balanced_assign, faiss_kmeans, mean_centroids, node_seed

MapFn = Callable[[Callable[[SubtreeTask], SubtreeResult], Iterable[SubtreeTask]], Iterable[SubtreeResult]]


@dataclass
class HKMeansConfig:
    branching: int = 256  # K children per node = codebook size of every level
    max_levels: int = 3  # fixed depth L; 0 = until every leaf holds one item
    balanced: bool = False  # capacity-constrained assignment (EAGER's released code balances)
    niter: int = 20  # faiss k-means iterations per node
    seed: int = 0  # each node's faiss seed derives from (seed, path)
    # 0 = train every node's k-means on all its points; faiss's own default, 256, silently
    # trains on a sample of only 256 * K points (RAY-NOTES.md, k-means).
    max_points_per_centroid: int = 0
    min_cluster_to_split: int = 0  # nodes with <= this many items take direct codes; 0 = K
    balance_candidates: int = 16  # balanced only: nearest centroids tried per item

    def __post_init__(self):
        require_range("hkmeans.branching", self.branching, 2, 1 << 20)
        require_range("hkmeans.max_levels", self.max_levels, 0, 32)
        require(isinstance(self.balanced, bool), f"hkmeans.balanced must be true or false, got {self.balanced!r}")
        require_range("hkmeans.niter", self.niter, 1, 10000)
        require_range("hkmeans.seed", self.seed, 0, 2**31 - 1)
        require_range("hkmeans.max_points_per_centroid", self.max_points_per_centroid, 0, None)
        require_range("hkmeans.min_cluster_to_split", self.min_cluster_to_split, 0, self.branching)
        require_range("hkmeans.balance_candidates", self.balance_candidates, 1, None)

    @property
    def split_threshold(self) -> int:
        """Nodes with at most this many items get direct codes instead of k-means."""
        return self.min_cluster_to_split or self.branching



@register_tokenizer("hkmeans")
class HierarchicalKMeans(SemanticIdTokenizer):
    """Hierarchical k-means tokenizer: ``HierarchicalKMeans(branching=256, max_levels=3)`` or
    ``HierarchicalKMeans(config=HKMeansConfig(...))``.

    ``fit_codes`` holds the fitted items' codes as clustered; ``encode`` is greedy descent by
    nearest centroid (cold start) and reproduces them for unbalanced trees (balanced
    assignment can place an item in a cluster other than its nearest).
    """

    def __init__(self, *, config: HKMeansConfig | None = None, **overrides: Any):
        self.config = make_config(HKMeansConfig, config, overrides)
        self._tree: FlatTree | None = None
        self._lookup: tuple[np.ndarray, np.ndarray] | None = None

    # --- fitting -------------------------------------------------------------------------
    def fit(self, embeddings: np.ndarray, map_fn: MapFn = map) -> "HierarchicalKMeans":
        """embeddings (N >= 2, D). The top level runs here; subtrees go through ``map_fn``."""
        x = validate_embeddings(embeddings, min_items=2)
        root = split_node(x, np.arange(len(x)), (), self.config)
        return self.fit_from_root(x, root, map_fn)

    def fit_from_root(self, embeddings: np.ndarray, root: NodeSplit, map_fn: MapFn = map) -> "HierarchicalKMeans":
        """Finish a fit whose top-level split (over all N rows) was computed elsewhere,
        e.g. by Lloyd steps over Ray Data blocks. Results may come back in any order."""
        x = validate_embeddings(embeddings, min_items=2)
        require(len(root.labels) == len(x), f"root split labels {len(root.labels)} items, embeddings hold {len(x)}")
        tasks = make_subtree_tasks(x, root, self.config)
        results = list(map_fn(fit_subtree, tasks))
        got, want = sorted(r.path for r in results), sorted(t.path for t in tasks)
        require(got == want, f"map_fn returned results for subtrees {got[:5]}..., expected {want[:5]}...")
        return self._set_tree(assemble_tree(root, results, x, self.config.max_levels))

    @classmethod
    def from_tree(cls, config: HKMeansConfig, tree: FlatTree) -> "HierarchicalKMeans":
        """A fitted tokenizer from a tree assembled elsewhere (e.g. over Ray Data blocks)."""
        return cls(config=config)._set_tree(tree)

    def _set_tree(self, tree: FlatTree) -> "HierarchicalKMeans":
        self._tree = tree
        keys = tree.parent * self.config.branching + tree.tokens  # (R,) unique per child row
        order = np.argsort(keys, kind="stable")
        self._lookup = (keys[order], order)
        return self

    # --- the tokenizer interface ---------------------------------------------------------
    @property
    def n_levels(self) -> int:
        if self._tree is not None:
            return self._tree.codes.shape[1]
        return self.config.max_levels

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.config.branching] * self.n_levels

    @property
    def input_dim(self) -> int:
        return 0 if self._tree is None else self._tree.centroids.shape[1]

    @property
    def fit_codes(self) -> torch.Tensor:
        """(N, L) codes of the fitted items, in row order."""
        self._require_fitted()
        return torch.from_numpy(self._tree.codes.copy())

    def fit_encode(self, embeddings: np.ndarray) -> torch.Tensor:
        return self.fit(embeddings).fit_codes

    def encode(self, embeddings: np.ndarray) -> torch.Tensor:
        """(N, D) -> (N, L) codes by greedy descent: nearest child centroid at every level."""
        self._require_fitted()
        x = validate_embeddings(embeddings, dim=self.input_dim)
        tree = self._tree
        node = np.zeros(len(x), dtype=np.int64)  # (N,) current node id, root = 0
        codes = np.empty((len(x), self.n_levels), dtype=np.int64)
        for level in range(self.n_levels):
            order = np.argsort(node, kind="stable")  # group items by node, keeping row order
            uniq, starts = np.unique(node[order], return_index=True)
            for u, members in zip(uniq.tolist(), np.split(order, starts[1:])):
                lo = tree.child_offset[u]
                label, _ = assign_nearest(x[members], tree.centroids[lo:lo + tree.n_children[u]])
                rows = lo + label  # (m,)
                codes[members, level] = tree.tokens[rows]
                node[members] = rows + 1
        return torch.from_numpy(codes)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, L) codes -> (N, D) centroid of the deepest node on each path (exact for items
        with their own leaf). A path that is not in the tree raises ValueError."""
        self._require_fitted()
        rows = self._rows_of(validate_codes(codes, self.codebook_sizes))
        return torch.from_numpy(self._tree.centroids[rows])

    def _rows_of(self, codes: np.ndarray) -> np.ndarray:
        keys_sorted, rows_sorted = self._lookup
        node = np.zeros(len(codes), dtype=np.int64)
        row = np.zeros(len(codes), dtype=np.int64)
        for level in range(codes.shape[1]):
            key = node * self.config.branching + codes[:, level]  # (N,)
            pos = np.minimum(np.searchsorted(keys_sorted, key), len(keys_sorted) - 1)
            bad = np.flatnonzero(keys_sorted[pos] != key)
            if len(bad):
                raise ValueError(f"{len(bad)} code row(s) are not paths of the tree (first level {level} "
                                 f"fails), rows {bad[:10].tolist()}")
            row = rows_sorted[pos]
            node = row + 1
        return row

    def nodes(self) -> dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]]:
        """{node path: (child codes (c,), child centroids (c, D))} for every split node."""
        self._require_fitted()
        tree = self._tree
        paths: list[tuple[int, ...]] = [()]
        for parent, token in zip(tree.parent.tolist(), tree.tokens.tolist()):
            paths.append(paths[parent] + (token,))
        out = {}
        for u in np.flatnonzero(tree.n_children).tolist():
            lo, hi = tree.child_offset[u], tree.child_offset[u] + tree.n_children[u]
            out[paths[u]] = (tree.tokens[lo:hi], tree.centroids[lo:hi])
        return out

    # --- persistence ---------------------------------------------------------------------
    def _state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        meta = {"config": dataclasses.asdict(self.config), "n_levels": self.n_levels, "input_dim": self.input_dim}
        tensors = {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in self._tree._asdict().items()}
        return meta, tensors

    @classmethod
    def _from_state(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "HierarchicalKMeans":
        tokenizer = cls(config=HKMeansConfig(**meta["config"]))
        return tokenizer._set_tree(FlatTree(**{name: tensors[name].numpy() for name in FlatTree._fields}))


def single_process_recursion(embeddings: np.ndarray, cfg: HKMeansConfig
                             ) -> tuple[np.ndarray, dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]]]:
    """Slow reference: a plain recursive faiss hierarchy -> (codes (N, L), {path: (codes, centroids)}).

    Written independently of the task machinery and of ``split_node`` (it shares only the
    faiss/assignment primitives), so tests can check that any map_fn, order or process pool
    yields the same tree.
    """
    x = validate_embeddings(embeddings, min_items=2)
    nodes: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
    leaf_of: dict[int, tuple[int, ...]] = {}

    def recurse(items: np.ndarray, path: tuple[int, ...]) -> None:
        if len(items) == 1 or len(path) == (cfg.max_levels or -1):
            leaf_of.update({int(i): path for i in items})
            return
        if len(items) <= (cfg.min_cluster_to_split or cfg.branching):  # direct codes by item index
            nodes[path] = (np.arange(len(items)), x[items])
            for code, item in enumerate(items):
                recurse(items[code:code + 1], path + (code,))
            return
        k = min(cfg.branching, len(items))
        centroids, labels = faiss_kmeans(x[items], k, niter=cfg.niter, seed=node_seed(cfg.seed, path),
                                         max_points_per_centroid=cfg.max_points_per_centroid)
        if cfg.balanced or len(set(labels.tolist())) == 1:
            labels = balanced_assign(x[items], centroids, cfg.balance_candidates)
            centroids = mean_centroids(x[items], labels, k)
        used = np.array(sorted(set(labels.tolist())), dtype=np.int64)
        nodes[path] = (used, centroids[used])
        for code in used.tolist():
            recurse(items[labels == code], path + (code,))

    recurse(np.arange(len(x)), ())
    depth = cfg.max_levels or max(len(p) for p in leaf_of.values())
    codes = np.zeros((len(x), depth), dtype=np.int64)
    for item, path in leaf_of.items():
        codes[item, :len(path)] = path
        for d in range(len(path), depth):  # a lone item's chain of code-0 nodes
            nodes[path + (0,) * (d - len(path))] = (np.zeros(1, np.int64), x[item:item + 1])
    return codes, nodes
