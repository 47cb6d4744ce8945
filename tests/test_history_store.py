"""The serving state's store (recsys.history.store, SQLite): durable settings, idempotent appends by
client event id, ordering, refusals that write nothing, clusters kept per label and updated
incrementally, and a store that is missing, corrupt or for another catalogue refused at open."""

import sqlite3

import numpy as np
import pytest

from recsys.history.clustering import cluster_history
from recsys.history.incremental import add_event
from recsys.history.store import (ClusterSet, Event, EventError, ItemRecord, StoreConfig, StoreError,
                                  open_store)

CATALOGUE = [f"I{i}" for i in range(1, 21)]


def vectors(n: int = len(CATALOGUE), dim: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


@pytest.fixture
def path(tmp_path):
    return tmp_path / "state.sqlite"


@pytest.fixture
def store(path):
    s = open_store(StoreConfig(path=str(path), create=True), CATALOGUE, vectors())
    yield s
    s.close()


def test_a_missing_store_is_an_error_unless_creating_one_is_asked_for(path):
    with pytest.raises(StoreError, match="does not exist; create it with `recsys history`"):
        open_store(StoreConfig(path=str(path)))
    assert not path.exists()  # nothing was made
    with pytest.raises(ValueError, match="store.path is empty"):
        open_store(StoreConfig(path=""))
    with pytest.raises(ValueError, match="store.kind='lmdb' is not allowed"):
        StoreConfig(kind="lmdb", path=str(path))
    created = open_store(StoreConfig(path=str(path), create=True), CATALOGUE)
    created.close()
    again = open_store(StoreConfig(path=str(path), create=True), CATALOGUE)  # exists: opened, not recreated
    assert again.store_id == created.store_id
    again.close()


def test_commits_are_fsynced_write_ahead_log(store):
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


@pytest.mark.parametrize("damage", ["garbage", "truncated", "not a store", "other schema"])
def test_a_corrupt_or_foreign_file_is_refused_at_open_never_emptied(store, path, damage):
    store.append_events("u1", [Event("e1", "I1", 10)])
    store.close()
    if damage == "garbage":
        path.write_bytes(b"this is not a database at all" * 100)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:1500])
    elif damage == "not a store":
        path.unlink()
        sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.commit()
    else:
        conn = sqlite3.connect(path)
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
        conn.commit()
        conn.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match=str(path)):
        open_store(StoreConfig(path=str(path), create=True), CATALOGUE)
    assert path.read_bytes() == before  # left as found, for recovery


def test_a_store_for_another_catalogue_is_refused(store, path):
    store.close()
    with pytest.raises(StoreError, match="was made for another catalogue"):
        open_store(StoreConfig(path=str(path)), CATALOGUE[:-1] + ["OTHER"])


def test_appends_are_idempotent_by_client_event_id(store, path):
    first = store.append_events("u1", [Event("e1", "I1", 10), Event("e2", "I2", 11)])
    assert first.appended == ["e1", "e2"] and first.duplicates == [] and first.history_length == 2
    retry = store.append_events("u1", [Event("e1", "I1", 99), Event("e2", "I2", 99)])  # a retry, other times
    assert retry.appended == [] and retry.duplicates == ["e1", "e2"] and retry.history_length == 2
    mixed = store.append_events("u1", [Event("e2", "I2", 11), Event("e3", "I3", 12)])
    assert mixed.appended == ["e3"] and mixed.duplicates == ["e2"]
    store.close()
    reopened = open_store(StoreConfig(path=str(path)))
    assert [(e.position, e.event_id, e.item, e.time) for e in reopened.events("u1")] == [
        (0, "e1", "I1", 10), (1, "e2", "I2", 11), (2, "e3", "I3", 12)]  # the first record's time stands
    reopened.close()


@pytest.mark.parametrize("events,status,message", [
    ([Event("e9", "I1", 20), Event("e1", "I5", 20)], 409, "event id 'e1' is already recorded"),
    ([Event("e9", "I1", 20), Event("e10", "NOPE", 20)], 422, "unknown item id(s) in events: 'NOPE'"),
    ([Event("e9", "I1", 20), Event("e10", "I1", 9)], 422, "has time 9, before the user's last event time 20"),
    ([Event("e9", "I1", 5)], 422, "has time 5, before the user's last event time 11"),
    ([Event("e9", "I1", 20), Event("e9", "I1", 20)], 422, "appear more than once in one batch"),
])
def test_a_bad_batch_is_refused_whole_and_writes_nothing(store, events, status, message):
    store.append_events("u1", [Event("e1", "I1", 10), Event("e2", "I2", 11)])
    with pytest.raises(EventError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        store.append_events("u1", events)
    assert err.value.status == status
    assert [e.event_id for e in store.events("u1")] == ["e1", "e2"]


def test_event_ids_are_unique_across_users_and_times_may_be_missing(store):
    store.append_events("u1", [Event("e1", "I1")])
    with pytest.raises(EventError, match="already recorded for user 'u1'"):
        store.append_events("u2", [Event("e1", "I1")])
    assert not store.has_user("u2")
    store.append_events("u1", [Event("e2", "I2", 5), Event("e3", "I3")])  # untimed events do not reorder
    assert [e.time for e in store.events("u1")] == [None, 5, None]
    with pytest.raises(KeyError, match="user 'nobody' has no events"):
        store.events("nobody")
    assert store.users() == ["u1"]


def test_registered_items_survive_a_reopen_and_take_events(store, path):
    v = np.ones(4, dtype=np.float32)
    r = store.register_item(ItemRecord(21, "NEW-1", semantic_id=(1, 2, 0), fields={"title": "t"}, vector=v))
    assert r.version == 1
    assert store.register_item(ItemRecord(22, "NEW-2", semantic_id=(1, 2, 1), fields={})).version == 2
    with pytest.raises(EventError, match="'NEW-1' .* is already in store"):
        store.register_item(ItemRecord(23, "NEW-1", semantic_id=(0, 0, 0), fields={}))
    store.append_events("u1", [Event("e1", "NEW-1", 1)])
    store.close()
    reopened = open_store(StoreConfig(path=str(path)), CATALOGUE)
    items = reopened.registered_items()
    assert [(i.version, i.internal_id, i.raw_id, i.semantic_id, i.fields) for i in items] == [
        (1, 21, "NEW-1", (1, 2, 0), {"title": "t"}), (2, 22, "NEW-2", (1, 2, 1), {})]
    assert np.array_equal(items[0].vector, v) and items[1].vector is None
    assert reopened.events("u1")[0].internal_id == 21
    reopened.close()


def test_a_read_only_store_reads_what_the_writer_committed_and_cannot_write(store, path):
    reader = open_store(StoreConfig(path=str(path)), readonly=True)
    store.append_events("u1", [Event("e1", "I1", 1)])
    assert [e.event_id for e in reader.events("u1")] == ["e1"]  # committed = visible to a new read
    with pytest.raises(StoreError, match="read-only"):
        reader.append_events("u1", [Event("e2", "I2", 2)])
    reader.close()


def check_clusters(clusters, history: np.ndarray, x: np.ndarray, gamma: int) -> None:
    """What cluster_history guarantees, held after incremental updates too."""
    assert len(clusters.members) == len(history) and clusters.size.sum() == len(history)
    assert (clusters.size <= gamma).all() and (clusters.size >= 1).all()
    for c in range(len(clusters.item)):
        rows = np.flatnonzero(clusters.members == c)
        assert len(rows) == clusters.size[c]
        np.testing.assert_allclose(clusters.vector[c], x[history[rows] - 1].mean(0), atol=1e-4)
        assert clusters.position[c] == pytest.approx(rows.mean(), abs=1e-3)
        nearest = ((x[history[rows] - 1] - clusters.vector[c]) ** 2).sum(1)
        assert nearest[list(history[rows]).index(clusters.item[c])] == pytest.approx(nearest.min(), abs=1e-5)


def test_incremental_updates_keep_every_cluster_at_most_gamma_with_exact_means():
    x = vectors(50, 8, seed=1)
    rng = np.random.default_rng(2)
    history = rng.integers(1, 51, size=120)
    gamma = 4
    clusters = cluster_history(history[:30], x[history[:30] - 1], gamma)
    n_before = len(clusters.item)
    for end in range(31, len(history) + 1):
        clusters = add_event(clusters, history[:end], x[history[end - 1] - 1], gamma, lambda items: x[items - 1])
    check_clusters(clusters, history, x, gamma)
    assert len(clusters.item) > n_before  # clusters that grew past gamma were split
    with pytest.raises(ValueError, match="clusters cover 120 events but the history before the new event holds 5"):
        add_event(clusters, history[:6], x[0], gamma, lambda items: x[items - 1])


def test_the_store_keeps_serve_clusters_current_on_every_append_in_one_transaction(store, path):
    x = vectors()
    gamma = 3
    store.enable_clusters(gamma, seed=0)
    store.append_events("u1", [Event(f"e{i}", f"I{1 + i % 20}", i) for i in range(5)])  # a new user
    first = store.clusters("u1", "serve")
    assert first.cutoff == 5 and first.gamma == gamma
    for i in range(5, 40):
        store.append_events("u1", [Event(f"e{i}", f"I{1 + (i * 7) % 20}", i)])
    store.append_events("u1", [Event("e39", "I{}".format(1 + (39 * 7) % 20), 39)])  # a retry changes nothing
    served = store.clusters("u1", "serve")
    history = np.array([e.internal_id for e in store.events("u1")])
    assert served.cutoff == len(history) == 40
    check_clusters(served.clusters, history, x, gamma)
    with pytest.raises(EventError):  # refused: neither events nor clusters change
        store.append_events("u1", [Event("e40", "I1", 40), Event("e41", "NOPE", 41)])
    assert store.clusters("u1", "serve").cutoff == 40
    with pytest.raises(ValueError, match="history.gamma must be an integer >= 2"):
        store.enable_clusters(1, seed=0)


def test_cluster_sets_cover_only_their_cutoff_and_serve_covers_everything(store):
    x = vectors()
    store.append_events("u1", [Event(f"e{i}", f"I{i}", i) for i in range(1, 11)])
    history = np.arange(1, 11)
    valid = cluster_history(history[:8], x[history[:8] - 1], 3)
    store.put_clusters("u1", [ClusterSet("valid", 8, 3, valid)])
    got = store.clusters("u1", "valid")
    assert got.cutoff == 8 and np.array_equal(got.clusters.members, valid.members)
    np.testing.assert_array_equal(got.clusters.vector, valid.vector)
    with pytest.raises(ValueError, match="serve clusters cover them all"):
        store.put_clusters("u1", [ClusterSet("serve", 8, 3, valid)])
    with pytest.raises(ValueError, match="cluster label 'later'"):
        store.put_clusters("u1", [ClusterSet("later", 8, 3, valid)])
    with pytest.raises(KeyError, match="no test clusters"):
        store.clusters("u1", "test")


def test_a_store_without_content_vectors_cannot_keep_clusters(path):
    s = open_store(StoreConfig(path=str(path), create=True), CATALOGUE)
    with pytest.raises(StoreError, match="holds no content vectors"):
        s.enable_clusters(3, seed=0)
    s.close()
