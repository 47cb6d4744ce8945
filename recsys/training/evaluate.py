"""Evaluation of any model that honours the contract: retrievers over the whole catalogue
(``evaluate``), rankers over a retriever's candidate sets (``evaluate_ranker``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from recsys.candidates import CandidateSet
from recsys.data.split import EvalSet, Histories
from recsys.metrics import (DEFAULT_KS, RankingMetrics, gauc, metric_names, pooled_auc, ranks_to_sums, reranked_ranks,
                            target_ranks)
from recsys.models import Batch, Ranker, SequenceModel
from recsys.training.batching import trim_padding


@torch.no_grad()
def evaluate(
    model: SequenceModel,
    eval_set: EvalSet,
    *,
    batch_size: int = 1024,
    exclude_history: bool = False,
    ks: tuple[int, ...] = DEFAULT_KS,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """Recall@K and NDCG@K over the whole catalogue, averaged over the users of ``eval_set``.
    The eval set's timestamps and target times, when it has them, go into each Batch.

    With ``world_size > 1`` each rank scores rows ``rank::world_size`` and the sums are
    all-reduced, so every rank returns the same figures for all users.
    """
    rows = np.arange(rank, len(eval_set), world_size)
    ranks = target_ranks_of(model, eval_set, rows=rows, batch_size=batch_size, exclude_history=exclude_history,
                            k=max(ks), device=device)
    metrics = RankingMetrics(ks)
    metrics.merge_sums(ranks_to_sums(ranks, ks), len(ranks))
    if world_size > 1:
        names = metric_names(ks)
        totals = torch.tensor([metrics.sums.get(n, 0.0) for n in names] + [metrics.count], dtype=torch.float64)
        dist.all_reduce(totals)
        metrics = RankingMetrics(ks)
        metrics.merge_sums(dict(zip(names, totals[:-1].tolist())), int(totals[-1]))
    return metrics.summary()


@torch.no_grad()
def target_ranks_of(model: SequenceModel, eval_set: EvalSet, rows: np.ndarray | None = None, *,
                    batch_size: int = 1024, exclude_history: bool = False, k: int = max(DEFAULT_KS),
                    device: torch.device | str = "cpu") -> np.ndarray:
    """The 0-based rank of each user's target in the model's top ``k`` over the whole catalogue
    (-1 when it is not there), for ``rows`` of ``eval_set`` (default: all), in that order. Per-user
    ranks are what a paired comparison of two models needs (``benchmarks/paired.py``)."""
    was_training = model.training
    model.eval()
    rows = np.arange(len(eval_set)) if rows is None else np.asarray(rows, dtype=np.int64)
    histories = torch.tensor(eval_set.histories)  # a copy: arrays from the object store are read-only
    targets = torch.tensor(eval_set.targets)
    users = torch.tensor(eval_set.user_index)
    timed = eval_set.timestamps is not None
    if timed:
        times, target_times = torch.tensor(eval_set.timestamps), torch.tensor(eval_set.target_times)
    order = np.argsort((eval_set.histories[rows] > 0).sum(1), kind="stable")  # similar lengths batch together
    out = np.full(len(rows), -1, dtype=np.int64)
    for start in range(0, len(rows), batch_size):
        at = order[start:start + batch_size]
        idx = torch.from_numpy(rows[at])
        if timed:
            history, stamps = trim_padding(histories[idx], times[idx])
            batch = Batch(history=history, target=targets[idx], users=users[idx], timestamps=stamps,
                          target_time=target_times[idx]).to(device)
        else:
            batch = Batch(history=trim_padding(histories[idx])[0], target=targets[idx], users=users[idx]).to(device)
        top = model.recommend(batch, k=k, exclude_history=exclude_history)
        if top.items.shape[1] < k:
            raise ValueError(f"{type(model).__name__}.recommend returned {top.items.shape[1]} items, need {k}")
        out[at] = target_ranks(top.items, batch.target).cpu().numpy()
    model.train(was_training)
    return out


@torch.no_grad()
def evaluate_ranker(model: Ranker, candidates: CandidateSet | None, histories: Histories, *,
                    batch_size: int = 256, ks: tuple[int, ...] = DEFAULT_KS,
                    device: torch.device | str = "cpu", cache: dict | None = None) -> dict[str, float]:
    """A Ranker's figures on a retriever's candidate sets: AUC (pooled), GAUC (per-user AUC
    weighted by candidates; users whose target is not in their set have no positive and are
    counted in ``gauc_excluded_users``), and Recall/NDCG@K after re-ranking (a user whose target
    is not in the set scores 0), beside ``target_in_set``, the share of users whose target the
    retriever put in the set: the ceiling of every re-ranking figure.

    candidates: the split's ``CandidateSet``; histories: ``split.full_histories(split)`` for the
    same split (whole histories, not the retriever's last ``max_history``).
    """
    if candidates is None:
        raise ValueError("evaluate_ranker needs candidate sets: a ranker scores a retriever's top-N; "
                         "make them with `recsys candidates RETRIEVER_RUN --top-n N` and pass that run")
    if max(ks) > candidates.candidates.shape[1]:
        raise ValueError(f"K={max(ks)} exceeds the {candidates.candidates.shape[1]} candidates per user")
    scores = ranker_scores(model, candidates, histories, batch_size=batch_size, device=device, cache=cache)
    return ranker_figures(scores, candidates, ks)


@torch.no_grad()
def ranker_scores(model: Ranker, candidates: CandidateSet, histories: Histories, *, batch_size: int = 256,
                  device: torch.device | str = "cpu", cache: dict | None = None) -> np.ndarray:
    """(U, C) the ranker's score of every candidate, each user reading their whole history; the
    Batch carries the retriever's ranks (the candidates' order) and scores of them.

    cache: a dict kept by the caller across calls with the same candidates, histories and batch
    size (validation every epoch): each batch's ``Ranker.prepare`` output is kept in it, so what a
    ranker derives from the histories (TWIN-V2's clusters) is computed once."""
    rows = _history_rows(candidates, histories)
    was_training = model.training
    model.eval()
    scores = np.zeros(candidates.candidates.shape, dtype=np.float64)
    ranks = np.broadcast_to(np.arange(candidates.candidates.shape[1]), candidates.candidates.shape)
    for start in range(0, len(candidates), batch_size):
        part = np.arange(start, min(start + batch_size, len(candidates)))
        items, times = histories.padded(rows[part])
        target_time = None if histories.target_times is None else torch.from_numpy(histories.target_times[rows[part]])
        batch = Batch(history=torch.from_numpy(items), users=torch.from_numpy(candidates.user_index[part]),
                      timestamps=None if times is None else torch.from_numpy(times), target_time=target_time,
                      candidates=torch.from_numpy(candidates.candidates[part]),
                      candidate_ranks=torch.from_numpy(np.ascontiguousarray(ranks[part])),
                      candidate_scores=torch.from_numpy(candidates.scores[part]))
        if cache is not None:
            if start not in cache:
                cache[start] = model.prepare(batch)
            batch = cache[start]
        out = model.score(batch.to(device))  # (B, C)
        if out.shape != batch.candidates.shape:
            raise ValueError(f"{type(model).__name__}.score returned {tuple(out.shape)}, expected "
                             f"{tuple(batch.candidates.shape)} (one score per candidate)")
        scores[part] = out.float().cpu().numpy()
    model.train(was_training)
    return scores


def ranker_figures(scores: np.ndarray, candidates: CandidateSet, ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    """``evaluate_ranker``'s figures from (U, C) scores of the candidates."""
    labels = candidates.candidates == candidates.targets[:, None]  # (U, C)
    valid = candidates.candidates > 0
    ranks = reranked_ranks(torch.from_numpy(scores), torch.from_numpy(candidates.candidates),
                           torch.from_numpy(candidates.targets)).numpy()
    grouped, counted, excluded = gauc(scores, labels, valid)
    figures = {name: value / len(candidates) for name, value in ranks_to_sums(ranks, ks).items()}
    return {"auc": pooled_auc(scores, labels, valid), "gauc": grouped, "gauc_users": counted,
            "gauc_excluded_users": excluded, **figures,
            "target_in_set": float(labels.any(1).mean()), "users": len(candidates)}


def _history_rows(candidates: CandidateSet, histories: Histories) -> np.ndarray:
    """The row of ``histories`` of each candidate set's user; both must be of one split."""
    where = {int(u): i for i, u in enumerate(histories.user_index)}
    missing = [int(u) for u in candidates.user_index if int(u) not in where]
    if missing:
        raise ValueError(f"{len(missing)} candidate users have no history in this split (e.g. user {missing[0]}); "
                         "the candidates and histories must come from the same split")
    rows = np.asarray([where[int(u)] for u in candidates.user_index], dtype=np.int64)
    if not np.array_equal(histories.targets[rows], candidates.targets):
        raise ValueError("the candidates' targets differ from the histories' targets: they come from different "
                         "splits or datasets")
    return rows
