"""Leave-one-out split and the padded arrays that models read.

Per user with items ``s[0..n-1]``: test target ``s[n-1]`` with history ``s[:n-1]``; validation
target ``s[n-2]`` with history ``s[:n-2]``; training sees only ``s[:n-2]``. Histories keep
their last ``max_history`` items and are left-padded with 0, so the newest item is always at
the last position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from recsys.data.schema import InteractionData

MIN_USER_LENGTH = 3  # one training item, one validation target, one test target
SAMPLE_MODES = ("last", "sliding", "prefixes")


@dataclass
class EvalSet:
    """Rows of (history, target). histories: (U, max_history) int64, left-padded; targets: (U,)."""

    user_index: np.ndarray
    histories: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, rows: np.ndarray) -> "EvalSet":
        return EvalSet(self.user_index[rows], self.histories[rows], self.targets[rows])


@dataclass
class LeaveOneOutSplit:
    n_items: int
    max_history: int
    train: list[np.ndarray]  # each kept user's training prefix s[:n-2], time order
    train_users: np.ndarray  # (len(train),) each training row's user (its row of ``item_sequences``)
    valid: EvalSet
    test: EvalSet
    dropped_users: int  # users with fewer than MIN_USER_LENGTH items

    def training_with_validation(self) -> list[np.ndarray]:
        """Each user's s[:n-1]: the training prefix with its validation target appended, what a
        test model refitted on training + validation (``trainer.selection.refit``) learns from."""
        return [np.append(seq, target) for seq, target in zip(self.train, self.valid.targets)]

    def eval_set(self, name: str) -> EvalSet:
        if name not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {name!r}")
        return self.valid if name == "valid" else self.test


def pad_left(sequences: list[np.ndarray], length: int) -> np.ndarray:
    """Keep each sequence's last ``length`` items, left-pad with 0. Returns (len(sequences), length)."""
    out = np.zeros((len(sequences), length), dtype=np.int64)
    for row, seq in enumerate(sequences):
        tail = seq[-length:]
        if len(tail):
            out[row, length - len(tail):] = tail
    return out


def leave_one_out(data: InteractionData, max_history: int) -> LeaveOneOutSplit:
    """Split every user with at least 3 items; shorter users are counted in ``dropped_users``."""
    if max_history < 1:
        raise ValueError(f"max_history={max_history} is out of range; allowed: >= 1")
    sequences = data.item_sequences()
    keep = [i for i, s in enumerate(sequences) if len(s) >= MIN_USER_LENGTH]
    kept = [sequences[i] for i in keep]
    users = np.asarray(keep, dtype=np.int64)
    valid = EvalSet(users, pad_left([s[:-2] for s in kept], max_history), np.array([s[-2] for s in kept], dtype=np.int64))
    test = EvalSet(users, pad_left([s[:-1] for s in kept], max_history), np.array([s[-1] for s in kept], dtype=np.int64))
    return LeaveOneOutSplit(
        n_items=data.n_items,
        max_history=max_history,
        train=[s[:-2] for s in kept],
        train_users=users,
        valid=valid,
        test=test,
        dropped_users=len(sequences) - len(kept),
    )


class Windows(NamedTuple):
    inputs: np.ndarray  # (S, max_len) left-padded histories
    targets: np.ndarray  # (S, max_len) the next item at every position, 0 = none
    rows: np.ndarray  # (S,) which sequence of ``train`` each window was cut from


def training_windows(train: list[np.ndarray], max_len: int, mode: str = "last") -> Windows:
    """Next-item training pairs: inputs (S, max_len) and targets (S, max_len), both left-padded,
    and the row of ``train`` each window comes from (``split.train_users[rows]`` is its user).

    ``targets[:, t]`` is the item after ``inputs[:, t]`` (0 = no target). Mode ``last`` takes
    each user's newest ``max_len + 1`` items, one window per user, as SASRec does. Mode
    ``sliding`` also cuts the older part of long histories into further windows, so that every
    training transition is predicted exactly once. Mode ``prefixes`` makes one window per
    target position (the window ending at it): models that predict only the next item after the
    whole history (TIGER) then learn from every transition, as in the TIGER paper.
    """
    if mode not in SAMPLE_MODES:
        raise ValueError(f"samples={mode!r} is not allowed; choose one of {list(SAMPLE_MODES)}")
    inputs, targets, rows = [], [], []
    for row, seq in enumerate(train):
        end = len(seq)
        while end >= 2:
            window = seq[max(0, end - max_len - 1):end]
            inputs.append(window[:-1])
            targets.append(window[1:])
            rows.append(row)
            if mode == "last":
                break
            end -= 1 if mode == "prefixes" else max_len
    return Windows(pad_left(inputs, max_len), pad_left(targets, max_len), np.asarray(rows, dtype=np.int64))


@dataclass
class ColdStartSplit:
    """Leave-one-out with some items held out of training entirely, for a cold-start slice.

    Items are renumbered: warm items keep their order as ``1..n_warm`` and held-out items follow
    as ``n_warm + 1..n_items``, so a model built for the warm catalogue can register the held-out
    items afterwards (``Tiger.register_items``) under exactly those ids.
    """

    warm: LeaveOneOutSplit  # n_items = n_warm; no held-out item anywhere, in train, valid or test
    cold_test: EvalSet  # test users whose target is held out; histories keep held-out items
    warm_test: EvalSet  # the other test users, histories likewise (score after registering)
    new_id: np.ndarray  # original item id -> new id (index 0 = padding)

    @property
    def n_warm(self) -> int:
        return self.warm.n_items

    @property
    def n_items(self) -> int:
        return len(self.new_id) - 1


def cold_start_split(data: InteractionData, max_history: int, held_out: np.ndarray) -> ColdStartSplit:
    """Split as ``leave_one_out`` with ``held_out`` (original item ids) removed from everything the
    model trains and is selected on."""
    n = data.n_items
    held = np.unique(np.asarray(held_out, dtype=np.int64))
    if len(held) == 0 or len(held) >= n or held[0] < 1 or held[-1] > n:
        raise ValueError(f"held_out must be 1..{n - 1} distinct item ids in 1..{n}; got {len(held)} ids "
                         f"in [{held.min() if len(held) else '-'}, {held.max() if len(held) else '-'}]")
    cold = np.zeros(n + 1, dtype=bool)
    cold[held] = True
    n_warm = n - len(held)
    new_id = np.zeros(n + 1, dtype=np.int64)
    new_id[np.flatnonzero(~cold[1:]) + 1] = np.arange(1, n_warm + 1)
    new_id[held] = np.arange(n_warm + 1, n + 1)
    sequences = [new_id[s] for s in data.item_sequences()]
    keep = [i for i, s in enumerate(sequences) if len(s) >= MIN_USER_LENGTH]
    warm_only = lambda s: s[s <= n_warm]  # noqa: E731
    users = np.asarray(keep, dtype=np.int64)
    kept = [sequences[i] for i in keep]

    def eval_set(rows: list[int], back: int, filtered: bool) -> EvalSet:
        histories = [kept[r][:-back] for r in rows]
        return EvalSet(users[rows], pad_left([warm_only(h) for h in histories] if filtered else histories, max_history),
                       np.array([kept[r][-back] for r in rows], dtype=np.int64))

    valid_rows = [r for r, s in enumerate(kept) if s[-2] <= n_warm]
    test_warm = [r for r, s in enumerate(kept) if s[-1] <= n_warm]
    test_cold = [r for r, s in enumerate(kept) if s[-1] > n_warm]
    warm = LeaveOneOutSplit(n_items=n_warm, max_history=max_history, train=[warm_only(s[:-2]) for s in kept],
                            train_users=users, valid=eval_set(valid_rows, 2, True), test=eval_set(test_warm, 1, True),
                            dropped_users=len(sequences) - len(kept))
    return ColdStartSplit(warm=warm, cold_test=eval_set(test_cold, 1, False),
                          warm_test=eval_set(test_warm, 1, False), new_id=new_id)
