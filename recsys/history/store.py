"""The state a served application acknowledges, behind one small interface: the catalogue and the
items registered after training, each user's events (with client event ids), and each user's
history clusters (TWIN-V2's virtual items).

``open_store(StoreConfig(kind="sqlite", path=...))`` opens the embedded default
(``recsys.history.sqlite_store``). Another kind (a server database, for replicas that span nodes)
implements ``HistoryStore`` and is added to ``STORE_KINDS``; nothing else changes.

Rules every implementation keeps (``tests/test_history_store.py`` checks the SQLite one):
- A write returns only once it is durable (committed and fsync'd).
- A missing store is an error at open unless creating one is asked for (``create=True``); a store
  that is not one (corrupt, another schema version, another catalogue) is an error too. Never a
  silently empty store.
- ``append_events`` is idempotent by client event id: an event id already recorded for the same
  user and item is skipped (the first record, with its time, stands); the same id for another user
  or item is a conflict. A batch with an unknown item or a time before the user's last is refused
  whole: nothing is written.
- Clusters are kept per user and *label*. ``train``/``valid``/``test`` hold the clustering of the
  events before that split's target (``cutoff`` = how many leading events it covers), so an
  offline example never sees its own target or anything after it. ``serve`` holds the clustering
  of the user's whole current history; once a store keeps clusters (``enable_clusters``, which
  ``recsys history`` does), every ``append_events`` updates it in the same transaction
  (``recsys.history.incremental.add_event``), so its cutoff always equals the user's event count.
"""

from __future__ import annotations

import hashlib
import io
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np

from recsys.config import require, require_choice
from recsys.history.clustering import VirtualItems

SCHEMA_VERSION = 1


class StoreError(ValueError):
    """A store that cannot be opened as asked: missing, corrupt, another schema or catalogue."""


class EventError(ValueError):
    """A batch of events refused whole (nothing written). ``status`` is the HTTP status it maps to:
    422 for unknown items or times before the user's last, 409 for an event id already used."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class StoreConfig:
    """Where the serving state lives. ``kind``: an implementation of ``HistoryStore``;
    ``path``: its file (sqlite). ``create``: make a new, empty store when none exists at ``path``
    (an explicit action; without it a missing store is an error)."""

    kind: str = "sqlite"
    path: str = ""
    create: bool = False

    def __post_init__(self):
        require_choice("store.kind", self.kind, sorted(STORE_KINDS))
        require(isinstance(self.path, str), f"store.path must be a string, got {self.path!r}")


class Event(NamedTuple):
    """One interaction as a client sends it: its client event id, the item's dataset id, and its
    time in seconds (None: the source has no times, as in Beauty's files)."""

    event_id: str
    item: str
    time: int | None = None


class StoredEvent(NamedTuple):
    position: int  # 0-based place in the user's history
    event_id: str
    item: str
    internal_id: int
    time: int | None


class AppendResult(NamedTuple):
    appended: list[str]  # event ids written by this call, in order
    duplicates: list[str]  # event ids already recorded (a retry), skipped
    history_length: int  # the user's events after the call


@dataclass(frozen=True)
class ItemRecord:
    """An item the store knows. ``version`` counts registrations from 1 (None: a trained item);
    ``semantic_id`` and ``fields`` are a registered item's; ``vector`` its content vector or None."""

    internal_id: int
    raw_id: str
    version: int | None = None
    semantic_id: tuple[int, ...] | None = None
    fields: dict | None = None
    vector: np.ndarray | None = None


class ClusterSet(NamedTuple):
    """A user's virtual items under one label, covering the user's first ``cutoff`` events."""

    label: str
    cutoff: int
    gamma: int
    clusters: VirtualItems


CLUSTER_LABELS = ("train", "valid", "test", "serve")


def clusters_to_bytes(v: VirtualItems) -> bytes:
    """Virtual items as one .npz blob (arrays only: read back with allow_pickle=False)."""
    out = io.BytesIO()
    np.savez(out, item=v.item, size=v.size, vector=v.vector, position=v.position, members=v.members)
    return out.getvalue()


def clusters_from_bytes(blob: bytes) -> VirtualItems:
    with np.load(io.BytesIO(blob), allow_pickle=False) as f:
        return VirtualItems(item=f["item"], size=f["size"], vector=f["vector"], position=f["position"],
                            members=f["members"])


def catalogue_digest(raw_ids: Sequence[str]) -> str:
    """A trained catalogue's identity: its item ids in internal-id order."""
    return hashlib.sha256("\n".join(str(r) for r in raw_ids).encode()).hexdigest()


class HistoryStore(ABC):
    """The serving state. Writes are durable when they return; reads see every acknowledged write."""

    store_id: str  # a random id made at creation: a new store is a new id (replicas use it as epoch)

    @abstractmethod
    def check_catalogue(self, raw_ids: Sequence[str], where: str) -> None:
        """StoreError unless the store was made for this trained catalogue (``where`` names it)."""

    @abstractmethod
    def register_item(self, record: ItemRecord) -> ItemRecord:
        """Durably add a registered item (its ``version`` the next one); returns what was stored."""

    @abstractmethod
    def registered_items(self) -> list[ItemRecord]:
        """Every registered item, in version order."""

    @abstractmethod
    def item_vectors(self, internal_ids: Sequence[int]) -> np.ndarray:
        """Content vectors (n, D) float32 of items; StoreError if the store holds none for one."""

    @abstractmethod
    def append_events(self, user_id: str, events: Sequence[Event]) -> AppendResult:
        """Append a user's events, durably, idempotent by event id, and update the user's
        ``serve`` clusters in the same transaction when the store keeps clusters (module rules)."""

    @abstractmethod
    def events(self, user_id: str) -> list[StoredEvent]:
        """A user's events, oldest first; KeyError if the store has none for the user."""

    @abstractmethod
    def has_user(self, user_id: str) -> bool: ...

    @abstractmethod
    def users(self) -> list[str]:
        """Every user with events, sorted."""

    @abstractmethod
    def import_histories(self, users: Iterable[tuple[str, Sequence[Event], Sequence[ClusterSet]]]) -> int:
        """Fill a new store: each user's events and cluster sets, all in one transaction, under the
        same checks as ``append_events``; returns the number of users."""

    @abstractmethod
    def enable_clusters(self, gamma: int, seed: int) -> None:
        """From now on keep each user's ``serve`` clusters current on every append (gamma >= 2)."""

    @abstractmethod
    def put_clusters(self, user_id: str, sets: Sequence[ClusterSet]) -> None:
        """Durably write (replace) a user's cluster sets; each must cover at most the user's events."""

    @abstractmethod
    def clusters(self, user_id: str, label: str) -> ClusterSet:
        """A user's cluster set under ``label``; KeyError if there is none."""

    @abstractmethod
    def get_meta(self, key: str) -> str | None: ...

    @abstractmethod
    def close(self) -> None: ...


def _sqlite(cfg: StoreConfig, catalogue: Sequence[str] | None, vectors: np.ndarray | None,
            readonly: bool) -> HistoryStore:
    from recsys.history.sqlite_store import SqliteStore

    return SqliteStore.open(Path(cfg.path), create=cfg.create, catalogue=catalogue, vectors=vectors,
                            readonly=readonly)


STORE_KINDS: dict[str, Callable[..., HistoryStore]] = {"sqlite": _sqlite}


def open_store(cfg: StoreConfig, catalogue: Sequence[str] | None = None, vectors: np.ndarray | None = None,
               readonly: bool = False) -> HistoryStore:
    """Open the store ``cfg`` names. ``catalogue`` (the trained items' dataset ids, internal-id
    order) is required to create one and checked against an existing one; ``vectors`` (N, D) are
    the trained items' content vectors, stored at creation (None: no clusters can be kept)."""
    require(cfg.path != "", "store.path is empty; give the store's file, e.g. store.path=runs/state.sqlite")
    store = STORE_KINDS[cfg.kind](cfg, catalogue, vectors, readonly)
    if catalogue is not None:
        store.check_catalogue(catalogue, "the given catalogue")
    return store
