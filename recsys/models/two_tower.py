"""Two-tower retriever: Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
Recommendations (Yi et al., RecSys 2019), https://doi.org/10.1145/3298689.3346996.

Its item vectors are EAGER's behaviour embeddings (``recsys ids --from-train RUN``) and, being
an inner-product model, it is served from a maximum-inner-product index (``recsys.ann``).

- **User tower**: a small causal transformer over the history (``layers.CausalEncoder``, as in
  SASRec). The paper's user tower is an MLP over pooled features; a causal encoder lets every
  position of a history be a training example (its state summarises the items up to it), which
  on short, sparse histories such as Beauty's gives ~20x the examples of one per user, and it
  keeps the order of the history, which mean pooling loses.
- **Item tower**: the item's ID embedding, shared with the user tower's input table (as in
  SASRec: on sparse data each row then learns from both roles), plus, with ``content: true``, a
  learned linear projection (no bias) of the item's content vector from an embed run (``recsys
  train --embed RUN``). The vectors are kept in the checkpoint (a served model scores from them).
  The user tower still reads ID embeddings only.
- **Loss**: in-batch softmax over the batch's targets on L2-normalised towers with a
  temperature, and the logQ correction s(u, i) / tau - log p_i (``losses.InBatchSoftmaxLoss``);
  columns that are the row's positive or an item the user already has are masked.
- **p_i**: the paper's streaming estimate (``log_q: streaming``, alpha = 0.01), item ids as the
  hash (no collisions at our catalogue sizes); or counts of the training targets as they come
  (``counts``); or no correction (``off``). The estimate is updated only in training mode and is
  kept in buffers, so checkpoints carry it.
Scores are cosine similarities (the temperature and the correction only shape training), so the
user and item vectors are returned normalised and an inner-product index ranks exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from recsys.config import require, require_choice, require_range
from recsys.models.base import Batch, Capabilities, LossOutput, item_vector_table
from recsys.models.losses import InBatchSoftmaxLoss, ItemFrequency, seen_in_history
from recsys.models.sasrec import SelfAttentiveModel, require_self_attentive

LOG_Q = ("streaming", "counts", "off")


@dataclass
class TwoTowerConfig:
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    d_ff: int = 256
    dropout: float = 0.2
    emb_dropout: float = 0.2
    temperature: float = 0.05  # softmax temperature over cosine similarities
    log_q: str = "streaming"  # p_i of the logQ correction: streaming (Yi et al.) | counts | off
    alpha: float = 0.01  # streaming: EMA rate of the gap between sightings (the paper's 0.01)
    content: bool = False  # item tower + W c_i, c_i the item's content vector (train with --embed)

    def __post_init__(self):
        require_self_attentive(self)
        require(self.temperature > 0, f"model.temperature={self.temperature} is out of range; allowed: > 0")
        require_choice("model.log_q", self.log_q, LOG_Q)
        require(0 < self.alpha <= 1, f"model.alpha={self.alpha} is out of range; allowed: 0 < model.alpha <= 1")
        require(isinstance(self.content, bool), f"model.content must be true or false, got {self.content!r}")


class TwoTower(SelfAttentiveModel):
    """The user tower is SASRec's encoder (``encode``: states not normalised); the item tower is the
    item table it reads, so each row learns from both roles."""

    capabilities = Capabilities(item_vectors=True, content_vectors=True, min_batch_size=2)

    def __init__(self, config: TwoTowerConfig, n_items: int, max_len: int,
                 content_vectors: torch.Tensor | None = None):
        super().__init__(n_items, max_len, d_model=config.d_model, n_heads=config.n_heads, d_ff=config.d_ff,
                         n_layers=config.n_layers, dropout=config.dropout, emb_dropout=config.emb_dropout)
        self.config = config
        self.loss_fn = InBatchSoftmaxLoss(config.temperature)
        self.frequency = None if config.log_q == "off" else ItemFrequency(n_items, config.log_q, config.alpha)
        if config.content and content_vectors is None:
            raise ValueError("model.content=true projects each item's content vector into the item tower: train with "
                             "--embed EMBED_RUN (a `recsys embed` run over the same data)")
        if content_vectors is not None and not config.content:
            raise ValueError("content vectors were given (--embed) but model.content=false: set model.content=true "
                             "to use them, or leave --embed out")
        self.content_proj = None
        if content_vectors is not None:
            content_vectors = item_vector_table(content_vectors, n_items, "content_vectors")
            self.register_buffer("content_vectors", content_vectors)
            self.content_proj = nn.Linear(content_vectors.shape[1], config.d_model, bias=False)

    @classmethod
    def context_from_checkpoint(cls, context: dict, weights: dict[str, torch.Tensor]) -> dict:
        return {"content_vectors": weights["content_vectors"]} if "content_vectors" in weights else {}

    def item_tower(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """Item vectors, not normalised: of ``items`` (any shape) -> (..., D), or of every row
        (N + 1, D) when None. Row 0 (padding) is 0."""
        ids = self.item_emb.weight if items is None else self.item_emb(items)
        if self.content_proj is None:
            return ids
        content = self.content_vectors if items is None else self.content_vectors[items]
        return ids + self.content_proj(content)  # no bias: padding's zero vector stays 0

    def user_embedding(self, batch: Batch) -> torch.Tensor:
        """batch.history (B, T) -> (B, D), L2-normalised: the newest position's state."""
        return F.normalize(self.encode(batch.history)[:, -1], dim=-1)

    def item_embeddings(self) -> torch.Tensor:
        """(N, D), L2-normalised: row i - 1 is item i (the padding row 0 is left out)."""
        return F.normalize(self.item_tower()[1:], dim=-1)

    def score_items(self, batch: Batch) -> torch.Tensor:
        items = F.normalize(self.item_tower(), dim=-1)  # (N + 1, D); the zero padding row stays 0
        return self.user_embedding(batch) @ items.T  # (B, N + 1) cosine similarities

    def loss(self, batch: Batch) -> LossOutput:
        """In-batch softmax at every position with a target; the negatives are the batch's other
        targets. In training mode the batch's targets first update the frequency estimate."""
        h = self.encode(batch.history)  # (B, T, D)
        keep = batch.targets > 0  # (B, T)
        targets = batch.targets[keep]  # (P,)
        log_q = None
        if self.frequency is not None:
            if self.training:
                self.frequency.update(targets)
            log_q = self.frequency.log_prob(targets)  # (P,)
        seen = seen_in_history(batch.history, keep, targets, self.n_items)  # (P, P)
        return self.loss_fn(h[keep], self.item_tower(targets), targets, log_q=log_q, seen=seen)
