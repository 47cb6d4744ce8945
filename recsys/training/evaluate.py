"""Full-catalogue leave-one-out evaluation of any model that honours the contract."""

from __future__ import annotations

import torch
import torch.distributed as dist

from recsys.data.split import EvalSet
from recsys.metrics import DEFAULT_KS, RankingMetrics, metric_names
from recsys.models import Batch, SequenceModel
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
    was_training = model.training
    model.eval()
    metrics = RankingMetrics(ks)
    histories = torch.tensor(eval_set.histories)  # a copy: arrays from the object store are read-only
    targets = torch.tensor(eval_set.targets)
    users = torch.tensor(eval_set.user_index)
    timed = eval_set.timestamps is not None
    if timed:
        times, target_times = torch.tensor(eval_set.timestamps), torch.tensor(eval_set.target_times)
    rows = torch.arange(rank, len(eval_set), world_size)
    rows = rows[torch.argsort((histories[rows] > 0).sum(1), stable=True)]  # similar lengths batch together
    for start in range(0, len(rows), batch_size):
        idx = rows[start:start + batch_size]
        if timed:
            history, stamps = trim_padding(histories[idx], times[idx])
            batch = Batch(history=history, target=targets[idx], users=users[idx], timestamps=stamps,
                          target_time=target_times[idx]).to(device)
        else:
            batch = Batch(history=trim_padding(histories[idx])[0], target=targets[idx], users=users[idx]).to(device)
        top = model.recommend(batch, k=max(ks), exclude_history=exclude_history)
        metrics.update(top.items, batch.target)
    model.train(was_training)
    if world_size > 1:
        names = metric_names(ks)
        totals = torch.tensor([metrics.sums.get(n, 0.0) for n in names] + [metrics.count], dtype=torch.float64)
        dist.all_reduce(totals)
        metrics = RankingMetrics(ks)
        metrics.merge_sums(dict(zip(names, totals[:-1].tolist())), int(totals[-1]))
    return metrics.summary()
