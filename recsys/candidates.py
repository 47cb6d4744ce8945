"""Candidate sets: a retriever's top-N per user, what a ranker trains on and is evaluated on.

For ``valid`` and ``test`` the retriever reads each user's history before that split's target
(its last ``max_history`` items, as in retriever evaluation); for ``train`` it reads the history
of each user's last training transition, s[:n-3] -> s[n-3], the transition a ranker trains on.
The candidates are the retriever's top-N as they come: **the target is never inserted**, so the
share of users whose target is in the set (the retriever's recall@N) bounds what any ranker can
reach, and is reported beside the ranker's figures.

A candidates run directory holds ``candidates-<split>.parquet`` (one row per user: ``user_index``,
``candidates`` in rank order, the retriever's ``scores``, ``target``, ``target_in_set``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from recsys.data.split import EvalSet, Histories, LeaveOneOutSplit, pad_left
from recsys.models.base import Batch, Retriever
from recsys.training.batching import trim_padding

SPLITS = ("train", "valid", "test")


def candidates_file(split_name: str) -> str:
    return f"candidates-{split_name}.parquet"


@dataclass
class CandidateSet:
    """user_index (U,), candidates (U, N) item ids in the retriever's order, scores (U, N) the
    retriever's scores, targets (U,) each user's next item at this split."""

    user_index: np.ndarray
    candidates: np.ndarray
    scores: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def target_in_set(self) -> np.ndarray:
        return (self.candidates == self.targets[:, None]).any(1)

    def subset(self, rows: np.ndarray) -> "CandidateSet":
        return CandidateSet(self.user_index[rows], self.candidates[rows], self.scores[rows], self.targets[rows])

    def rows_longer_than(self, histories: Histories, n: int) -> np.ndarray:
        """Rows whose user has more than ``n`` items before the target in ``histories`` (the split's
        ``full_histories``): the users a ranker's whole history gives more than the last ``n``."""
        length = {int(u): len(h) for u, h in zip(histories.user_index, histories.items)}
        return np.flatnonzero([length[int(u)] > n for u in self.user_index])

    def save(self, path: str | Path) -> None:
        pd.DataFrame({"user_index": self.user_index, "candidates": list(self.candidates),
                      "scores": list(self.scores.astype(np.float32)), "target": self.targets,
                      "target_in_set": self.target_in_set}).to_parquet(path, index=False)

    @classmethod
    def load(cls, path: str | Path) -> "CandidateSet":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; is this a `recsys candidates` run with that split?")
        frame = pd.read_parquet(path)
        return cls(np.array(frame["user_index"], dtype=np.int64), np.stack(frame["candidates"]).astype(np.int64),
                   np.stack(frame["scores"]).astype(np.float32), np.array(frame["target"], dtype=np.int64))


def check_top_n(top_n: int, n_items: int) -> None:
    if not 1 <= top_n <= n_items:
        raise ValueError(f"--top-n {top_n} is out of range; allowed: 1 <= top-n <= {n_items} (the catalogue size)")


def retriever_inputs(split: LeaveOneOutSplit, split_name: str) -> EvalSet:
    """What the retriever reads at a split: the eval sets for valid/test, and for train the last
    training transition's history, cut to ``split.max_history`` the same way."""
    if split_name in ("valid", "test"):
        return split.eval_set(split_name)
    if split_name != "train":
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split_name!r}")
    return histories_inputs(split.full_histories("train"), split.max_history)


def histories_inputs(h: Histories, max_history: int) -> EvalSet:
    """Whole histories cut to what a retriever reads: the last ``max_history`` items, left-padded."""
    times = None if h.times is None else pad_left(h.times, max_history)
    return EvalSet(h.user_index, pad_left(h.items, max_history), h.targets, times, h.target_times)


@torch.no_grad()
def retrieve(model: Retriever, inputs: EvalSet, top_n: int, *, batch_size: int = 1024,
             exclude_history: bool = False, device: torch.device | str = "cpu") -> CandidateSet:
    """The retriever's top ``top_n`` for every row of ``inputs``, in the rows' order."""
    check_top_n(top_n, model.n_items)
    model.eval()
    items = np.zeros((len(inputs), top_n), dtype=np.int64)
    scores = np.zeros((len(inputs), top_n), dtype=np.float32)
    for start in range(0, len(inputs), batch_size):
        rows = slice(start, start + batch_size)
        history = torch.from_numpy(inputs.histories[rows])
        times = None if inputs.timestamps is None else torch.from_numpy(inputs.timestamps[rows])
        history, *stamps = trim_padding(history, *([] if times is None else [times]))
        batch = Batch(history=history, users=torch.from_numpy(inputs.user_index[rows]),
                      timestamps=stamps[0] if stamps else None,
                      target_time=None if inputs.target_times is None else torch.from_numpy(inputs.target_times[rows]))
        top = model.recommend(batch.to(device), top_n, exclude_history=exclude_history)
        items[rows], scores[rows] = top.items.cpu().numpy(), top.scores.float().cpu().numpy()
    return CandidateSet(inputs.user_index.copy(), items, scores, inputs.targets.copy())


def candidate_metrics(candidates: CandidateSet, top_n: int) -> dict:
    """The share of users whose target is in the set (= the retriever's recall@N), N, users."""
    return {"target_in_set": float(candidates.target_in_set.mean()) if len(candidates) else 0.0,
            "top_n": top_n, "users": len(candidates)}
