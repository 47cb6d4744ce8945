"""The contract every sequence model honours: ``loss(batch)`` and ``recommend(batch, k)``.

Evaluation, training, tuning and serving are written once against it (RecBole's
``calculate_loss`` / ``full_sort_predict`` split). ``forward`` is ``loss`` so that DDP, which
only synchronises gradients through ``forward``, wraps any model unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn


@dataclass
class Batch:
    """history: (B, T) item ids, left-padded with 0, newest last.
    targets: (B, T) next item at every position (0 = no target); training only.
    target: (B,) the item to rank; evaluation only.
    users: (B,) user index of each row (``EvalSet.user_index``, ``split.train_users``), for
    models that condition on the user (TIGER's user token); others ignore it.
    """

    history: torch.Tensor
    targets: torch.Tensor | None = None
    target: torch.Tensor | None = None
    users: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.history), move(self.targets), move(self.target), move(self.users))


class Recommendation(NamedTuple):
    items: torch.Tensor  # (B, k) item ids, best first; never 0
    scores: torch.Tensor  # (B, k) the model's scores for them, descending


class SequenceModel(nn.Module):
    """Base class. Subclasses implement ``loss`` and ``recommend``."""

    # True for generative retrievers: build_model then needs the ids stage's semantic-ID table.
    needs_semantic_ids: bool = False

    def __init__(self, n_items: int, max_len: int):
        super().__init__()
        if n_items < 1:
            raise ValueError(f"n_items={n_items} is out of range; allowed: >= 1")
        if max_len < 1:
            raise ValueError(f"max_len={max_len} is out of range; allowed: >= 1")
        self.n_items = n_items
        self.max_len = max_len

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss(batch)

    def loss(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement loss()")

    def recommend(self, batch: Batch, k: int, exclude_history: bool = False) -> Recommendation:
        raise NotImplementedError(f"{type(self).__name__} must implement recommend()")


class AtomicIdModel(SequenceModel):
    """A model that scores every item id at once (SASRec, HSTU): ranking is a top-k."""

    def score_items(self, history: torch.Tensor) -> torch.Tensor:
        """history: (B, T) -> scores (B, n_items + 1) for the next item; column 0 is padding."""
        raise NotImplementedError

    @torch.no_grad()
    def recommend(self, batch: Batch, k: int, exclude_history: bool = False) -> Recommendation:
        if not 1 <= k <= self.n_items:
            raise ValueError(f"k={k} is out of range; allowed: 1 <= k <= {self.n_items} (the catalogue size)")
        scores = self.score_items(batch.history).float()  # (B, N + 1)
        scores[:, 0] = float("-inf")
        if exclude_history:
            scores.scatter_(1, batch.history, float("-inf"))  # padding 0 is already -inf
        top = torch.topk(scores, k, dim=1)
        return Recommendation(items=top.indices, scores=top.values)
