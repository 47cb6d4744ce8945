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


def per_user_metrics(ranks: np.ndarray, ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, np.ndarray]:
    """Each user's Recall@K and NDCG@K, (U,) float64 each, from 0-based target ranks (-1 = not retrieved)."""
    ranks = np.asarray(ranks)
    found = ranks >= 0
    gains = np.where(found, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)
    out = {}
    for k in ks:
        in_top = found & (ranks < k)
        out[f"recall@{k}"] = in_top.astype(np.float64)
        out[f"ndcg@{k}"] = np.where(in_top, gains, 0.0)
    return {name: out[name] for name in metric_names(ks)}


def ranks_to_sums(ranks: np.ndarray, ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    """Per-metric sums over users given 0-based target ranks (-1 = not retrieved)."""
    return {name: float(values.sum()) for name, values in per_user_metrics(ranks, ks).items()}


# --- ranking metrics: a Ranker's scores over given candidates -------------------------------
# scores (U, C) float, labels (U, C) bool (True = positive), valid (U, C) bool (False = padding).
# Ties between a positive and a negative count 1/2, as in the Mann-Whitney form of AUC.


def auc_per_user(scores: np.ndarray, labels: np.ndarray, valid: np.ndarray | None = None,
                 chunk_pairs: int = 20_000_000) -> np.ndarray:
    """(U,) AUC of each user over their own candidates; NaN for a user without both a positive and
    a negative. Compares every positive with every negative, a few rows at a time."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    valid = np.ones_like(labels) if valid is None else np.asarray(valid, dtype=bool)
    pos, neg = labels & valid, ~labels & valid
    out = np.full(len(scores), np.nan)
    rows = max(1, chunk_pairs // max(1, scores.shape[1] ** 2))
    for start in range(0, len(scores), rows):
        s, p, n = scores[start:start + rows], pos[start:start + rows], neg[start:start + rows]
        diff = s[:, :, None] - s[:, None, :]  # (R, C, C): positive candidate i vs negative j
        pairs = p[:, :, None] & n[:, None, :]
        wins = ((diff > 0) + 0.5 * (diff == 0)) * pairs
        counts = pairs.sum((1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:start + rows] = np.where(counts > 0, wins.sum((1, 2)) / counts, np.nan)
    return out


def pooled_auc(scores: np.ndarray, labels: np.ndarray, valid: np.ndarray | None = None) -> float:
    """AUC over all candidate scores of all users pooled (one ranking); NaN without both classes.
    Average ranks of tied scores give ties 1/2."""
    valid = np.ones(np.shape(labels), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)[valid]
    y = np.asarray(labels, dtype=bool)[valid]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average_rank = ends - (counts - 1) / 2.0  # 1-based rank of each distinct value, ties averaged
    rank_sum = average_rank[inverse][y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(scores: np.ndarray, labels: np.ndarray, valid: np.ndarray | None = None) -> tuple[float, int, int]:
    """Per-user AUC weighted by each user's number of candidates -> (GAUC, users counted, users
    excluded because they lack a positive or a negative). GAUC is NaN when no user counts."""
    valid = np.ones(np.shape(labels), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    per_user = auc_per_user(scores, labels, valid)
    counted = ~np.isnan(per_user)
    weights = valid.sum(1)[counted]
    value = float((per_user[counted] * weights).sum() / weights.sum()) if counted.any() else float("nan")
    return value, int(counted.sum()), int((~counted).sum())


def reranked_ranks(scores: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target once its candidates are sorted by score (ties keep the
    candidates' order), -1 when the target is not among them. (B, C), (B, C), (B,) -> (B,)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return target_ranks(candidates.gather(1, order), targets)
