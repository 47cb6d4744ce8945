"""Training batches: shuffled, shared equally across DDP ranks, optionally bucketed by history
length, with the all-padding left columns trimmed."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from recsys.models import Batch


def trim_padding(history: torch.Tensor, *aligned: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop the left columns that are padding in every row of ``history`` (and the same columns
    of ``aligned``, e.g. targets). Models align positions to the right, so the result is the
    same computation on fewer tokens. At least one column is kept."""
    used = (history > 0).any(0)
    first = int(used.nonzero()[0]) if used.any() else history.shape[1] - 1
    return (history[:, first:], *(a[:, first:] for a in aligned))


def epoch_batches(inputs: np.ndarray, targets: np.ndarray, batch_size: int, seed: int, epoch: int,
                  rank: int = 0, world_size: int = 1, bucket: int = 0,
                  users: np.ndarray | None = None, timestamps: np.ndarray | None = None,
                  target_times: np.ndarray | None = None) -> Iterator[Batch]:
    """Shuffle with (seed, epoch), give this rank an equal share, cut into batches, trim padding.
    ``users`` (one per row of ``inputs``) fills ``Batch.users``; ``timestamps`` (aligned with
    ``inputs``) and ``target_times`` (one per row: the time of its last target, see
    ``training_windows``) fill ``Batch.timestamps`` and ``Batch.target_time``.

    Every rank gets the same number of rows (the remainder is dropped for this epoch), so DDP
    ranks always run the same number of steps. ``bucket > 0`` sorts each run of ``bucket``
    shuffled batches by history length before cutting it, then shuffles the batches: similar
    lengths share a batch, so trimming leaves little padding (still random, not length-ordered).
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(inputs))
    per_rank = len(order) // world_size
    mine = order[rank * per_rank:(rank + 1) * per_rank]
    cuts = list(range(0, len(mine), batch_size))
    if bucket > 0:
        lengths = (inputs[mine] > 0).sum(1)
        span = bucket * batch_size
        for start in range(0, len(mine), span):
            part = slice(start, start + span)
            mine[part] = mine[part][np.argsort(lengths[part], kind="stable")]
        cuts = [cuts[i] for i in rng.permutation(len(cuts))]
    for start in cuts:
        idx = mine[start:start + batch_size]
        aligned = [torch.from_numpy(targets[idx])] + ([] if timestamps is None else [torch.from_numpy(timestamps[idx])])
        history, target, *times = trim_padding(torch.from_numpy(inputs[idx]), *aligned)
        yield Batch(history=history, targets=target, users=None if users is None else torch.from_numpy(users[idx]),
                    timestamps=times[0] if times else None,
                    target_time=None if target_times is None else torch.from_numpy(target_times[idx]))
