"""One semantic-ID space inside a model: the item -> ID table, its token vocabulary, the prefix
trie that constrains decoding, the prefix nodes, and the registration of new items.

A generative retriever composes one ``SemanticVocabulary`` per ID space it declares (TIGER: the
``semantic`` space; EAGER: ``semantic`` and ``behavior``). The module holds buffers only:
- ``item_codes`` (n_items + 1, L + 1), persistent: each item's full ID (L codes + the collision
  code), row 0 padding. Registered items append rows, so a checkpoint carries them; a row of -1
  (``ABSENT``) is an item registered with no ID in this space (EAGER's behaviour space for a new
  item), which the trie leaves out;
- ``item_nodes`` (same shape), persistent, with ``prefix_nodes=True``: entry (i, l) numbers the
  prefix ``item_codes[i, :l + 1]`` (its trie node), from 1 over all levels. Numbers are fixed at
  training time: a registered item reuses a known prefix's node and gets 0 for a new one;
- the trie (``trie``) and, with ``child_tables=True``, per level the node each token of each
  parent leads to; derived from the persistent buffers, never saved, rebuilt on load.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from recsys.generation.beam import TrieEdges, trie_edges
from recsys.semantic_ids.index import SemanticIdIndex, TrieTable


ABSENT = -1  # the code of every level of an item that has no ID in a space


def semantic_id_table(index: SemanticIdIndex, n_items: int) -> torch.Tensor:
    """The table a vocabulary is built with: (n_items + 1, L + 1) full IDs by item id, row 0 zeros
    (padding). Every item 1..n_items must be in the index (KeyError otherwise)."""
    full = index.ids_for(torch.arange(1, n_items + 1))  # (N, L + 1)
    return torch.cat([full.new_zeros(1, full.shape[1]), full])


def prefix_node_table(table: torch.Tensor) -> torch.Tensor:
    """(n_items + 1, L + 1) full IDs -> (n_items + 1, L + 1) prefix-node ids: entry (i, l) numbers
    the distinct prefix ``table[i, :l + 1]``, from 1 over all levels; row 0 (padding) and the rows of
    items with no ID in the space (``ABSENT``) are 0."""
    nodes = torch.zeros_like(table)
    present = torch.cat([torch.zeros(1, dtype=torch.bool), (table[1:] >= 0).all(1)])  # an ABSENT row has no node
    start = 1
    for level in range(table.shape[1]):
        _, inverse = torch.unique(table[present, :level + 1], dim=0, return_inverse=True)
        nodes[present, level] = inverse + start
        start += int(inverse.max()) + 1
    return nodes


def extend_prefix_nodes(table: torch.Tensor, nodes: torch.Tensor, new_rows: torch.Tensor) -> torch.Tensor:
    """Prefix-node ids for ``new_rows`` (n, L + 1) of full IDs, given the known ``table`` and its
    ``nodes``: a prefix seen before keeps its node, an unseen one gets 0 (no learned embedding)."""
    out = torch.zeros_like(new_rows)
    for level in range(table.shape[1]):
        known = {tuple(row): int(node) for row, node in zip(table[1:, :level + 1].tolist(), nodes[1:, level].tolist())}
        out[:, level] = torch.tensor([known.get(tuple(row), 0) for row in new_rows[:, :level + 1].tolist()],
                                     dtype=out.dtype)
    return out


def child_node_tables(table: torch.Tensor, nodes: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """Per level l, a (parent rows, V_l) table of the prefix node reached by each token, 0 where
    none (no learned embedding). Level 0 has one row, the root; the row of a level-l node n is
    ``n - starts[l] + 1``, and row 0 (an unknown parent: a prefix first seen after training)
    holds zeros. ``table`` and ``nodes`` are (n_items + 1, L + 1) with row 0 padding."""
    present = (table[1:] >= 0).all(1)  # an item with no ID in this space (ABSENT) leads nowhere
    codes, ids = table[1:][present], nodes[1:][present]
    starts = [int(ids[:, l][ids[:, l] > 0].min()) if (ids[:, l] > 0).any() else 1 for l in range(table.shape[1])]
    tables, rows = [], torch.zeros(len(codes), dtype=torch.long)
    for level in range(table.shape[1]):
        n_rows = 1 if level == 0 else int(ids[:, level - 1].max()) - starts[level - 1] + 2
        child = torch.zeros(n_rows, int(codes[:, level].max()) + 1, dtype=torch.long)
        child[rows, codes[:, level]] = ids[:, level]
        tables.append(child)
        rows = torch.where(ids[:, level] > 0, ids[:, level] - starts[level] + 1, torch.zeros_like(rows))
    return tables, starts


class IdTable(NamedTuple):
    """What a model is built with for one ID space (``build_model(..., ids={space: IdTable})``).
    codes: (n_items + 1, L + 1) full IDs by item id, row 0 zeros (``semantic_id_table``);
    level_sizes: tokens per level (the ids run's codebook sizes; None: the table's max + 1);
    nodes: prefix-node numbers as trained (None: numbered from ``codes``);
    vectors: (n_items + 1, D) the item vectors the IDs were built from, row 0 padding (None: not
        loaded; only models that declare ``capabilities.id_vectors`` read them)."""

    codes: torch.Tensor
    level_sizes: list[int] | None = None
    nodes: torch.Tensor | None = None
    vectors: torch.Tensor | None = None

    @classmethod
    def from_index(cls, index: SemanticIdIndex, n_items: int) -> "IdTable":
        return cls(semantic_id_table(index, n_items), index.level_sizes)


class SemanticVocabulary(nn.Module):
    """One space's vocabulary from its ``IdTable``. The collision level gets at least
    ``collision_vocab`` tokens, room for items registered later on a taken content tuple.
    ``prefix_nodes``: number the prefixes (``item_nodes``); ``child_tables``: also the per-level
    child tables that score every child of a prefix (``child_nodes``)."""

    def __init__(self, ids: IdTable, n_items: int, *, collision_vocab: int = 1, prefix_nodes: bool = False,
                 child_tables: bool = False, space: str = "semantic"):
        super().__init__()
        self.space = space
        table, level_sizes, nodes = check_table(ids.codes, n_items, space), ids.level_sizes, ids.nodes
        sizes = [int(s) for s in level_sizes] if level_sizes is not None else (table[1:].max(0).values + 1).tolist()
        sizes[-1] = max(sizes[-1], collision_vocab)
        check_codes(table, sizes)
        self.level_sizes, self.n_tokens = sizes, table.shape[1]
        self.register_buffer("item_codes", table)
        offsets = torch.tensor([0] + sizes[:-1]).cumsum(0)
        # (L + 1,): token c of level l is row offsets[l] + c of a table shared by all levels
        self.register_buffer("level_offsets", offsets, persistent=False)
        if prefix_nodes:
            nodes = prefix_node_table(table) if nodes is None else torch.as_tensor(nodes).long().cpu()
            if nodes.shape != table.shape:
                raise ValueError(f"prefix nodes must match the {space} ID table {tuple(table.shape)}, "
                                 f"got {tuple(nodes.shape)}")
        self.register_buffer("item_nodes", nodes if prefix_nodes else None)  # a None buffer is not saved
        self.node_starts: list[int] = []
        if child_tables:  # derived from the persistent buffers at training time; registration adds no node
            if self.item_nodes is None:
                raise ValueError("child node tables need prefix nodes (prefix_nodes=True)")
            children, self.node_starts = child_node_tables(table, self.item_nodes.cpu())
            for level, child in enumerate(children):
                self.register_buffer(f"child_nodes_{level}", child, persistent=False)
        self._set_trie(table)
        self.register_load_state_dict_post_hook(lambda module, keys: module._set_trie(module.item_codes))

    @property
    def n_token_rows(self) -> int:
        """Rows of a token embedding shared by all levels."""
        return sum(self.level_sizes)

    @property
    def n_nodes(self) -> int:
        """Rows of a prefix-node embedding (node 0: none)."""
        return int(self.item_nodes.max()) + 1 if self.item_nodes is not None else 0

    def has_id(self, items: torch.Tensor) -> torch.Tensor:
        """items (...) -> bool (...): whether each item has an ID in this space (not ``ABSENT``)."""
        return (self.item_codes[items] >= 0).all(-1)

    def tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (..., t) of levels 0..t-1 -> rows of a token embedding shared by all levels."""
        return codes + self.level_offsets[: codes.shape[-1]]

    def _set_trie(self, table: torch.Tensor) -> None:
        table = table.cpu()
        present = (table[1:] >= 0).all(1)  # items without an ID here are not decodable in this space
        index = SemanticIdIndex.from_full_ids(torch.arange(1, len(table))[present], table[1:][present])  # raises on duplicates
        edges = trie_edges(index.transition_table())
        device = self.item_codes.device
        for name, tensor in zip(TrieTable._fields, edges.table):
            self.register_buffer(f"trie_{name}", tensor.to(device), persistent=False)
        self.register_buffer("trie_keys", edges.keys.to(device), persistent=False)
        self._trie_base, self._trie_levels = edges.base, edges.n_levels

    @property
    def trie(self) -> TrieEdges:
        table = TrieTable(*(self.get_buffer(f"trie_{name}") for name in TrieTable._fields))
        return TrieEdges(table, self.trie_keys, self._trie_base, self._trie_levels)

    def child_nodes(self, prefix: torch.Tensor) -> torch.Tensor:
        """prefix (R, t) tokens of levels < t -> (R, V_t) the node each token of level t leads to
        from that prefix (0: none). Needs ``child_tables``."""
        rows = torch.zeros(len(prefix), dtype=torch.long, device=prefix.device)
        for level in range(prefix.shape[1]):
            child = self.get_buffer(f"child_nodes_{level}")
            token = prefix[:, level].clamp(max=child.shape[1] - 1)
            node = torch.where(prefix[:, level] < child.shape[1], child[rows, token], torch.zeros_like(rows))
            rows = torch.where(node > 0, node - self.node_starts[level] + 1, torch.zeros_like(rows))
        return self.get_buffer(f"child_nodes_{prefix.shape[1]}")[rows]

    def fits(self, full_id: Any) -> bool:
        """Whether a full ID's codes are all tokens of this vocabulary."""
        return len(full_id) == self.n_tokens and all(0 <= c < s for c, s in zip(full_id, self.level_sizes))

    @torch.no_grad()
    def prepare_registration(self, new_items: torch.Tensor, full_ids: Any) -> Callable[[], None]:
        """Check that items ``new_items`` (any order; with the table, exactly the ids that follow it)
        can join with their full IDs (k, L + 1), or, with ``full_ids`` None, with no ID in this space
        (``ABSENT`` rows); returns the function that adds them. Nothing changes until it is called,
        so a model with several spaces checks them all first."""
        if full_ids is None:
            full = torch.full((len(new_items), self.n_tokens), ABSENT, dtype=torch.long)
        else:
            full = torch.as_tensor(full_ids, dtype=torch.long).cpu()
            if tuple(full.shape) != (len(new_items), self.n_tokens):
                raise ValueError(f"{self.space} IDs must be ({len(new_items)}, {self.n_tokens}), got {tuple(full.shape)}")
            if (full < 0).any():
                raise ValueError(f"{self.space} IDs must be >= 0, got {full[(full < 0).any(1)][0].tolist()}")
        rows = torch.empty_like(full)
        rows[new_items - len(self.item_codes)] = full
        table = torch.cat([self.item_codes.cpu(), rows])
        check_codes(table, self.level_sizes)
        present = (table[1:] >= 0).all(1)
        SemanticIdIndex.from_full_ids(torch.arange(1, len(table))[present], table[1:][present])  # raises on a repeat
        nodes = None
        if self.item_nodes is not None:
            known = self.item_nodes.cpu()
            nodes = torch.cat([known, extend_prefix_nodes(self.item_codes.cpu(), known, rows)])

        def apply() -> None:
            device = self.item_codes.device
            if nodes is not None:
                self.item_nodes = nodes.to(device)
            self.item_codes = table.to(device)
            self._set_trie(table)

        return apply

    def context(self) -> dict[str, Any]:
        """What model.json records; the table itself is in the weights."""
        return {"shape": list(self.item_codes.shape), "level_sizes": self.level_sizes}


def check_table(table: Any, n_items: int, space: str = "semantic") -> torch.Tensor:
    if table is None:
        raise ValueError(f"this model needs its {space!r} ID table: a LongTensor (n_items + 1, L + 1) of full IDs "
                         "by item id (semantic_id_table(index, n_items) of an ids run)")
    table = torch.as_tensor(table).detach().cpu()
    if table.dtype.is_floating_point or table.dim() != 2 or table.shape[0] != n_items + 1 or table.shape[1] < 2:
        raise ValueError(f"the {space} ID table must be integer ({n_items + 1}, L + 1 >= 2), got {table.dtype} "
                         f"{tuple(table.shape)}")
    absent = (table == ABSENT).all(1)  # items registered with no ID in this space
    if (table[0] != 0).any() or ((table < 0) & ~absent[:, None]).any():
        raise ValueError(f"the {space} ID table must be >= 0 with row 0 (padding) all zeros (a row all {ABSENT}: an "
                         "item with no ID in this space)")
    return table.long().clone()


def check_codes(table: torch.Tensor, sizes: list[int]) -> None:
    if len(sizes) != table.shape[1]:
        raise ValueError(f"level_sizes {sizes} must have one entry per ID token ({table.shape[1]})")
    too_big = table.max(0).values >= torch.tensor(sizes)
    if too_big.any():
        raise ValueError(f"semantic IDs use codes up to {table.max(0).values.tolist()} per level, beyond "
                         f"level_sizes {sizes}: the model has no token for them")
