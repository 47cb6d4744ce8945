"""TIGER: Recommender Systems with Generative Retrieval (Rajput et al., 2023), arXiv:2305.05065.

Each history item becomes its semantic ID (L content codes + the collision code); an encoder
reads the flattened tokens and a decoder generates the next item's ID level by level, decoded
by beam search constrained to IDs that exist (``recsys.generation``).

Departures from the paper:
- Learned absolute positions over the flattened history (right-aligned, like SASRec) and
  pre-norm LayerNorm blocks, instead of T5's relative position buckets and RMSNorm: simpler,
  and the encoder input is short (at most max_len * (L + 1) tokens).
- The user token is optional and off by default (``user_tokens=0``); the paper hashes users
  into 2000 tokens. With it on, the hashed user's embedding leads the encoder input, and every
  batch must carry ``users``.
- One target per row, the item after the whole history (``targets[:, -1]``; rows with 0 are
  ignored). The paper trains on every prefix of each sequence; here the training windows
  must supply those prefixes.
- Decoding is constrained by the trie, so no invalid ID can come out (the paper decodes
  freely and reports the invalid-ID rate). Scores are the model's sequence log-probabilities,
  not renormalised over the allowed tokens.
- ``exclude_history`` masks history items at the leaf and widens the beam by the history
  length (see ``beam_search``); the paper does not exclude.
- Optional prefix embeddings (``prefix_embeddings``, off by default): each history token also
  adds a learned embedding of its ID prefix, so an item is more than codes whose meaning
  depends on the codes before them (hierarchical k-means numbers the children of each cluster
  independently). Items registered later share their known prefixes' embeddings; a new full ID
  has none (a zero row), so it is read by its codes alone.
- Optional prefix outputs (``prefix_outputs``, with prefix embeddings; off by default): the logit
  of token c of level l also adds h . e(node(prefix, c)), the same node embedding the encoder
  reads (tied), so every child of a prefix is scored by a vector of its own, not only by a code
  vector shared by all parents (the per-item output embeddings of SASRec, within the trie).
  Items registered later have no node of their own (zero row) and score by their code alone.
- Cold start: ``register_items`` extends the ID table and trie after training, so new items
  are decodable without retraining, as long as their codes fit the level vocabularies (the
  collision level has ``collision_vocab`` tokens, room beyond what the training IDs use).
The decoder reads the encoder's per-level token embeddings (one vocabulary, as in T5); output
heads are separate per level. The paper's sizes are the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recsys.config import require, require_choice, require_range
from recsys.generation.beam import TrieEdges, beam_search, trie_edges
from recsys.models.base import Batch, Capabilities, LossOutput, Recommendation, Retriever
from recsys.models.layers import Block
from recsys.semantic_ids.index import SemanticIdIndex, TrieTable


@dataclass
class TigerConfig:
    d_model: int = 128
    n_encoder_layers: int = 4
    n_decoder_layers: int = 4
    n_heads: int = 6
    head_dim: int = 64  # attention width is n_heads * head_dim (384 by default), not d_model
    d_ff: int = 1024
    dropout: float = 0.1
    beam_size: int = 20  # recommend() searches with max(k, beam_size) beams
    # Vocabulary of the collision level (the last ID token), at least what the IDs use: room for
    # cold-start items that land on a content tuple already taken (see ``register_items``).
    collision_vocab: int = 16
    # How decoding scores the collision token: "learned" by its head (a popularity prior among
    # items sharing content codes), or "content": it adds nothing, so an item scores as its
    # content codes and ties with the items that share them. "content" lets items registered
    # after training, whose collision token was never a target, rank beside their siblings.
    collision_scoring: str = "learned"
    # Hashed user token: users fall into this many buckets, each with a learned embedding that
    # leads the encoder input (the paper: 2000). 0 = no user token.
    user_tokens: int = 0
    # Each history token also gets the embedding of its ID prefix (its trie node: the codes of
    # levels <= l), beside the shared per-level code embedding, so a history item has a
    # representation of its own, not only codes whose meaning changes with the prefix (the
    # prefix n-grams of Singh et al. 2023, arXiv:2306.08121). Off in the paper.
    prefix_embeddings: bool = False
    # Training only: each history item's prefix embeddings are dropped (all levels together) with
    # this probability, so the model also learns to read an item by its codes alone, as it must
    # for items registered after training, and cannot lean on memorised item embeddings only.
    prefix_dropout: float = 0.0
    # Needs prefix_embeddings: each level's logits also score every child of the decoded prefix by
    # its node embedding (tied to the input one), so the head is not one code vector per token
    # shared by every parent. Off in the paper.
    prefix_outputs: bool = False
    # Training only: the node term of a row's logits is dropped with this probability (all levels
    # together), so the code heads alone also rank, as they must for items registered later.
    prefix_output_dropout: float = 0.0

    def __post_init__(self):
        require_range("model.d_model", self.d_model, 1, 4096)
        require_range("model.n_encoder_layers", self.n_encoder_layers, 1, 48)
        require_range("model.n_decoder_layers", self.n_decoder_layers, 1, 48)
        require_range("model.n_heads", self.n_heads, 1, 256)
        require_range("model.head_dim", self.head_dim, 1, 1024)
        require_range("model.d_ff", self.d_ff, 1, 65536)
        require_range("model.dropout", self.dropout, 0.0, 0.95)
        require_range("model.beam_size", self.beam_size, 1, 100000)
        require_range("model.collision_vocab", self.collision_vocab, 1, 1 << 20)
        require_choice("model.collision_scoring", self.collision_scoring, ("learned", "content"))
        require_range("model.user_tokens", self.user_tokens, 0, 1 << 24)
        require(isinstance(self.prefix_embeddings, bool),
                f"model.prefix_embeddings must be true or false, got {self.prefix_embeddings!r}")
        require_range("model.prefix_dropout", self.prefix_dropout, 0.0, 1.0)
        require(isinstance(self.prefix_outputs, bool),
                f"model.prefix_outputs must be true or false, got {self.prefix_outputs!r}")
        require(not self.prefix_outputs or self.prefix_embeddings,
                "model.prefix_outputs=true scores children by their prefix embeddings: it needs "
                "model.prefix_embeddings=true")
        require_range("model.prefix_output_dropout", self.prefix_output_dropout, 0.0, 1.0)


def semantic_id_table(index: SemanticIdIndex, n_items: int) -> torch.Tensor:
    """The ``semantic_ids`` TIGER is built with: (n_items + 1, L + 1) full IDs by item id,
    row 0 zeros (padding). Every item 1..n_items must be in the index (KeyError otherwise)."""
    full = index.ids_for(torch.arange(1, n_items + 1))  # (N, L + 1)
    return torch.cat([full.new_zeros(1, full.shape[1]), full])


def _prefix_node_table(table: torch.Tensor) -> torch.Tensor:
    """(n_items + 1, L + 1) full IDs -> (n_items + 1, L + 1) prefix-node ids: entry (i, l) numbers
    the distinct prefix ``table[i, :l + 1]``, from 1 over all levels; row 0 (padding) is 0."""
    nodes = torch.zeros_like(table)
    start = 1
    for level in range(table.shape[1]):
        _, inverse = torch.unique(table[1:, :level + 1], dim=0, return_inverse=True)
        nodes[1:, level] = inverse + start
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
    codes, ids = table[1:], nodes[1:]
    starts = [int(ids[:, l][ids[:, l] > 0].min()) if (ids[:, l] > 0).any() else 1 for l in range(table.shape[1])]
    tables, rows = [], torch.zeros(len(codes), dtype=torch.long)
    for level in range(table.shape[1]):
        n_rows = 1 if level == 0 else int(ids[:, level - 1].max()) - starts[level - 1] + 2
        child = torch.zeros(n_rows, int(codes[:, level].max()) + 1, dtype=torch.long)
        child[rows, codes[:, level]] = ids[:, level]
        tables.append(child)
        rows = torch.where(ids[:, level] > 0, ids[:, level] - starts[level] + 1, torch.zeros_like(rows))
    return tables, starts


def user_buckets(users: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Hash user indices (>= 0) into ``n_buckets`` (Knuth's multiplicative hash), so neighbouring
    indices scatter and collisions are random, as with the paper's hashed user ids."""
    if (users < 0).any():
        raise ValueError(f"user indices must be >= 0, got {int(users.min())}")
    return users.long() * 2654435761 % (1 << 32) % n_buckets


class Tiger(Retriever):
    """``semantic_ids``: (n_items + 1, L + 1) full IDs by item id, row 0 zeros (see
    ``semantic_id_table``). ``level_sizes``: vocabulary per level (default: the table's max + 1;
    pass the codebook sizes, and room in the collision level, to admit cold-start items)."""

    capabilities = Capabilities(id_spaces=("semantic",), registers_items=True, reads_users=True)

    def __init__(self, config: TigerConfig, n_items: int, max_len: int, *, semantic_ids: Any = None,
                 level_sizes: list[int] | None = None, prefix_nodes: Any = None):
        super().__init__(n_items, max_len)
        table = _check_table(semantic_ids, n_items)
        sizes = [int(s) for s in level_sizes] if level_sizes is not None else (table[1:].max(0).values + 1).tolist()
        sizes[-1] = max(sizes[-1], config.collision_vocab)
        _check_codes(table, sizes)
        self.config, self.level_sizes, self.n_tokens = config, sizes, table.shape[1]
        D = config.d_model
        self.register_buffer("item_codes", table)  # persistent: saved in model.safetensors
        offsets = torch.tensor([0] + sizes[:-1]).cumsum(0)
        self.register_buffer("level_offsets", offsets, persistent=False)  # (L + 1,)
        self.token_emb = nn.Embedding(sum(sizes), D)  # token c of level l is row level_offsets[l] + c
        self.enc_pos = nn.Embedding(max_len * self.n_tokens, D)
        self.dec_pos = nn.Embedding(self.n_tokens, D)
        self.user_emb = nn.Embedding(config.user_tokens, D) if config.user_tokens else None
        self.node_emb = None
        if config.prefix_embeddings:
            # persistent: node numbers are fixed at training time; items registered later reuse
            # them for known prefixes and get 0 (the zero padding row) for new ones
            nodes = _prefix_node_table(table) if prefix_nodes is None else torch.as_tensor(prefix_nodes).long().cpu()
            if nodes.shape != table.shape:
                raise ValueError(f"prefix_nodes must match semantic_ids {tuple(table.shape)}, got {tuple(nodes.shape)}")
            self.register_buffer("item_nodes", nodes)
            self.node_emb = nn.Embedding(int(self.item_nodes.max()) + 1, D, padding_idx=0)
        self._node_starts: list[int] = []
        if config.prefix_outputs:
            # derived from the persistent item_codes and item_nodes (not saved); items registered
            # later add no node, so the tables never change after training
            children, self._node_starts = child_node_tables(table, self.item_nodes.cpu())
            for level, child in enumerate(children):
                self.register_buffer(f"child_nodes_{level}", child, persistent=False)
        self.bos = nn.Parameter(torch.zeros(D))
        self.drop = nn.Dropout(config.dropout)
        block = dict(d_model=D, n_heads=config.n_heads, d_ff=config.d_ff, dropout=config.dropout,
                     head_dim=config.head_dim, activation="relu")
        self.encoder = nn.ModuleList(Block(**block) for _ in range(config.n_encoder_layers))
        self.decoder = nn.ModuleList(Block(**block, cross=True) for _ in range(config.n_decoder_layers))
        self.enc_ln, self.dec_ln = nn.LayerNorm(D), nn.LayerNorm(D)
        self.heads = nn.ModuleList(nn.Linear(D, v) for v in sizes)
        for emb in (self.token_emb, self.enc_pos, self.dec_pos, self.user_emb, self.node_emb):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)
        if self.node_emb is not None:
            self.node_emb.weight.data[0] = 0
        nn.init.normal_(self.bos, std=0.02)
        self._set_trie(table)
        self.register_load_state_dict_post_hook(_rebuild_trie)  # the trie follows a loaded table

    # --- the ID table and its trie -------------------------------------------------------
    def _set_trie(self, table: torch.Tensor) -> None:
        """Build the trie of the IDs in ``table`` (non-persistent buffers: derived, not saved)."""
        index = SemanticIdIndex.from_full_ids(torch.arange(1, len(table)), table[1:].cpu())  # raises on duplicates
        edges = trie_edges(index.transition_table())
        device = self.item_codes.device
        for name, tensor in zip(TrieTable._fields, edges.table):
            self.register_buffer(f"trie_{name}", tensor.to(device), persistent=False)
        self.register_buffer("trie_keys", edges.keys.to(device), persistent=False)
        self._trie_base, self._trie_levels = edges.base, edges.n_levels

    @property
    def trie(self) -> TrieEdges:
        table = TrieTable(*(getattr(self, f"trie_{name}") for name in TrieTable._fields))
        return TrieEdges(table, self.trie_keys, self._trie_base, self._trie_levels)

    @property
    def users_required(self) -> bool:
        return self.config.user_tokens > 0

    def beam_width(self, k: int) -> int:
        return max(k, self.config.beam_size)

    def item_ids(self, space: str, items: torch.Tensor) -> torch.Tensor:
        if space != "semantic":
            return super().item_ids(space, items)
        return self.item_codes[items]

    @torch.no_grad()
    def register_items(self, item_ids: Any, ids: dict[str, Any]) -> None:
        """Cold start: add items ``n_items + 1 .. n_items + n`` (any order) with full IDs
        ``ids["semantic"]`` (n, L + 1), e.g. from ``SemanticIdIndex.add_many``. They become
        decodable and usable in histories without retraining; no weight changes. Codes must fit
        ``level_sizes``."""
        if set(ids) != {"semantic"}:
            raise ValueError(f"TIGER registers items by their 'semantic' IDs only, got spaces {sorted(ids)}")
        new = torch.as_tensor(item_ids, dtype=torch.long).reshape(-1).cpu()
        full = torch.as_tensor(ids["semantic"], dtype=torch.long).cpu()
        n = len(new)
        if tuple(full.shape) != (n, self.n_tokens):
            raise ValueError(f"semantic IDs must be ({n}, {self.n_tokens}), got {tuple(full.shape)}")
        expected = torch.arange(self.n_items + 1, self.n_items + n + 1)
        if not torch.equal(new.sort().values, expected):
            raise ValueError(f"new item ids must be exactly {self.n_items + 1}..{self.n_items + n} "
                             f"(ids index the semantic-ID table), got {new.tolist()[:10]}")
        rows = torch.empty_like(full)
        rows[new - self.n_items - 1] = full
        table = torch.cat([self.item_codes.cpu(), rows])
        _check_codes(table, self.level_sizes)
        self._set_trie(table)  # raises on a repeated ID before anything changes
        if self.node_emb is not None:
            new_nodes = extend_prefix_nodes(self.item_codes.cpu(), self.item_nodes.cpu(), rows)
            self.item_nodes = torch.cat([self.item_nodes, new_nodes.to(self.item_nodes.device)])
        self.item_codes = table.to(self.item_codes.device)
        self.n_items += n

    def checkpoint_context(self) -> dict[str, Any]:
        """Recorded in model.json; the table itself is the ``item_codes`` weight."""
        return {"semantic_ids_shape": list(self.item_codes.shape), "level_sizes": self.level_sizes}

    @classmethod
    def upgrade_state(cls, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Before 2026-12-03 decoder blocks named their parts self_attn, ln1, ln2 (before the
        cross-attention) and ln3 (before the MLP); the shared ``Block`` names them attn, ln1,
        ln_cross and ln2."""
        renames = (".self_attn.", ".attn."), (".ln2.", ".ln_cross."), (".ln3.", ".ln2.")
        if not any(".self_attn." in key for key in weights):
            return weights
        out = {}
        for key, value in weights.items():
            if key.startswith("decoder."):
                for old, new in renames:
                    if old in key:
                        key = key.replace(old, new)
                        break
            out[key] = value
        return out

    @classmethod
    def context_from_checkpoint(cls, meta: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
        table = state["item_codes"]
        if list(table.shape) != list(meta["semantic_ids_shape"]):
            raise ValueError(f"item_codes has shape {list(table.shape)}, model.json says {meta['semantic_ids_shape']}")
        context = {"semantic_ids": table, "level_sizes": meta["level_sizes"]}
        if "item_nodes" in state:  # node numbers as trained, also for items registered after training
            context["prefix_nodes"] = state["item_nodes"]
        return context

    # --- encoder and decoder -------------------------------------------------------------
    def encode(self, history: torch.Tensor, users: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """history (B, T) -> memory (B, S, D), S = T * (L + 1) (+ 1 with the user token, first),
        and its key mask (B, 1, 1, S). ``users`` (B,) is required when ``user_tokens > 0``."""
        B, T = history.shape
        if T > self.max_len:
            raise ValueError(f"history length {T} exceeds max_len={self.max_len}")
        n, S = self.n_tokens, T * self.n_tokens
        codes = self.item_codes[history].reshape(B, S)  # (B, S)
        levels = torch.arange(n, device=history.device).repeat(T)  # (S,)
        positions = torch.arange(self.max_len * n - S, self.max_len * n, device=history.device)  # right-aligned
        x = self.token_emb(codes + self.level_offsets[levels]) + self.enc_pos(positions)  # (B, S, D)
        if self.node_emb is not None:
            nodes = self.item_nodes[history]  # (B, T, L + 1)
            if self.training and self.config.prefix_dropout > 0:
                kept = torch.rand(B, T, 1, device=history.device) >= self.config.prefix_dropout
                nodes = nodes * kept  # node 0 is the zero row
            x = x + self.node_emb(nodes.reshape(B, S))
        valid = (history > 0).repeat_interleave(n, dim=1)  # (B, S)
        valid[:, -1] |= ~valid.any(1)  # an empty history still has one key (no NaN); left padding keeps it last
        if self.user_emb is not None:
            if users is None or users.shape != (B,):
                raise ValueError(f"this TIGER has a user token (model.user_tokens={self.config.user_tokens}): "
                                 f"batch.users must give the user index of each of the {B} rows, got "
                                 f"{None if users is None else tuple(users.shape)}")
            x = torch.cat([self.user_emb(user_buckets(users, self.config.user_tokens))[:, None], x], 1)
            valid = torch.cat([valid.new_ones(B, 1), valid], 1)
        mask = valid[:, None, None, :]  # (B, 1, 1, S)
        x = self.drop(x)
        for block in self.encoder:
            x = block(x, mask=mask)
        return self.enc_ln(x), mask

    def memory_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys/values per decoder layer, computed once per batch."""
        return [block.cross.keys_values(memory) for block in self.decoder]

    def decode(self, prefix: torch.Tensor, memory_kv: list, memory_mask: torch.Tensor) -> torch.Tensor:
        """prefix (R, t) tokens of levels < t, R = B * G batch-major -> hidden states (R, t + 1, D).
        Position j has read BOS and prefix[:, :j] and predicts level j."""
        R, t = prefix.shape
        tokens = self.token_emb(prefix + self.level_offsets[:t])  # (R, t, D)
        x = torch.cat([self.bos.expand(R, 1, -1), tokens], 1) + self.dec_pos.weight[: t + 1]  # (R, t + 1, D)
        x = self.drop(x)
        for block, kv in zip(self.decoder, memory_kv):
            x = block(x, causal=True, memory_kv=kv, memory_mask=memory_mask)
        return self.dec_ln(x)

    def decoder_states(self, history: torch.Tensor, codes: torch.Tensor, users: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """Teacher forcing: history (B, T), target IDs (B, L + 1) -> hidden states (B, L + 1, D)."""
        memory, mask = self.encode(history, users)
        return self.decode(codes[:, :-1], self.memory_kv(memory), mask)

    def _parent_rows(self, prefix: torch.Tensor) -> torch.Tensor:
        """prefix (R, t) tokens -> (R,) row of ``child_nodes_t`` for the prefix's node."""
        rows = torch.zeros(len(prefix), dtype=torch.long, device=prefix.device)
        for level in range(prefix.shape[1]):
            child = getattr(self, f"child_nodes_{level}")
            token = prefix[:, level].clamp(max=child.shape[1] - 1)
            node = torch.where(prefix[:, level] < child.shape[1], child[rows, token], torch.zeros_like(rows))
            rows = torch.where(node > 0, node - self._node_starts[level] + 1, torch.zeros_like(rows))
        return rows

    def logits(self, h: torch.Tensor, prefix: torch.Tensor, drop_nodes: torch.Tensor | None = None) -> torch.Tensor:
        """h (R, D) decoder states for level t = prefix.shape[1], prefix (R, t) -> logits (R, V_t):
        the level's code head, plus with ``prefix_outputs`` h . e(child node) for every child of
        the prefix (0 for a token that leads to no known node). ``drop_nodes`` (R,) bool drops it."""
        level = prefix.shape[1]
        out = self.heads[level](h)
        if not self.config.prefix_outputs:
            return out
        child = getattr(self, f"child_nodes_{level}")[self._parent_rows(prefix)]  # (R, V_known)
        if drop_nodes is not None:
            child = child * ~drop_nodes[:, None]
        step = max(1, (1 << 23) // (child.shape[1] * h.shape[1]))  # bound the (rows, V, D) gather
        bias = torch.cat([torch.einsum("rvd,rd->rv", self.node_emb(child[i:i + step]).to(h.dtype), h[i:i + step])
                          for i in range(0, len(h), step)])
        return torch.cat([out[:, :bias.shape[1]] + bias, out[:, bias.shape[1]:]], 1)

    def token_log_probs(self, history: torch.Tensor, items: torch.Tensor, users: torch.Tensor | None = None
                        ) -> torch.Tensor:
        """history (B, T), items (B,) -> log p(token l of the item's ID | history, tokens < l), (B, L + 1)."""
        codes = self.item_codes[items]  # (B, L + 1)
        h = self.decoder_states(history, codes, users)  # (B, L + 1, D)
        drop = None
        if self.training and self.config.prefix_outputs and self.config.prefix_output_dropout > 0:
            drop = torch.rand(len(items), device=items.device) < self.config.prefix_output_dropout
        out = [F.log_softmax(self.logits(h[:, l], codes[:, :l], drop).float(), -1).gather(1, codes[:, l:l + 1])
               for l in range(self.n_tokens)]
        return torch.cat(out, 1)

    # --- the contract --------------------------------------------------------------------
    def loss(self, batch: Batch) -> LossOutput:
        """Mean token cross-entropy of the next item's ID; target = ``targets[:, -1]`` (else
        ``target``), rows whose target is 0 are ignored. Parts: each level's cross-entropy."""
        target = batch.targets[:, -1] if batch.targets is not None else batch.target
        if target is None:
            raise ValueError("TIGER's loss needs batch.targets (training windows) or batch.target")
        log_probs = self.token_log_probs(batch.history, target, batch.users)  # (B, L + 1)
        keep = (target > 0).float()  # masked, not indexed: same graph on every DDP rank
        count = keep.sum().clamp(min=1.0)
        total = (-log_probs.mean(1) * keep).sum() / count
        parts = {f"ce_level{l}": (-log_probs[:, l].detach() * keep).sum() / count for l in range(self.n_tokens)}
        return LossOutput(total, parts)

    @torch.no_grad()
    def recommend(self, batch: Batch, k: int, exclude_history: bool = False) -> Recommendation:
        """Constrained beam search with max(k, beam_size) beams; scores are log-probabilities."""
        self.check_k(k)
        memory, mask = self.encode(batch.history, batch.users)
        kv = self.memory_kv(memory)

        last = self.n_tokens - 1

        def step(prefix: torch.Tensor) -> torch.Tensor:  # (R, t) -> (R, V_t)
            level = prefix.shape[1]
            if level == last and self.config.collision_scoring == "content":
                return torch.zeros(len(prefix), self.level_sizes[last], device=prefix.device)
            h = self.decode(prefix, kv, mask)[:, -1]
            return F.log_softmax(self.logits(h, prefix).float(), dim=-1)

        out = beam_search(step, self.trie, len(batch.history), k, self.beam_width(k),
                          exclude=batch.history if exclude_history else None)
        return Recommendation(items=out.items, scores=out.scores)


def _rebuild_trie(module: Tiger, incompatible_keys: Any) -> None:
    module._set_trie(module.item_codes)


def _check_table(semantic_ids: Any, n_items: int) -> torch.Tensor:
    if semantic_ids is None:
        raise ValueError("TIGER needs semantic_ids: a LongTensor (n_items + 1, L + 1) of full IDs by item id; "
                         "pass build_model(..., semantic_ids=semantic_id_table(index, n_items))")
    table = torch.as_tensor(semantic_ids).detach().cpu()
    if table.dtype.is_floating_point or table.dim() != 2 or table.shape[0] != n_items + 1 or table.shape[1] < 2:
        raise ValueError(f"semantic_ids must be integer ({n_items + 1}, L + 1 >= 2), got {table.dtype} "
                         f"{tuple(table.shape)}")
    if (table[0] != 0).any() or (table < 0).any():
        raise ValueError("semantic_ids must be >= 0 with row 0 (padding) all zeros")
    return table.long().clone()


def _check_codes(table: torch.Tensor, sizes: list[int]) -> None:
    if len(sizes) != table.shape[1]:
        raise ValueError(f"level_sizes {sizes} must have one entry per ID token ({table.shape[1]})")
    too_big = table.max(0).values >= torch.tensor(sizes)
    if too_big.any():
        raise ValueError(f"semantic IDs use codes up to {table.max(0).values.tolist()} per level, beyond "
                         f"level_sizes {sizes}: the model has no token for them")
