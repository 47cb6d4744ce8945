"""The serving state as plain, Ray-free logic: item ids, request checks, registrations and
request grouping. The Ray deployments in ``serve.app`` only move these objects around.

Item ids in the API are the dataset's own ids (``raw_id`` of the data run's items table, a
string); the model's internal ids (``1..N``, plus registered items after them) never leave a
response except as ``internal_id``. Unknown ids are an error (422) that names them: ignoring
them would silently recommend from a different history than the client sent.
"""

from __future__ import annotations

import time as clock
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from recsys.cascade import rerank
from recsys.models.base import Batch, Ranker, Retriever


class RequestError(ValueError):
    """A request the server cannot answer as sent; ``status`` is the HTTP status to reply with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class ItemIds:
    """The dataset's item ids (strings) <-> the model's internal ids (``1..N``, then registered items)."""

    def __init__(self, raw_ids: Sequence[str]):
        self._raw: list[str] = [str(r) for r in raw_ids]
        self._internal: dict[str, int] = {}
        for i, raw in enumerate(self._raw, start=1):
            if raw in self._internal:
                raise ValueError(f"item id {raw!r} appears twice in the items table")
            self._internal[raw] = i

    def __len__(self) -> int:
        return len(self._raw)

    def __contains__(self, raw: str) -> bool:
        return raw in self._internal

    def internal(self, raw_ids: Sequence[str]) -> list[int]:
        """Map raw ids -> internal ids; RequestError(422) naming every unknown id."""
        unknown = [r for r in raw_ids if r not in self._internal]
        if unknown:
            shown = ", ".join(repr(u) for u in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise RequestError(422, f"unknown item id(s) in history: {shown}; ids are the dataset's item ids "
                               f"(GET /items/{{id}} checks one)")
        return [self._internal[r] for r in raw_ids]

    def raw(self, internal: int) -> str:
        if not 1 <= internal <= len(self._raw):
            raise KeyError(f"internal item id {internal} is outside 1..{len(self._raw)}")
        return self._raw[internal - 1]

    def add(self, raw: str) -> int:
        """Append a new item; returns its internal id (``len + 1``)."""
        if raw in self._internal:
            raise RequestError(409, f"item id {raw!r} is already registered")
        self._raw.append(raw)
        self._internal[raw] = len(self._raw)
        return len(self._raw)


@dataclass(frozen=True)
class Registration:
    """One registered item, as the registry's log holds it. ``version`` counts registrations from 1;
    ``vector`` is its content vector (what a cascade's ranker scores it by)."""

    version: int
    internal_id: int
    raw_id: str
    semantic_id: tuple[int, ...]
    fields: dict = field(default_factory=dict)
    vector: tuple[float, ...] | None = None


def vector_tuple(vector) -> tuple[float, ...] | None:
    """A content vector (array-like or None) as the log carries it: plain floats."""
    return None if vector is None else tuple(float(x) for x in vector)


def apply_registrations(model: Retriever, ids: ItemIds, version: int, entries: Sequence[Registration],
                        ranker: Ranker | None = None) -> int:
    """Bring a replica's model (and a cascade's ranker) and id map up to the registry's log;
    returns the new version.

    Entries at or below ``version`` are skipped (a sync may return what another already applied).
    Everything is checked before anything changes, and ``register_items`` swaps the table and
    trie in one assignment, so a request never sees half a registration. The caller must not
    yield to its event loop between this and the model call that relies on it.
    """
    todo = sorted((e for e in entries if e.version > version), key=lambda e: e.version)
    if not todo:
        return version
    expected = list(range(version + 1, version + len(todo) + 1))
    if [e.version for e in todo] != expected:
        raise RuntimeError(f"registry log has a gap: have version {version}, got {[e.version for e in todo]}")
    internal = [e.internal_id for e in todo]
    if internal != list(range(model.n_items + 1, model.n_items + len(todo) + 1)) or len(ids) != model.n_items:
        raise RuntimeError(f"registry entries {internal} do not follow this replica's catalogue of "
                           f"{model.n_items} items (id map: {len(ids)})")
    if not model.capabilities.registers_items:
        raise RuntimeError(f"{type(model).__name__} cannot register items after training")
    vectors = None
    if ranker is not None:
        if not ranker.capabilities.registers_items or ranker.n_items != model.n_items:
            raise RuntimeError(f"the cascade's ranker ({type(ranker).__name__}, {ranker.n_items} items) cannot follow "
                               f"the retriever's registrations ({model.n_items} items)")
        if any(e.vector is None for e in todo):
            raise RuntimeError(f"registry entries {internal} carry no content vector for the cascade's ranker")
        vectors = torch.tensor([e.vector for e in todo], dtype=torch.float32)
    model.register_items(torch.tensor(internal), {"semantic": torch.tensor([e.semantic_id for e in todo])})
    if ranker is not None:
        ranker.register_items(torch.tensor(internal), vectors)
    for e in todo:
        ids.add(e.raw_id)
    return todo[-1].version


def check_history(history: Sequence[str], max_history: int) -> None:
    if len(history) == 0:
        raise RequestError(422, "history is empty; give at least one item id")
    if len(history) > max_history:
        raise RequestError(422, f"history holds {len(history)} items, more than the limit of {max_history} "
                           f"(serve max_history)")


def check_required_inputs(model: Retriever, user: int | None, timestamps: Sequence[int] | None) -> None:
    """What the model requires of a request beyond a history, by its own declaration."""
    if model.users_required and user is None:
        raise RequestError(422, "this model conditions on the user (model.user_tokens > 0): give `user`")
    if model.timestamps_required and timestamps is None:
        raise RequestError(422, "this model reads event times (model.time_bias=on): give `timestamps`, one per "
                           "history item")


def check_k(k: int, n_items: int, max_k: int) -> None:
    limit = min(n_items, max_k)
    if not 1 <= k <= limit:
        raise RequestError(422, f"k={k} is out of range; allowed: 1 <= k <= {limit} "
                           f"(the smaller of max_k={max_k} and the catalogue size {n_items})")


def check_times(n_history: int, timestamps: Sequence[int] | None, time: int | None,
                now: float | None = None) -> int:
    """Check a request's history timestamps and time; returns the request's time (default: now).
    Timestamps must be one per history item and never decrease; the time must not precede the
    last of them."""
    if time is None:
        time = int(clock.time() if now is None else now)
    if timestamps is None:
        return time
    if len(timestamps) != n_history:
        raise RequestError(422, f"timestamps holds {len(timestamps)} values for {n_history} history items; "
                           "give one per item")
    back = next((i for i in range(1, len(timestamps)) if timestamps[i] < timestamps[i - 1]), None)
    if back is not None:
        raise RequestError(422, f"timestamps decrease at position {back} ({timestamps[back - 1]} then "
                           f"{timestamps[back]}); history must be oldest first")
    if timestamps and time < timestamps[-1]:
        raise RequestError(422, f"time={time} is before the last history timestamp {timestamps[-1]}")
    return time


def user_index(user_id: str | None, user: int | None, rows: dict[str, int]) -> int | None:
    """The model's ``user`` index for a request. ``user_id`` is the dataset's user id (the store's
    key); ``user`` is the row of that user in the data run's sequences, which models with user
    tokens (TIGER's ``model.user_tokens``) hash. With a ``user_id`` the training data knows
    (``rows``), the index is derived from it and a ``user`` that disagrees is an error; a user
    who is not in the training data has no index of its own, so ``user`` stays as given."""
    if user_id is None or user_id not in rows:
        return user
    if user is not None and user != rows[user_id]:
        raise RequestError(422, f"user={user} disagrees with user_id={user_id!r}, whose index in the training data "
                           f"is {rows[user_id]}; give one of them")
    return rows[user_id]


def join_history(stored: Sequence[str], stored_times: Sequence[int | None], history: Sequence[str],
                 timestamps: Sequence[int] | None, max_len: int, timed: bool) -> tuple[list[str], list[int] | None]:
    """A user's stored events, then the request's items, truncated to the last ``max_len`` (the
    retriever's window, or the ranker's longer one). For a model that reads times (``timed``) the
    stored events need times, and the request's ``timestamps`` must be given and follow them."""
    items = [*stored, *history][-max_len:]
    if not timed:
        return items, None
    if any(t is None for t in stored_times):
        raise RequestError(422, "this model reads event times, but the user's stored events have none (the dataset "
                           "had no timestamps); send the history without user_id")
    if timestamps is None:
        raise RequestError(422, "this model reads event times (model.time_bias=on): give `timestamps`, one per "
                           "history item")
    if stored_times and timestamps and timestamps[0] < stored_times[-1]:
        raise RequestError(422, f"timestamps start at {timestamps[0]}, before the user's last stored event "
                           f"({stored_times[-1]})")
    return items, [*stored_times, *timestamps][-max_len:]


class Query(NamedTuple):
    """One checked request: internal history ids (oldest first), k, exclusion, user (or None), and
    for models that read timestamps the history's times and the request's time (else None)."""

    history: list[int]
    k: int
    exclude_history: bool
    user: int | None
    timestamps: list[int] | None = None
    time: int | None = None


def group_key(q: Query, model: Retriever) -> tuple:
    """Queries that can share one model call and still get exactly what a call of their own would
    give. A beam search's width is ``model.beam_width(k)`` (+ the history length when excluding),
    so rows share a call when those agree; the call runs with the group's largest k and each row
    keeps its first k. Models without a beam (top-k over all items) only split on exclusion.
    Queries with and without timestamps never share a call: a batch has times for all rows or none."""
    timed = (q.timestamps is not None, q.time is not None)
    width = model.beam_width(q.k)
    if width is None:
        return (q.exclude_history, timed)
    return (q.exclude_history, timed, width, len(q.history) if q.exclude_history else 0)


def run_queries(model: Retriever, queries: Sequence[Query]) -> list[tuple[list[int], list[float]]]:
    """Answer queries with as few model calls as exactness allows; results in query order."""
    groups: dict[tuple, list[int]] = {}
    for i, q in enumerate(queries):
        groups.setdefault(group_key(q, model), []).append(i)
    out: list[tuple[list[int], list[float]] | None] = [None] * len(queries)
    for rows in groups.values():
        group = [queries[i] for i in rows]
        width = max(len(q.history) for q in group)
        history = torch.tensor([[0] * (width - len(q.history)) + q.history for q in group])  # (B, T) left-padded
        users = None
        if any(q.user is not None for q in group):
            users = torch.tensor([q.user if q.user is not None else 0 for q in group])
        times = target_time = None
        if model.capabilities.reads_timestamps and group[0].timestamps is not None:
            times = torch.tensor([[0] * (width - len(q.history)) + q.timestamps for q in group])  # (B, T)
        if model.capabilities.reads_timestamps and group[0].time is not None:
            target_time = torch.tensor([q.time for q in group])  # (B,)
        k = max(q.k for q in group)
        batch = Batch(history=history, users=users, timestamps=times, target_time=target_time)
        rec = model.recommend(batch, k, exclude_history=group[0].exclude_history)
        for row, (i, q) in enumerate(zip(rows, group)):
            out[i] = (rec.items[row, : q.k].tolist(), rec.scores[row, : q.k].tolist())
    return out  # type: ignore[return-value]


class Request(NamedTuple):
    """A checked request: what the retriever answers (``query``; its k is the cascade's top-N when
    a ranker re-ranks), the k the client asked for, and in a cascade the whole history the ranker
    reads (internal ids, oldest first; else None)."""

    query: Query
    k: int
    long_history: list[int] | None = None


def answer(model: Retriever, ranker: Ranker | None, requests: Sequence[Request],
           ) -> list[tuple[list[int], list[float], list[int] | None]]:
    """Per request: items best first, their scores (the ranker's in a cascade) and, in a cascade,
    each item's rank in the retriever's list (else None). One retriever call per group of
    compatible queries (``run_queries``), then one ranker call for the batch."""
    found = run_queries(model, [r.query for r in requests])
    if ranker is None:
        return [(items, scores, None) for items, scores in found]
    reranked = rerank(ranker, [r.long_history for r in requests], [f[0] for f in found], [f[1] for f in found],
                      [r.k for r in requests])
    return [(a.items, a.scores, a.retriever_ranks) for a in reranked]
