"""The semantic-ID index: the collision level, ID <-> item maps, and a prefix trie of valid IDs.

A tokenizer gives items (N, L) content codes; items sharing a code tuple are told apart by an
extra collision code 0, 1, 2, ... in item-id order, so full IDs (N, L + 1) are unique. New
items (cold start) take the next free collision code of their tuple; existing IDs never change.

The trie serves constrained decoding: integer node ids, the root is 0, every node holds its
allowed next tokens in ascending order, and each leaf (depth L + 1) maps to one item.
``transition_table()`` exports it as CSR tensors, and ``step``/``next_mask`` advance a batch of
beams at once. Node ids follow row order, which save/load preserves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

META_FILE = "index.json"
ITEMS_FILE = "item_ids.npy"
IDS_FILE = "full_ids.npy"


class TrieTable(NamedTuple):
    """CSR form of the trie; node u's edges are ``offsets[u]:offsets[u+1]``, tokens ascending."""

    offsets: torch.Tensor  # (M + 1,) int64
    tokens: torch.Tensor  # (E,) int64
    children: torch.Tensor  # (E,) int64 child node ids
    depth: torch.Tensor  # (M,) int64, root = 0, leaves = L + 1
    leaf_item: torch.Tensor  # (M,) int64 item id at a leaf, -1 elsewhere


def _int_array(values: Any, name: str, ndim: int) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    a = np.asarray(values)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(a.shape)}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def collision_codes(item_ids: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """item_ids (N,), codes (N, L) -> (N,) rank of each item among those sharing its tuple,
    counted in item-id order."""
    order = np.lexsort((item_ids, *codes.T[::-1]))  # by tuple, then item id
    sorted_codes = codes[order]
    new_group = np.ones(len(order), dtype=bool)
    new_group[1:] = (sorted_codes[1:] != sorted_codes[:-1]).any(axis=1)
    starts = np.maximum.accumulate(np.where(new_group, np.arange(len(order)), 0))
    out = np.empty(len(order), dtype=np.int64)
    out[order] = np.arange(len(order)) - starts
    return out


class SemanticIdIndex:
    """``SemanticIdIndex(item_ids=(N,), codes=(N, L))`` -> unique full IDs (N, L + 1)."""

    def __init__(self, *, item_ids: Any, codes: Any, codebook_sizes: list[int] | None = None):
        ids = _int_array(item_ids, "item_ids", 1)
        content = _int_array(codes, "codes", 2)
        if len(ids) != len(content):
            raise ValueError(f"item_ids hold {len(ids)} items but codes hold {len(content)} rows")
        full = np.concatenate([content, collision_codes(ids, content)[:, None]], axis=1)  # (N, L + 1)
        order = np.lexsort(full.T[::-1])  # rows in full-ID order give a deterministic trie numbering
        self._setup(ids[order], full[order], content.shape[1], codebook_sizes)

    @classmethod
    def from_full_ids(cls, item_ids: Any, full_ids: Any, codebook_sizes: list[int] | None = None) -> "SemanticIdIndex":
        """Rebuild from existing full IDs (N, L + 1), e.g. after load; nothing is renumbered."""
        ids, full = _int_array(item_ids, "item_ids", 1), _int_array(full_ids, "full_ids", 2)
        if len(ids) != len(full) or full.shape[1] < 2:
            raise ValueError(f"need item_ids (N,) and full_ids (N, L + 1 >= 2), got {ids.shape} and {full.shape}")
        index = cls.__new__(cls)
        index._setup(ids, full, full.shape[1] - 1, codebook_sizes)
        return index

    def _setup(self, ids: np.ndarray, full: np.ndarray, n_levels: int, codebook_sizes: list[int] | None) -> None:
        if codebook_sizes is not None and len(codebook_sizes) != n_levels:
            raise ValueError(f"codebook_sizes {codebook_sizes} must have one entry per level ({n_levels})")
        self.n_levels = n_levels  # content levels L; full IDs have L + 1 tokens
        self.codebook_sizes = list(codebook_sizes) if codebook_sizes is not None else None
        self._items: list[int] = []
        self._full: list[tuple[int, ...]] = []
        self._row_of: dict[int, int] = {}
        self._item_by_id: dict[tuple[int, ...], int] = {}
        self._group_size: dict[tuple[int, ...], int] = {}
        self._next_free: dict[tuple[int, ...], int] = {}
        self._edges: list[dict[int, int]] = [{}]  # node -> {token: child node}
        self._leaf_item: dict[int, int] = {}
        self._cache: dict[str, Any] = {}  # arrays derived from the lists above; reset on insert
        for item, row in zip(ids.tolist(), full.tolist()):
            self._insert(item, tuple(row))

    # --- building ------------------------------------------------------------------------
    def _check_codes(self, codes: tuple[int, ...]) -> None:
        if len(codes) != self.n_levels or any(c < 0 for c in codes):
            raise ValueError(f"codes {codes} must be {self.n_levels} non-negative integers")
        if self.codebook_sizes and any(c >= k for c, k in zip(codes, self.codebook_sizes)):
            raise ValueError(f"codes {codes} fall outside codebook sizes {self.codebook_sizes}")

    def _insert(self, item: int, full_id: tuple[int, ...]) -> None:
        if item in self._row_of:
            raise ValueError(f"item id {item} is already in the index with ID {self._full[self._row_of[item]]}")
        if full_id in self._item_by_id:
            raise ValueError(f"ID {full_id} of item {item} already belongs to item {self._item_by_id[full_id]}")
        self._check_codes(full_id[:-1])
        if len(full_id) != self.n_levels + 1 or full_id[-1] < 0:
            raise ValueError(f"ID {full_id} must hold {self.n_levels} content codes and a collision code >= 0")
        content = full_id[:-1]
        self._row_of[item] = len(self._items)
        self._items.append(item)
        self._full.append(full_id)
        self._item_by_id[full_id] = item
        self._group_size[content] = self._group_size.get(content, 0) + 1
        self._next_free[content] = max(self._next_free.get(content, 0), full_id[-1] + 1)
        node = 0
        for token in full_id:
            child = self._edges[node].get(token)
            if child is None:
                child = len(self._edges)
                self._edges.append({})
                self._edges[node][token] = child
            node = child
        self._leaf_item[node] = item
        self._cache = {}

    def next_full_id(self, codes: Any) -> tuple[int, ...]:
        """The full ID ``add`` would give an item with content codes (L,), without adding it (so a
        caller can check it fits a model's vocabulary before anything changes)."""
        content = tuple(int(c) for c in _int_array(codes, "codes", 1).tolist())
        self._check_codes(content)
        return content + (self._next_free.get(content, 0),)

    def add(self, item_id: int, codes: Any) -> tuple[int, ...]:
        """Register a new item with content codes (L,) -> its full ID; existing IDs never change."""
        full_id = self.next_full_id(codes)
        self._insert(int(item_id), full_id)
        return full_id

    def add_many(self, item_ids: Any, codes: Any) -> torch.Tensor:
        """Register new items (n,) with codes (n, L), in item-id order -> full IDs (n, L + 1)."""
        ids, content = _int_array(item_ids, "item_ids", 1), _int_array(codes, "codes", 2)
        out = np.empty((len(ids), self.n_levels + 1), dtype=np.int64)
        for i in np.argsort(ids, kind="stable").tolist():
            out[i] = self.add(int(ids[i]), content[i])
        return torch.from_numpy(out)

    # --- ID <-> item ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._items)

    @property
    def item_ids(self) -> torch.Tensor:
        """(N,) int64 item ids in row order."""
        return torch.tensor(self._items, dtype=torch.int64)

    @property
    def full_ids(self) -> torch.Tensor:
        """(N, L + 1) int64 full IDs in row order (aligned with ``item_ids``)."""
        return torch.tensor(self._full, dtype=torch.int64).reshape(len(self._full), self.n_levels + 1)

    def has_item(self, item_id: int) -> bool:
        return int(item_id) in self._row_of

    def id_of(self, item_id: int) -> tuple[int, ...]:
        row = self._row_of.get(int(item_id))
        if row is None:
            raise KeyError(f"item id {item_id} is not in the semantic-ID index ({len(self)} items)")
        return self._full[row]

    def item_of(self, full_id: Any) -> int:
        key = tuple(int(t) for t in full_id)
        if key not in self._item_by_id:
            raise KeyError(f"semantic ID {key} belongs to no item (IDs have {self.n_levels + 1} tokens)")
        return self._item_by_id[key]

    def ids_for(self, item_ids: Any) -> torch.Tensor:
        """item ids (n,) -> full IDs (n, L + 1); unknown ids raise KeyError."""
        ids = _int_array(item_ids, "item_ids", 1)
        if "lookup" not in self._cache:
            items = np.asarray(self._items, dtype=np.int64)
            order = np.argsort(items)
            self._cache["lookup"] = (items[order], self.full_ids.numpy()[order])
        sorted_items, sorted_full = self._cache["lookup"]
        pos = np.minimum(np.searchsorted(sorted_items, ids), max(len(sorted_items) - 1, 0))
        missing = ids[sorted_items[pos] != ids] if len(sorted_items) else ids
        if len(missing):
            raise KeyError(f"{len(missing)} item id(s) are not in the index: {missing[:10].tolist()}")
        return torch.from_numpy(sorted_full[pos])

    # --- statistics ----------------------------------------------------------------------
    @property
    def collision_rate(self) -> float:
        """Fraction of items whose content tuple (before the collision level) is shared."""
        shared = sum(size for size in self._group_size.values() if size > 1)
        return shared / max(len(self), 1)

    @property
    def max_collision_depth(self) -> int:
        """Most items sharing one content tuple (= size the collision level needs)."""
        return max(self._group_size.values(), default=0)

    @property
    def level_sizes(self) -> list[int]:
        """Vocabulary per level of the full ID: L content levels + the collision level."""
        full = self.full_ids
        observed = (full.max(0).values + 1).tolist() if len(full) else [0] * (self.n_levels + 1)
        sizes = self.codebook_sizes or observed[:-1]
        return [max(a, b) for a, b in zip(sizes, observed[:-1])] + [observed[-1]]

    # --- the prefix trie -----------------------------------------------------------------
    @property
    def n_nodes(self) -> int:
        return len(self._edges)

    def node_of(self, prefix: Any) -> int:
        """Trie node of a valid ID prefix (() = root = 0); KeyError if no ID starts with it."""
        node = 0
        for depth, token in enumerate(int(t) for t in prefix):
            child = self._edges[node].get(token)
            if child is None:
                raise KeyError(f"no semantic ID starts with {tuple(prefix)[:depth + 1]}")
            node = child
        return node

    def children(self, node: int) -> tuple[torch.Tensor, torch.Tensor]:
        """node -> (allowed tokens (c,) ascending, their child nodes (c,)); leaves give empty."""
        edges = self._edges[node]
        tokens = sorted(edges)
        return torch.tensor(tokens, dtype=torch.int64), torch.tensor([edges[t] for t in tokens], dtype=torch.int64)

    def allowed_next(self, prefix: Any) -> torch.Tensor:
        """Tokens that extend ``prefix`` towards an existing ID (ascending); empty for a full ID
        or a prefix no ID starts with."""
        try:
            return self.children(self.node_of(prefix))[0]
        except KeyError:
            return torch.empty(0, dtype=torch.int64)

    def item_at(self, node: int) -> int:
        if node not in self._leaf_item:
            raise KeyError(f"trie node {node} is not a leaf (a full ID)")
        return self._leaf_item[node]

    def transition_table(self) -> TrieTable:
        """The trie as CSR tensors, for batched constrained beam search."""
        if "table" not in self._cache:
            counts = [len(e) for e in self._edges]
            tokens, children, depth = [], [], [0] * self.n_nodes
            for node, edges in enumerate(self._edges):
                for token in sorted(edges):
                    tokens.append(token)
                    children.append(edges[token])
                    depth[edges[token]] = depth[node] + 1  # parents have smaller ids than children
            leaf = np.full(self.n_nodes, -1, dtype=np.int64)
            leaf[list(self._leaf_item)] = list(self._leaf_item.values())
            offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            self._cache["table"] = TrieTable(torch.from_numpy(offsets), torch.tensor(tokens, dtype=torch.int64),
                                             torch.tensor(children, dtype=torch.int64),
                                             torch.tensor(depth, dtype=torch.int64), torch.from_numpy(leaf))
        return self._cache["table"]

    def step(self, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Advance beams: nodes (B,), tokens (B,) -> child nodes (B,), -1 where not allowed."""
        table = self.transition_table()
        vocab = int(table.tokens.max()) + 1 if len(table.tokens) else 1
        parent = torch.repeat_interleave(torch.arange(self.n_nodes), table.offsets.diff())  # (E,)
        keys = parent * vocab + table.tokens  # (E,) ascending: nodes in order, tokens ascending
        query = nodes.long().cpu() * vocab + tokens.long().cpu().clamp(0, vocab - 1)
        pos = torch.searchsorted(keys, query).clamp(max=max(len(keys) - 1, 0))
        ok = (tokens.cpu() >= 0) & (tokens.cpu() < vocab) & (nodes.cpu() >= 0) & (keys[pos] == query)
        return torch.where(ok, table.children[pos], torch.full_like(pos, -1)).to(nodes.device)

    def next_mask(self, nodes: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """nodes (B,) -> BoolTensor (B, vocab_size), True where the token extends a valid ID;
        a node of -1 (a dead beam) allows nothing."""
        table = self.transition_table()
        alive = nodes.cpu() >= 0
        safe = nodes.cpu().clamp(min=0)
        lo, hi = table.offsets[safe], torch.where(alive, table.offsets[safe + 1], table.offsets[safe])  # (B,) each
        mask = torch.zeros(len(nodes), vocab_size, dtype=torch.bool)
        rows = torch.repeat_interleave(torch.arange(len(nodes)), hi - lo)
        edges = torch.cat([torch.arange(a, b) for a, b in zip(lo.tolist(), hi.tolist())]) if len(nodes) else lo
        cols = table.tokens[edges]
        keep = cols < vocab_size
        mask[rows[keep], cols[keep]] = True
        return mask.to(nodes.device)

    # --- persistence ---------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """index.json + item_ids.npy + full_ids.npy (no pickle); row order is kept."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / ITEMS_FILE, np.asarray(self._items, dtype=np.int64), allow_pickle=False)
        np.save(directory / IDS_FILE, self.full_ids.numpy(), allow_pickle=False)
        meta = {"n_levels": self.n_levels, "codebook_sizes": self.codebook_sizes, "n_items": len(self),
                "collision_rate": self.collision_rate, "max_collision_depth": self.max_collision_depth}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "SemanticIdIndex":
        directory = Path(directory)
        for name in (META_FILE, ITEMS_FILE, IDS_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} is missing; not a saved semantic-ID index")
        meta = json.loads((directory / META_FILE).read_text())
        full = np.load(directory / IDS_FILE, allow_pickle=False).reshape(-1, meta["n_levels"] + 1)
        return cls.from_full_ids(np.load(directory / ITEMS_FILE, allow_pickle=False), full, meta["codebook_sizes"])
