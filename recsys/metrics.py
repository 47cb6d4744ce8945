"""Full-ranking top-K metrics for leave-one-out evaluation (one target item per user).

Recall@K is 1 when the target is among the top K, else 0. NDCG@K is ``1 / log2(rank + 2)``
with a 0-based rank when the target is among the top K, else 0: with a single relevant item
the ideal DCG is 1, so no normaliser is needed. Both are averaged over users.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

DEFAULT_KS = (5, 10, 20)


def target_ranks(top_items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target in its ranked list, or -1 when absent.

    top_items: (B, K) item ids, best first. targets: (B,). Returns (B,) int64.
    """
    hits = top_items == targets.unsqueeze(1)  # (B, K)
    found = hits.any(dim=1)
    rank = hits.to(torch.int64).argmax(dim=1)
    return torch.where(found, rank, torch.full_like(rank, -1))


@dataclass
class RankingMetrics:
    """Accumulates Recall@K and NDCG@K sums over batches; ``summary()`` gives the means."""

    ks: tuple[int, ...] = DEFAULT_KS
    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def update(self, top_items: torch.Tensor, targets: torch.Tensor) -> None:
        """top_items: (B, K >= max(ks)) ranked item ids; targets: (B,)."""
        if top_items.shape[1] < max(self.ks):
            raise ValueError(f"need at least {max(self.ks)} ranked items, got {top_items.shape[1]}")
        ranks = target_ranks(top_items, targets).cpu().numpy()
        for name, value in ranks_to_sums(ranks, self.ks).items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.count += len(ranks)

    def merge_sums(self, sums: dict[str, float], count: int) -> None:
        """Add partial sums computed elsewhere (e.g. by another DDP rank)."""
        for name, value in sums.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.count += count

    def summary(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("no users were evaluated")
        return {name: self.sums[name] / self.count for name in metric_names(self.ks)}


def metric_names(ks: tuple[int, ...] = DEFAULT_KS) -> list[str]:
    return [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks]


def ranks_to_sums(ranks: np.ndarray, ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    """Per-metric sums over users given 0-based target ranks (-1 = not retrieved)."""
    ranks = np.asarray(ranks)
    found = ranks >= 0
    gains = np.where(found, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)
    sums = {}
    for k in ks:
        in_top = found & (ranks < k)
        sums[f"recall@{k}"] = float(in_top.sum())
        sums[f"ndcg@{k}"] = float(gains[in_top].sum())
    return sums
