"""Leave-one-out split and the padded arrays that models read.

Per user with items ``s[0..n-1]``: test target ``s[n-1]`` with history ``s[:n-1]``; validation
target ``s[n-2]`` with history ``s[:n-2]``; training sees only ``s[:n-2]``. Histories keep
their last ``max_history`` items and are left-padded with 0, so the newest item is always at
the last position. When the dataset has timestamps, they travel alongside, aligned with the
items (0 at padding); without them (Beauty's S3-Rec files) every time field is None.

Retrievers read the padded last ``max_history`` items; rankers read each user's whole history
(``LeaveOneOutSplit.full_histories``).
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
    """Rows of (history, target). histories: (U, max_history) int64, left-padded; targets: (U,).

    timestamps: (U, max_history) int64 event times aligned with ``histories`` (0 at padding) and
    target_times: (U,) the time of each target event; both None when the dataset has no times.
    """

    user_index: np.ndarray
    histories: np.ndarray
    targets: np.ndarray
    timestamps: np.ndarray | None = None
    target_times: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, rows: np.ndarray) -> "EvalSet":
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return EvalSet(self.user_index[rows], self.histories[rows], self.targets[rows],
                       pick(self.timestamps), pick(self.target_times))

    def sample(self, users: int, seed: int) -> "EvalSet":
        """A fixed random sample of ``users`` rows in their order (all rows when ``users`` is 0 or
        not smaller than the set): the same rows for the same seed, as training selects on
        (``trainer.selection.valid_users``, drawn with ``trainer.data.seed`` by default)."""
        if not 0 < users < len(self):
            return self
        return self.subset(np.sort(np.random.default_rng([seed, 1]).choice(len(self), users, replace=False)))


class Histories(NamedTuple):
    """Whole (untruncated) histories of one split, ragged, for rankers.

    items[i]: the history of ``user_index[i]`` in time order; times[i] its event times (None when
    the dataset has none); targets (U,) and target_times (U,) the event that follows.
    """

    user_index: np.ndarray
    items: list[np.ndarray]
    times: list[np.ndarray] | None
    targets: np.ndarray
    target_times: np.ndarray | None

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, rows: np.ndarray) -> "Histories":
        return Histories(self.user_index[rows], [self.items[r] for r in rows],
                         None if self.times is None else [self.times[r] for r in rows], self.targets[rows],
                         None if self.target_times is None else self.target_times[rows])

    def padded(self, rows: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows -> (len(rows), longest of them) left-padded items, and times (0 at padding) or None."""
        width = max(1, max(len(self.items[r]) for r in rows))
        items = pad_left([self.items[r] for r in rows], width)
        times = None if self.times is None else pad_left([self.times[r] for r in rows], width)
        return items, times


@dataclass
class LeaveOneOutSplit:
    n_items: int
    max_history: int
    train: list[np.ndarray]  # each kept user's training prefix s[:n-2], time order
    train_users: np.ndarray  # (len(train),) each training row's user (its row of ``item_sequences``)
    valid: EvalSet
    test: EvalSet
    dropped_users: int  # users with fewer than MIN_USER_LENGTH items
    train_times: list[np.ndarray] | None = None  # event times of ``train``; None without timestamps

    def training_with_validation(self) -> list[np.ndarray]:
        """Each user's s[:n-1]: the training prefix with its validation target appended, what a
        test model refitted on training + validation (``trainer.selection.refit``) learns from."""
        return [np.append(seq, target) for seq, target in zip(self.train, self.valid.targets)]

    def training_with_validation_times(self) -> list[np.ndarray] | None:
        """The event times of ``training_with_validation()``, or None without timestamps."""
        if self.train_times is None:
            return None
        return [np.append(times, t) for times, t in zip(self.train_times, self.valid.target_times)]

    def full_histories(self, name: str) -> Histories:
        """Each user's whole history before the split's target, untruncated (rankers read it all).

        ``test``: s[:n-1] -> s[n-1]; ``valid``: s[:n-2] -> s[n-2]; ``train``: the last training
        transition s[:n-3] -> s[n-3], the one a ranker trains on (users whose training prefix is a
        single item have none and are left out). Only events before the target are included.
        """
        if name not in ("train", "valid", "test"):
            raise ValueError(f"split must be 'train', 'valid' or 'test', got {name!r}")
        times = self.train_times
        if name == "train":
            rows = np.asarray([i for i, s in enumerate(self.train) if len(s) >= 2], dtype=np.int64)
            return Histories(self.train_users[rows], [self.train[i][:-1] for i in rows],
                             None if times is None else [times[i][:-1] for i in rows],
                             np.asarray([self.train[i][-1] for i in rows], dtype=np.int64),
                             None if times is None else np.asarray([times[i][-1] for i in rows], dtype=np.int64))
        if name == "valid":
            items, times = self.train, times
        else:
            items, times = self.training_with_validation(), self.training_with_validation_times()
        target = self.eval_set(name)
        return Histories(target.user_index, items, times, target.targets, target.target_times)

    def training_transitions(self, last: int, rows: np.ndarray | None = None) -> Histories:
        """Each training user's last ``last`` training transitions s[:j] -> s[j] (j >= 1, up to
        s[n-3]), whole histories, for ``rows`` of ``train`` (default: all). Rows of one user are
        consecutive and in time order; a user may appear up to ``last`` times."""
        if last < 1:
            raise ValueError(f"last={last} is out of range; allowed: >= 1 transitions per user")
        rows = np.arange(len(self.train)) if rows is None else np.asarray(rows, dtype=np.int64)
        users, items, times, targets, target_times = [], [], [], [], []
        for r in rows.tolist():
            seq = self.train[r]
            stamps = None if self.train_times is None else self.train_times[r]
            for j in range(max(1, len(seq) - last), len(seq)):
                users.append(self.train_users[r])
                items.append(seq[:j])
                targets.append(seq[j])
                if stamps is not None:
                    times.append(stamps[:j])
                    target_times.append(stamps[j])
        timed = self.train_times is not None
        return Histories(np.asarray(users, dtype=np.int64), items, times if timed else None,
                         np.asarray(targets, dtype=np.int64), np.asarray(target_times, dtype=np.int64) if timed else None)

    def eval_set(self, name: str) -> EvalSet:
        if name not in ("valid", "test"):
            raise ValueError(f"split must be 'valid' or 'test', got {name!r}")
        return self.valid if name == "valid" else self.test


FOLD_SEED = 0x5EED_F01D  # fixed: every retriever of a cascade and its rank stage see the same folds


def user_folds(users: np.ndarray, folds: int) -> np.ndarray:
    """The fold (0..folds-1) of each user id: a hash of the id alone (splitmix64's finaliser), so
    a user's fold never depends on which other users are asked about. Folds are of random sizes,
    binomially close to equal."""
    if folds < 2:
        raise ValueError(f"folds={folds} is out of range; allowed: >= 2")
    x = np.asarray(users, dtype=np.uint64) ^ np.uint64(FOLD_SEED)
    with np.errstate(over="ignore"):  # wrap-around multiplication is the hash
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(folds)).astype(np.int64)


def pad_left(sequences: list[np.ndarray], length: int) -> np.ndarray:
    """Keep each sequence's last ``length`` items, left-pad with 0. Returns (len(sequences), length)."""
    out = np.zeros((len(sequences), length), dtype=np.int64)
    for row, seq in enumerate(sequences):
        tail = seq[-length:]
        if len(tail):
            out[row, length - len(tail):] = tail
    return out


def leave_one_out(data: InteractionData, max_history: int) -> LeaveOneOutSplit:
    """Split every user with at least 3 items; shorter users are counted in ``dropped_users``.
    Timestamps, when ``data`` has them, are split the same way."""
    if max_history < 1:
        raise ValueError(f"max_history={max_history} is out of range; allowed: >= 1")
    sequences = data.item_sequences()
    all_times = data.time_sequences()
    keep = [i for i, s in enumerate(sequences) if len(s) >= MIN_USER_LENGTH]
    kept = [sequences[i] for i in keep]
    times = None if all_times is None else [all_times[i] for i in keep]
    users = np.asarray(keep, dtype=np.int64)

    def eval_set(back: int) -> EvalSet:
        histories = pad_left([s[:-back] for s in kept], max_history)
        targets = np.array([s[-back] for s in kept], dtype=np.int64)
        if times is None:
            return EvalSet(users, histories, targets)
        return EvalSet(users, histories, targets, pad_left([t[:-back] for t in times], max_history),
                       np.array([t[-back] for t in times], dtype=np.int64))

    return LeaveOneOutSplit(
        n_items=data.n_items,
        max_history=max_history,
        train=[s[:-2] for s in kept],
        train_users=users,
        valid=eval_set(2),
        test=eval_set(1),
        dropped_users=len(sequences) - len(kept),
        train_times=None if times is None else [t[:-2] for t in times],
    )


class Windows(NamedTuple):
    inputs: np.ndarray  # (S, max_len) left-padded histories
    targets: np.ndarray  # (S, max_len) the next item at every position, 0 = none
    rows: np.ndarray  # (S,) which sequence of ``train`` each window was cut from
    times: np.ndarray | None = None  # (S, max_len) event times of ``inputs``, 0 at padding
    target_times: np.ndarray | None = None  # (S,) time of each window's last target


def training_windows(train: list[np.ndarray], max_len: int, mode: str = "last",
                     times: list[np.ndarray] | None = None) -> Windows:
    """Next-item training pairs: inputs (S, max_len) and targets (S, max_len), both left-padded,
    and the row of ``train`` each window comes from (``split.train_users[rows]`` is its user).
    With ``times`` (aligned with ``train``), also the inputs' times and the time of each window's
    last target: the times of all targets are then ``times[:, 1:]`` followed by ``target_times``.

    ``targets[:, t]`` is the item after ``inputs[:, t]`` (0 = no target). Mode ``last`` takes
    each user's newest ``max_len + 1`` items, one window per user, as SASRec does. Mode
    ``sliding`` also cuts the older part of long histories into further windows, so that every
    training transition is predicted exactly once. Mode ``prefixes`` makes one window per
    target position (the window ending at it): models that predict only the next item after the
    whole history (TIGER) then learn from every transition, as in the TIGER paper.
    """
    if mode not in SAMPLE_MODES:
        raise ValueError(f"samples={mode!r} is not allowed; choose one of {list(SAMPLE_MODES)}")
    inputs, targets, rows, input_times, target_times = [], [], [], [], []
    for row, seq in enumerate(train):
        end = len(seq)
        while end >= 2:
            start = max(0, end - max_len - 1)
            window = seq[start:end]
            inputs.append(window[:-1])
            targets.append(window[1:])
            rows.append(row)
            if times is not None:
                input_times.append(times[row][start:end - 1])
                target_times.append(times[row][end - 1])
            if mode == "last":
                break
            end -= 1 if mode == "prefixes" else max_len
    windows = Windows(pad_left(inputs, max_len), pad_left(targets, max_len), np.asarray(rows, dtype=np.int64))
    if times is None:
        return windows
    return windows._replace(times=pad_left(input_times, max_len), target_times=np.asarray(target_times, dtype=np.int64))


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
