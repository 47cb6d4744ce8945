"""The embedded default store: one SQLite file (stdlib ``sqlite3``).

Why SQLite: the state is written by one writer (the application's single writer deployment) and
read by several replicas on the same machine. SQLite gives transactional, crash-safe writes with
``journal_mode=WAL`` + ``synchronous=FULL`` (a commit is fsync'd before it returns), readers that
never block the writer (WAL), and it ships with Python. DuckDB is built for analytics (one process
may hold the file for writing, other processes cannot read it meanwhile); LMDB is a key-value map
that would leave the schema, the uniqueness of event ids and the ordering checks to us.

Tables: ``meta`` (schema version, store id, catalogue digest, clustering settings), ``items``
(trained and registered items with their content vectors), ``events`` (per user, by position;
event ids unique; ``cluster``: the event's serve cluster), ``clusters`` (per user and label: cutoff,
gamma and, for the offline labels, the virtual items as one blob) and ``serve_clusters`` (the serve
set, one row per cluster). The serve set is kept in rows because every append changes it: an
append rewrites only the clusters it touched and the events whose cluster changed, never the
whole set, and the writer keeps recently updated users' sets in memory (it is the only writer,
so its copy is current; a failed transaction drops it).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from recsys.history.clustering import VirtualItems, cluster_history
from recsys.history.incremental import add_event
from recsys.history.store import (CLUSTER_LABELS, SCHEMA_VERSION, AppendResult, ClusterSet, Event, EventError,
                                  HistoryStore, ItemRecord, StoredEvent, StoreError, catalogue_digest,
                                  clusters_from_bytes, clusters_to_bytes)

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (internal_id INTEGER PRIMARY KEY, raw_id TEXT NOT NULL UNIQUE, version INTEGER UNIQUE,
                    semantic_id TEXT, fields TEXT, vector BLOB);
CREATE TABLE events (user_id TEXT NOT NULL, position INTEGER NOT NULL, event_id TEXT NOT NULL UNIQUE,
                     internal_id INTEGER NOT NULL REFERENCES items(internal_id), time INTEGER, cluster INTEGER,
                     PRIMARY KEY (user_id, position));
CREATE TABLE clusters (user_id TEXT NOT NULL, label TEXT NOT NULL, cutoff INTEGER NOT NULL, gamma INTEGER NOT NULL,
                       data BLOB, PRIMARY KEY (user_id, label));
CREATE TABLE serve_clusters (user_id TEXT NOT NULL, idx INTEGER NOT NULL, item INTEGER NOT NULL, size INTEGER NOT NULL,
                             position REAL NOT NULL, vector BLOB NOT NULL, PRIMARY KEY (user_id, idx));
"""


def _vector_blob(vector: np.ndarray | None) -> bytes | None:
    return None if vector is None else np.asarray(vector, dtype="<f4").tobytes()


class SqliteStore(HistoryStore):
    CACHED_USERS = 4096  # serve sets the writer keeps in memory

    def __init__(self, path: Path, conn: sqlite3.Connection, readonly: bool):
        self.path, self.conn, self.readonly = path, conn, readonly
        self._serve: OrderedDict[str, tuple[np.ndarray, VirtualItems]] = OrderedDict()  # user -> (history, set)
        self.lock = threading.Lock()  # one connection, used from the writer's thread pool in turns
        self.store_id = self.get_meta("store_id") or ""

    # --- opening ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, *, create: bool = False, catalogue: Sequence[str] | None = None,
             vectors: np.ndarray | None = None, readonly: bool = False) -> "SqliteStore":
        path = Path(path).resolve()
        if not path.exists():
            if not create:
                raise StoreError(f"store {path} does not exist; create it with `recsys history` (store.path) or "
                                 "ask for a new, empty one explicitly (store.create=true)")
            if catalogue is None:
                raise StoreError(f"creating store {path} needs the trained catalogue (the items table's ids)")
            return cls._create(path, catalogue, vectors)
        conn = sqlite3.connect(f"file:{path}?mode={'ro' if readonly else 'rw'}", uri=True, isolation_level=None,
                               check_same_thread=False, timeout=30)
        try:  # checked before anything is set: a file that is not a store is left exactly as found
            status = conn.execute("PRAGMA quick_check").fetchone()[0]
            if status != "ok":
                raise sqlite3.DatabaseError(status)
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not {"meta", "items", "events", "clusters", "serve_clusters"} <= tables:
                raise sqlite3.DatabaseError(f"tables {sorted(tables)} are not a store's")
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as err:
            conn.close()
            raise StoreError(f"store {path} is not a readable store ({err}); it is corrupt or another file. "
                             "Restore it from a backup; a new, empty store loses what it acknowledged") from None
        if version is None or int(version[0]) != SCHEMA_VERSION:
            conn.close()
            raise StoreError(f"store {path} has schema version {None if version is None else version[0]}; this code "
                             f"reads version {SCHEMA_VERSION}")
        if not readonly:
            conn.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, nor it them
        conn.execute("PRAGMA synchronous=FULL")  # WAL + FULL: each commit is fsync'd before it returns
        conn.execute("PRAGMA foreign_keys=ON")
        return cls(path, conn, readonly)

    @classmethod
    def _create(cls, path: Path, catalogue: Sequence[str], vectors: np.ndarray | None) -> "SqliteStore":
        if vectors is not None and len(vectors) != len(catalogue):
            raise StoreError(f"{len(vectors)} content vectors for a catalogue of {len(catalogue)} items")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.creating")  # renamed into place once whole
        tmp.unlink(missing_ok=True)
        conn = sqlite3.connect(tmp, isolation_level=None)
        conn.executescript("BEGIN;" + SCHEMA + "COMMIT;")
        with _transaction(conn):
            conn.executemany("INSERT INTO meta VALUES (?, ?)", [
                ("schema_version", str(SCHEMA_VERSION)), ("store_id", uuid.uuid4().hex),
                ("created_at", time.strftime("%Y-%m-%dT%H:%M:%S%z")),
                ("catalogue_size", str(len(catalogue))), ("catalogue_digest", catalogue_digest(catalogue)),
                ("vector_dim", "" if vectors is None else str(vectors.shape[1]))])
            conn.executemany("INSERT INTO items (internal_id, raw_id, vector) VALUES (?, ?, ?)",
                             ((i, str(raw), None if vectors is None else _vector_blob(vectors[i - 1]))
                              for i, raw in enumerate(catalogue, start=1)))
        conn.close()
        tmp.rename(path)
        return cls.open(path)

    def check_catalogue(self, raw_ids: Sequence[str], where: str) -> None:
        if self.get_meta("catalogue_digest") != catalogue_digest(raw_ids):
            raise StoreError(f"store {self.path} was made for another catalogue ({self.get_meta('catalogue_size')} "
                             f"items) than {where} ({len(raw_ids)} items); serve it with the run it was made for")

    # --- meta and items -------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, values: dict[str, str]) -> None:
        with self._write():
            self.conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(values.items()))

    def register_item(self, record: ItemRecord) -> ItemRecord:
        with self._write():
            (last,) = self.conn.execute("SELECT COALESCE(MAX(version), 0) FROM items").fetchone()
            stored = ItemRecord(record.internal_id, record.raw_id, last + 1, record.semantic_id, record.fields,
                                record.vector)
            try:
                self.conn.execute(
                    "INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)",
                    (stored.internal_id, stored.raw_id, stored.version,
                     None if stored.semantic_id is None else json.dumps(list(stored.semantic_id)),
                     json.dumps(stored.fields or {}), _vector_blob(stored.vector)))
            except sqlite3.IntegrityError as err:
                raise EventError(409, f"item {record.raw_id!r} (internal id {record.internal_id}) is already in "
                                 f"store {self.path}: {err}") from None
        return stored

    def registered_items(self) -> list[ItemRecord]:
        rows = self.conn.execute("SELECT internal_id, raw_id, version, semantic_id, fields, vector FROM items "
                                 "WHERE version IS NOT NULL ORDER BY version").fetchall()
        return [ItemRecord(i, raw, v, None if sem is None else tuple(json.loads(sem)), json.loads(fields),
                           None if vec is None else np.frombuffer(vec, dtype="<f4").copy())
                for i, raw, v, sem, fields, vec in rows]

    def item_vectors(self, internal_ids: Sequence[int]) -> np.ndarray:
        wanted = [int(i) for i in internal_ids]
        found = dict(self.conn.execute(
            f"SELECT internal_id, vector FROM items WHERE internal_id IN ({','.join('?' * len(wanted))})", wanted))
        missing = [i for i in wanted if found.get(i) is None]
        if missing:
            raise StoreError(f"store {self.path} holds no content vector for internal item id(s) {missing[:10]}")
        return np.stack([np.frombuffer(found[i], dtype="<f4") for i in wanted]) if wanted else np.zeros((0, 0), "f4")

    # --- events ---------------------------------------------------------------------------
    def append_events(self, user_id: str, events: Sequence[Event]) -> AppendResult:
        try:
            with self._write():
                n, stored, duplicates = self._insert_events(user_id, events)
                gamma = self.get_meta("history_gamma")
                if stored and gamma:
                    self._update_serve_clusters(user_id, n, stored, int(gamma), int(self.get_meta("history_seed")))
        except BaseException:
            self._serve.pop(user_id, None)  # its in-memory set may be ahead of what was committed
            raise
        return AppendResult([s.event_id for s in stored], duplicates, n + len(stored))

    def _insert_events(self, user_id: str, events: Sequence[Event]) -> tuple[int, list[StoredEvent], list[str]]:
        """Inside a transaction: the user's event count before, the events written, the duplicates."""
        new, duplicates = self._check_events(user_id, events)
        (n,) = self.conn.execute("SELECT COUNT(*) FROM events WHERE user_id = ?", (user_id,)).fetchone()
        stored = [StoredEvent(n + k, e.event_id, e.item, internal, e.time) for k, (e, internal) in enumerate(new)]
        self.conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, NULL)",
                              [(user_id, s.position, s.event_id, s.internal_id, s.time) for s in stored])
        return n, stored, duplicates

    def import_histories(self, users: Iterable[tuple[str, Sequence[Event], Sequence[ClusterSet]]]) -> int:
        count = 0
        with self._write():
            for user_id, events, sets in users:
                self._insert_events(user_id, events)
                self._put_clusters(user_id, sets)
                count += 1
        return count

    def _check_events(self, user_id: str, events: Sequence[Event]) -> tuple[list[tuple[Event, int]], list[str]]:
        """The batch's new events with their internal ids, and the ids of those already recorded;
        EventError (nothing written) for a conflict, an unknown item, or a time out of order."""
        ids = [e.event_id for e in events]
        if len(set(ids)) != len(ids):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            raise EventError(422, f"event id(s) {twice[:10]} appear more than once in one batch")
        internal = self._internal_ids([e.item for e in events])
        recorded = self._recorded(ids)
        new, duplicates = [], []
        for e in events:
            if e.event_id in recorded:
                if recorded[e.event_id] != (user_id, internal[e.item]):
                    raise EventError(409, f"event id {e.event_id!r} is already recorded for user "
                                     f"{recorded[e.event_id][0]!r} with another item or user; event ids must be unique")
                duplicates.append(e.event_id)
            else:
                new.append((e, internal[e.item]))
        (last,) = self.conn.execute("SELECT MAX(time) FROM events WHERE user_id = ?", (user_id,)).fetchone()
        for e, _ in new:
            if e.time is not None and last is not None and e.time < last:
                raise EventError(422, f"event {e.event_id!r} of user {user_id!r} has time {e.time}, before the user's "
                                 f"last event time {last}; events must come in time order")
            last = e.time if e.time is not None else last
        return new, duplicates

    def _internal_ids(self, raw_ids: Sequence[str]) -> dict[str, int]:
        wanted = sorted(set(raw_ids))
        found = dict(self.conn.execute(
            f"SELECT raw_id, internal_id FROM items WHERE raw_id IN ({','.join('?' * len(wanted))})", wanted))
        unknown = [r for r in wanted if r not in found]
        if unknown:
            shown = ", ".join(repr(u) for u in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise EventError(422, f"unknown item id(s) in events: {shown}; nothing was recorded")
        return found

    def _recorded(self, event_ids: Sequence[str]) -> dict[str, tuple[str, int]]:
        rows = self.conn.execute(f"SELECT event_id, user_id, internal_id FROM events WHERE event_id IN "
                                 f"({','.join('?' * len(event_ids))})", list(event_ids))
        return {e: (u, i) for e, u, i in rows}

    def events(self, user_id: str) -> list[StoredEvent]:
        rows = self.conn.execute("SELECT e.position, e.event_id, i.raw_id, e.internal_id, e.time FROM events e "
                                 "JOIN items i USING (internal_id) WHERE e.user_id = ? ORDER BY e.position",
                                 (user_id,)).fetchall()
        if not rows:
            raise KeyError(f"user {user_id!r} has no events in store {self.path}")
        return [StoredEvent(*r) for r in rows]

    def has_user(self, user_id: str) -> bool:
        return self.conn.execute("SELECT 1 FROM events WHERE user_id = ? LIMIT 1", (user_id,)).fetchone() is not None

    def users(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT user_id FROM events ORDER BY user_id")]

    # --- clusters -------------------------------------------------------------------------
    def enable_clusters(self, gamma: int, seed: int) -> None:
        if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 2:
            raise ValueError(f"history.gamma must be an integer >= 2, got {gamma!r}")
        if self.get_meta("vector_dim") in (None, ""):
            raise StoreError(f"store {self.path} holds no content vectors (made without an embed run); it cannot "
                             "keep clusters")
        self.set_meta({"history_gamma": str(gamma), "history_seed": str(seed)})

    def put_clusters(self, user_id: str, sets: Sequence[ClusterSet]) -> None:
        with self._write():
            self._put_clusters(user_id, sets)

    def _put_clusters(self, user_id: str, sets: Sequence[ClusterSet]) -> None:
        (n,) = self.conn.execute("SELECT COUNT(*) FROM events WHERE user_id = ?", (user_id,)).fetchone()
        for s in sets:
            if s.label not in CLUSTER_LABELS:
                raise ValueError(f"cluster label {s.label!r} is not one of {list(CLUSTER_LABELS)}")
            if s.cutoff != len(s.clusters.members) or s.cutoff > n or (s.label == "serve" and s.cutoff != n):
                raise ValueError(f"user {user_id!r}: {s.label} clusters cover {len(s.clusters.members)} events with "
                                 f"cutoff {s.cutoff}, but the user has {n} (serve clusters cover them all)")
        for s in sets:
            blob = None if s.label == "serve" else clusters_to_bytes(s.clusters)
            self.conn.execute("INSERT OR REPLACE INTO clusters VALUES (?, ?, ?, ?, ?)",
                              (user_id, s.label, s.cutoff, s.gamma, blob))
            if s.label == "serve":
                self._serve.pop(user_id, None)
                self.conn.execute("DELETE FROM serve_clusters WHERE user_id = ?", (user_id,))
                self._write_serve_rows(user_id, s.clusters, np.arange(len(s.clusters.item)),
                                       np.arange(len(s.clusters.members)))

    def _write_serve_rows(self, user_id: str, v: VirtualItems, clusters: np.ndarray, positions: np.ndarray) -> None:
        """The serve set's rows ``clusters`` and the cluster of the events at ``positions``."""
        self.conn.executemany("INSERT OR REPLACE INTO serve_clusters VALUES (?, ?, ?, ?, ?, ?)", [
            (user_id, int(c), int(v.item[c]), int(v.size[c]), float(v.position[c]), _vector_blob(v.vector[c]))
            for c in clusters])
        self.conn.executemany("UPDATE events SET cluster = ? WHERE user_id = ? AND position = ?",
                              [(int(v.members[p]), user_id, int(p)) for p in positions])

    def clusters(self, user_id: str, label: str) -> ClusterSet:
        row = self.conn.execute("SELECT cutoff, gamma, data FROM clusters WHERE user_id = ? AND label = ?",
                                (user_id, label)).fetchone()
        if row is None:
            raise KeyError(f"user {user_id!r} has no {label} clusters in store {self.path}")
        if label != "serve":
            return ClusterSet(label, row[0], row[1], clusters_from_bytes(row[2]))
        rows = self.conn.execute("SELECT item, size, position, vector FROM serve_clusters WHERE user_id = ? "
                                 "ORDER BY idx", (user_id,)).fetchall()
        members = [r[0] for r in self.conn.execute("SELECT cluster FROM events WHERE user_id = ? AND position < ? "
                                                   "ORDER BY position", (user_id, row[0]))]
        v = VirtualItems(item=np.array([r[0] for r in rows], dtype=np.int64),
                         size=np.array([r[1] for r in rows], dtype=np.int64),
                         vector=np.stack([np.frombuffer(r[3], dtype="<f4") for r in rows]).astype(np.float32),
                         position=np.array([r[2] for r in rows], dtype=np.float32),
                         members=np.array(members, dtype=np.int64))
        return ClusterSet(label, row[0], row[1], v)

    def _update_serve_clusters(self, user_id: str, n: int, new: list[StoredEvent], gamma: int, seed: int) -> None:
        """Inside an append's transaction: bring the user's serve set from its ``n`` events to
        ``n + len(new)``, writing only the clusters and event rows that changed."""
        cached = self._serve.pop(user_id, None)
        if cached is None and n > 0:
            history = np.array([r[0] for r in self.conn.execute(
                "SELECT internal_id FROM events WHERE user_id = ? AND position < ? ORDER BY position",
                (user_id, n))], dtype=np.int64)
            cached = (history, self.clusters(user_id, "serve").clusters)
        history = np.concatenate([cached[0] if cached else np.zeros(0, np.int64),
                                  np.array([e.internal_id for e in new], dtype=np.int64)])
        if cached is None:  # a new user: cluster the whole (short) history at once
            current = cluster_history(history, self.item_vectors(history), gamma, seed=seed)
            self._put_clusters(user_id, [ClusterSet("serve", len(history), gamma, current)])
        else:
            current = cached[1]
            old_members, old_count = current.members.copy(), len(current.item)
            for end in range(n + 1, len(history) + 1):
                vector = self.item_vectors(history[end - 1:end])[0]
                current = add_event(current, history[:end], vector, gamma, self.item_vectors, seed)
            moved = np.flatnonzero(current.members[:n] != old_members)  # events of split clusters
            positions = np.concatenate([moved, np.arange(n, len(history))])
            dirty = np.union1d(np.union1d(old_members[moved], current.members[positions]),
                               np.arange(old_count, len(current.item)))
            self._write_serve_rows(user_id, current, dirty, positions)
            self.conn.execute("UPDATE clusters SET cutoff = ? WHERE user_id = ? AND label = 'serve'",
                              (len(history), user_id))
        self._serve[user_id] = (history, current)
        while len(self._serve) > self.CACHED_USERS:
            self._serve.popitem(last=False)

    # --- plumbing -------------------------------------------------------------------------
    @contextmanager
    def _write(self) -> Iterator[None]:
        if self.readonly:
            raise StoreError(f"store {self.path} was opened read-only")
        with self.lock, _transaction(self.conn):
            yield

    def close(self) -> None:
        self.conn.close()


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE (the write lock up front) ... COMMIT, or ROLLBACK on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
