"""Training a Ranker on a retriever's candidate sets, selected on validation.

Examples are each user's last training transition s[:n-3] -> s[n-3] (``full_histories("train")``),
the one a retriever trained with ``trainer.data.ranker_holdout`` never saw as a target. A
training list is the retriever's whole candidate list for it (hard negatives, with their ranks and
scores, exactly as validation and test present them) and ``random_negatives`` uniform random items
(rank -1: not proposed), redrawn every epoch. Label: candidate == target; loss: the ranker's own
(BCE for TWIN). Where the list misses the target (70 % of LastFM's users, 74 % of Beauty's), the
ranker's ``missed_targets`` setting decides:
- ``skip`` (the default): the list is left out, so training sees only lists like those validation
  and test can score (a ranker cannot rank a target its retriever did not propose);
- ``insert``: the target replaces the candidate at a uniformly random position and takes its rank
  and score. Most positives then sit at random ranks, and the ranker learns that the retriever's
  rank says little: on Beauty it fell below its retriever in the first epoch (validation NDCG@10
  0.0366 against the retriever's 0.0433; skipping: 0.0500).
Two other treatments failed in the LastFM pilot: appending the missed target with rank -1 made
"not proposed" the likeliest positive and a middling retriever score the best sign (validation
NDCG@10 0.006-0.027 against the retriever's own 0.041), and a list cut to its top left the ranks
past the cut seen only on targets.
Validation and test never insert the target.

Batches are fixed: users sorted by history length and cut into batches once, each prepared once
(``Ranker.prepare``: TWIN-V2 clusters the history there), so the clustering is not redone every
epoch; the order of the batches and the random negatives change with (seed, epoch).
Validation: ``evaluate_ranker`` on the valid candidates (the retriever's top-N only, the target
never inserted) every epoch; the best epoch's weights are kept.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from recsys.candidates import CandidateSet
from recsys.data.split import Histories
from recsys.models.base import Batch, Ranker
from recsys.training.config import TrainerConfig
from recsys.training.evaluate import evaluate_ranker
from recsys.training.loop import build_optimizer, build_scheduler


@dataclass
class TrainingLists:
    """Per example: items (U, C) (0 = padding), the retriever's ranks (U, C) (-1 = not proposed)
    and scores (U, C), and the target (U,)."""

    items: np.ndarray
    ranks: np.ndarray
    scores: np.ndarray
    targets: np.ndarray


def training_lists(candidates: CandidateSet, seed: int = 0) -> TrainingLists:
    """Each retriever list in its order, with ranks and scores; where it misses the target, the target
    replaces the candidate at a random position (drawn with ``seed``)."""
    items = candidates.candidates.copy()
    ranks = np.broadcast_to(np.arange(items.shape[1]), items.shape).copy()
    missed = np.flatnonzero(~candidates.target_in_set)
    at = np.random.default_rng([seed, 2]).integers(items.shape[1], size=len(missed))
    items[missed, at] = candidates.targets[missed]
    return TrainingLists(items, ranks, candidates.scores.copy(), candidates.targets.copy())


def random_negatives(rng: np.random.Generator, n_items: int, taken: np.ndarray, count: int) -> np.ndarray:
    """(U, count) uniform items in 1..n_items, none in its row of ``taken`` (U, C) nor repeated;
    a draw that keeps colliding after a few tries is left as padding 0."""
    out = rng.integers(1, n_items + 1, size=(len(taken), count))
    for _ in range(8):
        seen = np.concatenate([taken, out], axis=1)
        clash = np.zeros(out.shape, dtype=bool)
        for j in range(count):
            clash[:, j] = (seen[:, :taken.shape[1] + j] == out[:, j:j + 1]).any(1)
        if not clash.any():
            return out
        out[clash] = rng.integers(1, n_items + 1, size=int(clash.sum()))
    out[clash] = 0
    return out


@dataclass
class RankerFit:
    best_state: dict
    best_epoch: int
    valid: dict
    history: list[dict] = field(default_factory=list)


def fixed_batches(model: Ranker, histories: Histories, batch_size: int) -> list[tuple[np.ndarray, Batch]]:
    """Rows of ``histories`` sorted by length, cut into batches, each prepared once."""
    order = np.argsort([len(h) for h in histories.items], kind="stable")
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        items, times = histories.padded(rows)
        batch = Batch(history=torch.from_numpy(items), users=torch.from_numpy(histories.user_index[rows]),
                      timestamps=None if times is None else torch.from_numpy(times))
        batches.append((rows, model.prepare(batch)))
    return batches


def train_ranker(model: Ranker, train: CandidateSet, train_histories: Histories, valid: CandidateSet,
                 valid_histories: Histories, cfg: TrainerConfig, *, random_negatives_n: int,
                 missed_targets: str, log: Callable[[str], None] = print) -> RankerFit:
    """Train ``model`` in place; returns the best epoch's weights (also loaded into ``model``).
    ``missed_targets``: "insert" a list's missed target (``training_lists``), or "skip" the lists
    that miss it."""
    if not np.array_equal(train.user_index, train_histories.user_index) or \
            not np.array_equal(train.targets, train_histories.targets):
        raise ValueError("the training candidates and histories are not of the same users and targets: make both "
                         "from the same data run (`recsys candidates` over the retriever's split)")
    if missed_targets not in ("insert", "skip"):
        raise ValueError(f"missed_targets must be 'insert' or 'skip', got {missed_targets!r}")
    if missed_targets == "skip":
        rows = np.flatnonzero(train.target_in_set)
        if not len(rows):
            raise ValueError("no training list holds its target; missed_targets='skip' leaves nothing to train on")
        train, train_histories = train.subset(rows), train_histories.subset(rows)
    torch.manual_seed(cfg.data.seed)
    lists = training_lists(train, cfg.data.seed)
    batches = fixed_batches(model, train_histories, cfg.optim.batch_size)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, len(batches) * cfg.optim.epochs)
    metric = cfg.selection.select_metric
    best: RankerFit | None = None
    history: list[dict] = []
    last = cfg.optim.last_epoch
    valid_cache: dict = {}  # the validation batches, prepared once
    for epoch in range(last):
        start = time.perf_counter()
        rng = np.random.default_rng([cfg.data.seed, epoch])
        randoms = random_negatives(rng, model.n_items, lists.items, random_negatives_n) if random_negatives_n \
            else np.zeros((len(lists.items), 0), dtype=np.int64)
        model.train()
        losses = []
        for b in rng.permutation(len(batches)):
            rows, base = batches[b]
            batch = _with_candidates(base, lists, randoms, rows)
            out = model.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            out.total.backward()
            if cfg.optim.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(out.total.item())
        record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "epoch_s": time.perf_counter() - start}
        if (epoch + 1) % cfg.selection.eval_every == 0 or epoch + 1 == last:
            figures = evaluate_ranker(model, valid, valid_histories, cache=valid_cache)
            record.update({f"valid_{k}": v for k, v in figures.items()})
            if best is None or figures[metric] > best.valid[metric]:
                best = RankerFit(copy.deepcopy(model.state_dict()), epoch + 1, figures)
        history.append(record)
        log(f"epoch {epoch + 1}: loss {record['train_loss']:.4f}"
            + (f", valid {metric} {record[f'valid_{metric}']:.4f}" if f"valid_{metric}" in record else ""))
        if best is not None and cfg.selection.patience and epoch + 1 - best.best_epoch >= cfg.selection.patience:
            break
    model.load_state_dict(best.best_state)
    best.history = history
    return best


def _with_candidates(base: Batch, lists: TrainingLists, randoms: np.ndarray, rows: np.ndarray) -> Batch:
    items = np.concatenate([lists.items[rows], randoms[rows]], axis=1)  # (B, C)
    ranks = np.concatenate([lists.ranks[rows], np.full(randoms[rows].shape, -1)], axis=1)
    scores = np.concatenate([lists.scores[rows], np.zeros(randoms[rows].shape, dtype=np.float32)], axis=1)
    labels = (items == lists.targets[rows, None]) & (items > 0)
    return dataclasses.replace(base, candidates=torch.from_numpy(items), candidate_ranks=torch.from_numpy(ranks),
                               candidate_scores=torch.from_numpy(scores), labels=torch.from_numpy(labels).float())
