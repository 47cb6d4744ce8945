"""The cascade's second step, for one batch of requests: a Ranker re-scores each request's
retriever candidates over the user's whole history, and the top k are kept.

The ranker sees exactly what it saw in offline evaluation (``recsys.training.evaluate.
ranker_scores``): the history left-padded, oldest first, the candidates in the retriever's order
with their 0-based ranks and the retriever's scores. A candidate list shorter than the others
(a retriever that proposed fewer, or scores of -inf: an excluded item) is padded with item 0,
which ``Ranker.score`` puts last, and is never returned.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from recsys.data.split import pad_left
from recsys.models.base import Batch, Ranker


class Reranked(NamedTuple):
    """One request's answer: items best first, the ranker's scores, and each item's 0-based rank in
    the retriever's list."""

    items: list[int]
    scores: list[float]
    retriever_ranks: list[int]


def _candidate_arrays(candidates: Sequence[Sequence[int]], scores: Sequence[Sequence[float]],
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lists -> (B, C) items, ranks and scores; padding (item 0, rank -1, score 0) where a list is
    shorter or its retriever score is not finite."""
    width = max(1, max(len(c) for c in candidates))
    items = np.zeros((len(candidates), width), dtype=np.int64)
    ranks = np.full((len(candidates), width), -1, dtype=np.int64)
    values = np.zeros((len(candidates), width), dtype=np.float32)
    for row, (c, s) in enumerate(zip(candidates, scores)):
        if len(c) != len(s):
            raise ValueError(f"request {row}: {len(c)} candidates but {len(s)} retriever scores")
        s = np.asarray(s, dtype=np.float32)
        keep = np.isfinite(s)
        n = len(c)
        items[row, :n] = np.where(keep, np.asarray(c, dtype=np.int64), 0)
        ranks[row, :n] = np.where(keep, np.arange(n), -1)
        values[row, :n] = np.where(keep, s, 0.0)
    return items, ranks, values


@torch.no_grad()
def rerank(ranker: Ranker, histories: Sequence[Sequence[int]], candidates: Sequence[Sequence[int]],
           scores: Sequence[Sequence[float]], ks: Sequence[int]) -> list[Reranked]:
    """Per request: ``histories`` the user's whole history (internal ids, oldest first),
    ``candidates`` and ``scores`` the retriever's list in its order, ``ks`` how many to keep.
    One ranker call for the batch; results in request order."""
    if not (len(histories) == len(candidates) == len(scores) == len(ks)):
        raise ValueError(f"rerank: {len(histories)} histories, {len(candidates)} candidate lists, {len(scores)} "
                         f"score lists and {len(ks)} k's; give one of each per request")
    if any(len(h) == 0 for h in histories):
        raise ValueError("rerank: every request needs a history of at least one item")
    items, ranks, values = _candidate_arrays(candidates, scores)
    width = max(len(h) for h in histories)
    batch = Batch(history=torch.from_numpy(pad_left([np.asarray(h, dtype=np.int64) for h in histories], width)),
                  candidates=torch.from_numpy(items), candidate_ranks=torch.from_numpy(ranks),
                  candidate_scores=torch.from_numpy(values))
    was_training = ranker.training
    ranker.eval()
    try:
        out = ranker.score(batch).float()  # (B, C); padding candidates -inf
    finally:
        ranker.train(was_training)
    if out.shape != batch.candidates.shape:
        raise ValueError(f"{type(ranker).__name__}.score returned {tuple(out.shape)}, expected "
                         f"{tuple(batch.candidates.shape)} (one score per candidate)")
    order = torch.argsort(out, dim=1, descending=True, stable=True)  # ties keep the retriever's order
    answers = []
    for row, k in enumerate(ks):
        picked = [int(j) for j in order[row] if items[row, j] > 0][:k]
        answers.append(Reranked([int(items[row, j]) for j in picked], [float(out[row, j]) for j in picked],
                                [int(ranks[row, j]) for j in picked]))
    return answers
