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
  ``prefix_output_table: separate`` scores with a second node table instead of the one the encoder
  reads (HSTU's and SASRec's ``output_embeddings: separate``, which keeps history items off the top
  there). On Beauty it raised validation but not test, and the gap between history kept and
  excluded stayed as with one table (docs/experiments/tiger.md, 2026-12-04); off by default.
- Optional last-item start (``last_item_start``, off by default): the decoder's start token adds a
  projection of the newest history item's own embedding (its token and node embeddings, never
  dropped), a first-order path from the last item to the next ID beside the encoder's memory, as
  FPMC adds a Markov term to matrix factorisation (Rendle et al. 2010). It targets the
  transitions seen in training, which the count baseline and the ID models reproduce and TIGER
  did not (docs/experiments/tiger.md, 2026-12-04).
- Optional last-item output (``last_item_output``, off by default): a second projection of the same
  embedding is added to the decoder's output state at every level, after the decoder, so each
  logit gains a bilinear term between the last item and the scored code (and node): FPMC's
  factorised transition, straight into the scores rather than through the decoder. Its projection
  starts at zero, so an untrained model scores as without it.
- Cold start: ``register_items`` extends the ID table and trie after training (no retraining),
  as long as the codes fit the level vocabularies (``collision_vocab``: room in the collision level).
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
from recsys.generation.beam import beam_search
from recsys.models.base import Batch, Capabilities, GenerativeRetriever, LossOutput, Recommendation
from recsys.models.layers import (
    Block, DecoderParts, DecoderStart, Dropout, SelfKV, decoder_start, last_item_linears, next_state, reorder_cache,
    with_child_scores,
)
from recsys.models.vocabulary import IdTable, SemanticVocabulary


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
    collision_vocab: int = 16  # tokens of the collision level: room for cold-start items on taken tuples
    # "learned": the collision token's head scores it (a popularity prior among siblings); "content":
    # it adds nothing, so items registered after training rank beside the siblings they tie with
    collision_scoring: str = "learned"
    user_tokens: int = 0  # hashed user buckets whose embedding leads the encoder (paper: 2000); 0 = none
    prefix_embeddings: bool = False  # add each token's prefix-node embedding (Singh et al. 2023, arXiv:2306.08121)
    prefix_dropout: float = 0.0  # training: drop an item's prefix embeddings, so codes alone also read
    prefix_outputs: bool = False  # score each child of the decoded prefix by its (tied) node embedding too
    prefix_output_dropout: float = 0.0  # training: drop that term per row, so the code heads alone also rank
    prefix_output_table: str = "shared"  # separate: score children by a node table of their own
    # the decoder's start token adds a projection of the last history item's own embedding (its
    # tokens and nodes, never dropped): a first-order path from the last item to the next ID
    last_item_start: bool = False
    # the decoder's output states add a second projection of that embedding (zero at init): a
    # bilinear last item x next code term in every level's logits, past the decoder
    last_item_output: bool = False

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
        for flag in ("prefix_embeddings", "prefix_outputs", "last_item_start", "last_item_output"):
            value = getattr(self, flag)
            require(isinstance(value, bool), f"model.{flag} must be true or false, got {value!r}")
        require_range("model.prefix_dropout", self.prefix_dropout, 0.0, 1.0)
        require(not self.prefix_outputs or self.prefix_embeddings,
                "model.prefix_outputs=true scores children by their prefix embeddings: it needs "
                "model.prefix_embeddings=true")
        require_range("model.prefix_output_dropout", self.prefix_output_dropout, 0.0, 1.0)
        require_choice("model.prefix_output_table", self.prefix_output_table, ("shared", "separate"))
        require(self.prefix_outputs or self.prefix_output_table == "shared",
                "model.prefix_output_table=separate is the table of the prefix outputs: it needs "
                "model.prefix_outputs=true")


def user_buckets(users: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Hash user indices (>= 0) into ``n_buckets`` (Knuth's multiplicative hash), so neighbouring
    indices scatter and collisions are random, as with the paper's hashed user ids."""
    if (users < 0).any():
        raise ValueError(f"user indices must be >= 0, got {int(users.min())}")
    return users.long() * 2654435761 % (1 << 32) % n_buckets


class Tiger(GenerativeRetriever):
    """``ids``: {"semantic": IdTable}, the item -> semantic ID table of an ids run (pass the
    codebook sizes as its level sizes, and room in the collision level, to admit cold-start items)."""

    capabilities = Capabilities(id_spaces=("semantic",), registers_items=True, reads_users=True,
                                inference_settings=("beam_size", "collision_scoring"))

    def __init__(self, config: TigerConfig, n_items: int, max_len: int, *, ids: dict[str, IdTable] | None = None):
        self.require_ids(ids)
        vocab = SemanticVocabulary(ids["semantic"], n_items, collision_vocab=config.collision_vocab,
                                   prefix_nodes=config.prefix_embeddings, child_tables=config.prefix_outputs)
        super().__init__(n_items, max_len, {"semantic": vocab})
        self.config, D = config, config.d_model
        self.token_emb = nn.Embedding(vocab.n_token_rows, D)  # one table for every level's tokens
        self.enc_pos = nn.Embedding(max_len * vocab.n_tokens, D)
        self.dec_pos = nn.Embedding(vocab.n_tokens, D)
        self.user_emb = nn.Embedding(config.user_tokens, D) if config.user_tokens else None
        # node 0 (no node: a prefix first seen after training) is the zero padding row
        self.node_emb = nn.Embedding(vocab.n_nodes, D, padding_idx=0) if config.prefix_embeddings else None
        # prefix_output_table=separate: the prefix outputs score by a node table of their own
        self.out_node_emb = nn.Embedding(vocab.n_nodes, D, padding_idx=0) \
            if config.prefix_output_table == "separate" else None
        self.bos = nn.Parameter(torch.zeros(D))
        self.last_item_proj, self.last_item_out = last_item_linears(D, config.last_item_start, config.last_item_output)
        self.drop = Dropout(config.dropout)
        block = dict(d_model=D, n_heads=config.n_heads, d_ff=config.d_ff, dropout=config.dropout,
                     head_dim=config.head_dim, activation="relu")
        self.encoder = nn.ModuleList(Block(**block) for _ in range(config.n_encoder_layers))
        self.decoder = nn.ModuleList(Block(**block, cross=True) for _ in range(config.n_decoder_layers))
        self.enc_ln, self.dec_ln = nn.LayerNorm(D), nn.LayerNorm(D)
        self.heads = nn.ModuleList(nn.Linear(D, v) for v in vocab.level_sizes)
        for emb in (self.token_emb, self.enc_pos, self.dec_pos, self.user_emb, self.node_emb, self.out_node_emb):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)
        for emb in (self.node_emb, self.out_node_emb):
            if emb is not None:
                emb.weight.data[0] = 0
        nn.init.normal_(self.bos, std=0.02)

    @property
    def vocab(self) -> SemanticVocabulary:
        return self.vocabs["semantic"]

    @property
    def output_nodes(self) -> nn.Embedding:
        """The node table the prefix outputs score by (``model.prefix_output_table``)."""
        return self.node_emb if self.out_node_emb is None else self.out_node_emb

    @property
    def item_codes(self) -> torch.Tensor:
        return self.vocab.item_codes

    @property
    def level_sizes(self) -> list[int]:
        return self.vocab.level_sizes

    @property
    def n_tokens(self) -> int:
        return self.vocab.n_tokens

    @property
    def users_required(self) -> bool:
        return self.config.user_tokens > 0

    def beam_width(self, k: int) -> int:
        return max(k, self.config.beam_size)

    @classmethod
    def upgrade_state(cls, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Before 2026-12-03 the ID table and prefix nodes were the model's own buffers (now in
        its vocabulary), and decoder blocks named their parts self_attn, ln1, ln2 (before the
        cross-attention) and ln3 (before the MLP), now attn, ln1, ln_cross and ln2."""
        moved = {"item_codes": "vocabs.semantic.item_codes", "item_nodes": "vocabs.semantic.item_nodes"}
        renames = (".self_attn.", ".attn."), (".ln2.", ".ln_cross."), (".ln3.", ".ln2.")
        old_blocks = any(".self_attn." in key for key in weights)
        out = {}
        for key, value in weights.items():
            if old_blocks and key.startswith("decoder."):
                old, new = next(((o, n) for o, n in renames if o in key), ("", ""))
                key = key.replace(old, new) if old else key
            out[moved.get(key, key)] = value
        return out

    @classmethod
    def context_from_checkpoint(cls, context: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, Any]:
        table, nodes = weights["vocabs.semantic.item_codes"], weights.get("vocabs.semantic.item_nodes")
        # model.json before 2026-12-03: {"semantic_ids_shape": [...], "level_sizes": [...]}
        recorded = context["id_spaces"]["semantic"] if "id_spaces" in context else \
            {"shape": context.get("semantic_ids_shape"), "level_sizes": context.get("level_sizes")}
        if list(table.shape) != list(recorded["shape"] or []):
            raise ValueError(f"the semantic ID table has shape {list(table.shape)}, model.json says "
                             f"{recorded['shape']}")
        return {"ids": {"semantic": IdTable(table, recorded["level_sizes"], nodes)}}

    # --- encoder and decoder -------------------------------------------------------------
    def encode(self, history: torch.Tensor, users: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """history (B, T) -> memory (B, S, D), S = T * (L + 1) (+ 1 with the user token, first),
        and its key mask (B, 1, 1, S). ``users`` (B,) is required when ``user_tokens > 0``."""
        B, T = history.shape
        if T > self.max_len:
            raise ValueError(f"history length {T} exceeds max_len={self.max_len}")
        n, S = self.n_tokens, T * self.n_tokens
        tokens = self.vocab.tokens(self.item_codes[history]).reshape(B, S)  # (B, S)
        positions = torch.arange(self.max_len * n - S, self.max_len * n, device=history.device)  # right-aligned
        x = self.token_emb(tokens) + self.enc_pos(positions)  # (B, S, D)
        if self.node_emb is not None:
            nodes = self.vocab.item_nodes[history]  # (B, T, L + 1)
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

    def start(self, history: torch.Tensor) -> DecoderStart:
        """history (B, T) -> what the decoder starts from: the start token (B, D), BOS plus with
        ``last_item_start`` a projection of the last history item's embedding (the sum of its token
        and node embeddings, without positions or prefix dropout; 0 for an empty history), and with
        ``last_item_output`` a second projection of it for the output states (else None)."""
        B = len(history)
        if self.last_item_proj is None and self.last_item_out is None:
            return DecoderStart(self.bos.expand(B, -1), None)
        last = history[:, -1]  # left padding: the last column is the newest item
        item = self.token_emb(self.vocab.tokens(self.item_codes[last])).sum(1)  # (B, D)
        if self.node_emb is not None:
            item = item + self.node_emb(self.vocab.item_nodes[last]).sum(1)
        return decoder_start(self.bos, item, (last > 0)[:, None], self.last_item_proj, self.last_item_out)

    def decode(self, prefix: torch.Tensor, memory_kv: list, memory_mask: torch.Tensor,
               start: DecoderStart) -> torch.Tensor:
        """prefix (R, t) tokens of levels < t, R = B * G batch-major, start from ``start`` (B rows)
        -> hidden states (R, t + 1, D). Position j has read the start token and prefix[:, :j] and
        predicts level j."""
        R, t = prefix.shape
        G = R // len(start.token)
        tokens = self.token_emb(self.vocab.tokens(prefix))  # (R, t, D)
        first = start.token.repeat_interleave(G, dim=0)[:, None]  # (R, 1, D)
        x = torch.cat([first.to(tokens.dtype), tokens], 1) + self.dec_pos.weight[: t + 1]  # (R, t + 1, D)
        x = self.drop(x)
        for block, kv in zip(self.decoder, memory_kv):
            x = block(x, causal=True, memory_kv=kv, memory_mask=memory_mask)
        x = self.dec_ln(x)
        if start.output is None:
            return x
        return x + start.output.repeat_interleave(G, dim=0)[:, None].to(x.dtype)

    def decode_step(self, prefix: torch.Tensor, cache: list[SelfKV] | None, memory_kv: list,
                    memory_mask: torch.Tensor, start: DecoderStart) -> tuple[torch.Tensor, list[SelfKV]]:
        """Incremental decoding (``next_state``): the state that predicts level prefix.shape[1], (R, D),
        and the cache with its position. Equals ``decode(...)[:, -1]``."""
        parts = DecoderParts(self.token_emb, self.dec_pos.weight, self.drop, self.decoder, self.dec_ln)
        return next_state(parts, self.vocab.tokens(prefix), cache, memory_kv, memory_mask, start)

    def decoder_states(self, history: torch.Tensor, codes: torch.Tensor, users: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """Teacher forcing: history (B, T), target IDs (B, L + 1) -> hidden states (B, L + 1, D)."""
        memory, mask = self.encode(history, users)
        return self.decode(codes[:, :-1], self.memory_kv(memory), mask, self.start(history))

    def logits(self, h: torch.Tensor, prefix: torch.Tensor, drop_nodes: torch.Tensor | None = None) -> torch.Tensor:
        """h (R, D) decoder states for level t = prefix.shape[1], prefix (R, t) -> logits (R, V_t):
        the level's code head, plus with ``prefix_outputs`` h . e(child node) for every child of
        the prefix (0 for a token that leads to no known node). ``drop_nodes`` (R,) bool drops it."""
        level = prefix.shape[1]
        out = self.heads[level](h)
        if not self.config.prefix_outputs:
            return out
        child = self.vocab.child_nodes(prefix)  # (R, V_known)
        if drop_nodes is not None:
            child = child * ~drop_nodes[:, None]
        return with_child_scores(out, h, child, self.output_nodes)

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
        kv, start = self.memory_kv(memory), self.start(batch.history)

        last = self.n_tokens - 1
        cache: list[SelfKV] | None = None  # the decoder's keys and values of the positions so far

        def step(prefix: torch.Tensor, parents: torch.Tensor | None) -> torch.Tensor:  # (R, t) -> (R, V_t)
            nonlocal cache
            level = prefix.shape[1]
            if level == last and self.config.collision_scoring == "content":
                return torch.zeros(len(prefix), self.level_sizes[last], device=prefix.device)
            if parents is not None:
                cache = reorder_cache(cache, parents)
            h, cache = self.decode_step(prefix, cache, kv, mask, start)
            return F.log_softmax(self.logits(h, prefix).float(), dim=-1)

        out = beam_search(step, self.vocab.trie, len(batch.history), k, self.beam_width(k),
                          exclude=batch.history if exclude_history else None)
        return Recommendation(items=out.items, scores=out.scores)
