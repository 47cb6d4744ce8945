"""Recall@K / NDCG@K against cases worked out by hand."""

import math

import numpy as np
import pytest
import torch

from recsys.metrics import RankingMetrics, ranks_to_sums, target_ranks


def test_target_ranks_finds_position_or_minus_one():
    top = torch.tensor([[5, 3, 9], [1, 2, 4], [7, 8, 6]])
    assert target_ranks(top, torch.tensor([9, 1, 3])).tolist() == [2, 0, -1]


def test_hand_computed_three_users():
    # user A: target at rank 0 (1st); user B: rank 6 (7th); user C: not retrieved in the top 20.
    top = torch.arange(1, 21).repeat(3, 1)  # every user gets items 1..20 in order
    targets = torch.tensor([1, 7, 99])
    m = RankingMetrics(ks=(5, 10, 20))
    m.update(top, targets)
    out = m.summary()
    assert out["recall@5"] == pytest.approx(1 / 3)
    assert out["recall@10"] == pytest.approx(2 / 3)
    assert out["recall@20"] == pytest.approx(2 / 3)
    # NDCG: 1/log2(0+2) = 1 for A; 1/log2(6+2) = 1/3 for B.
    assert out["ndcg@5"] == pytest.approx(1 / 3)
    assert out["ndcg@10"] == pytest.approx((1 + 1 / 3) / 3)
    assert out["ndcg@20"] == pytest.approx((1 + 1 / 3) / 3)


def test_rank_at_the_cutoff_boundary():
    sums = ranks_to_sums(np.array([4, 5]), ks=(5,))
    assert sums["recall@5"] == 1.0  # rank 4 is the 5th item: inside; rank 5 is the 6th: outside
    assert sums["ndcg@5"] == pytest.approx(1 / math.log2(6))


def test_batches_accumulate_like_one_batch():
    rng = np.random.default_rng(0)
    top = torch.from_numpy(np.stack([rng.permutation(50)[:20] + 1 for _ in range(40)]))
    targets = torch.from_numpy(rng.integers(1, 51, size=40))
    whole = RankingMetrics()
    whole.update(top, targets)
    parts = RankingMetrics()
    for rows in np.array_split(np.arange(40), 3):
        parts.update(top[rows], targets[rows])
    assert parts.summary() == pytest.approx(whole.summary())


def test_too_short_ranking_and_empty_are_errors():
    m = RankingMetrics(ks=(5, 10))
    with pytest.raises(ValueError, match="at least 10"):
        m.update(torch.ones(2, 5, dtype=torch.long), torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="no users"):
        m.summary()

