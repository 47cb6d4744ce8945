"""`recsys history`: every user's whole history clustered into a new store, one cluster set per
example cutoff (no example sees its own target), the compression ratio reported, and the Ray Data
job giving exactly what the in-process path gives."""

import numpy as np
import pytest

from pipelines.cli import main
from recsys.data import InteractionData, SyntheticConfig, generate_synthetic
from recsys.data.split import leave_one_out
from recsys.history.store import StoreConfig, open_store
from recsys.runs import mark_complete, read_json, write_json
from recsys.text.store import EMBEDDINGS_FILE, write_embeddings

GAMMA = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A complete synthetic data run (long histories) and a fake embed run over its items."""
    root = tmp_path_factory.mktemp("history")
    data = generate_synthetic(SyntheticConfig(n_users=60, n_items=40, n_topics=4, min_length=3, max_length=30,
                                              seed=0))
    data.save(root / "data")
    mark_complete(root / "data", "data")
    vectors = np.random.default_rng(0).normal(size=(data.n_items, 8)).astype(np.float32)
    (root / "embed").mkdir()
    write_embeddings(root / "embed" / EMBEDDINGS_FILE, data.items["item_id"].to_numpy(), vectors, "fake",
                     [f"h{i}" for i in range(len(vectors))])
    write_json(root / "embed" / "config.json", {"data_dir": str(root / "data")})
    mark_complete(root / "embed", "embed")
    return root


def history(runs, *overrides) -> int:
    return main(["history", f"run.root={runs / 'runs'}", f"history.gamma={GAMMA}", *overrides,
                 "--data", str(runs / "data"), "--embed", str(runs / "embed")])


@pytest.fixture(scope="module")
def in_process(runs):
    store = runs / "in-process.sqlite"
    assert history(runs, "history.use_ray=false", f"store.path={store}") == 0
    (run_dir,) = (runs / "runs" / "history").iterdir()
    return store, run_dir


def test_each_example_cutoff_holds_only_the_events_before_its_target(runs, in_process):
    store = open_store(StoreConfig(path=str(in_process[0])), readonly=True)
    data = InteractionData.load(runs / "data")
    split = leave_one_out(data, max_history=20)
    users = data.sequences["user_id"].astype(str).tolist()
    checked = 0
    for label in ("train", "valid", "test"):
        hist = split.full_histories(label)
        for row, u in enumerate(hist.user_index):
            got = store.clusters(users[u], label)
            stored = np.array([e.internal_id for e in store.events(users[u])])
            # the example's history is exactly the stored events before its cutoff, and the target
            # (the event at the cutoff) is in no virtual item of its own example
            assert got.cutoff == len(hist.items[row]) and np.array_equal(stored[:got.cutoff], hist.items[row])
            assert stored[got.cutoff] == hist.targets[row]
            assert len(got.clusters.members) == got.cutoff and got.clusters.size.sum() == got.cutoff
            assert (got.clusters.size <= GAMMA).all()
            assert set(got.clusters.item.tolist()) <= set(hist.items[row].tolist())
            checked += 1
    assert checked > 100
    for u, items in zip(users, data.sequences["item_ids"]):  # serve: the whole history, kept current later
        assert store.clusters(u, "serve").cutoff == len(items) == len(store.events(u))
    assert store.get_meta("history_gamma") == str(GAMMA)
    store.close()


def test_the_run_reports_the_compression_ratio_it_stored(runs, in_process):
    path, run_dir = in_process
    metrics = read_json(run_dir / "metrics.json")
    store = open_store(StoreConfig(path=str(path)), readonly=True)
    lengths = [len(store.events(u)) for u in store.users()]
    clusters = [len(store.clusters(u, "serve").clusters.item) for u in store.users()]
    store.close()
    c = metrics["compression"]
    assert (c["events"], c["clusters"], c["users"]) == (sum(lengths), sum(clusters), len(lengths))
    assert c["ratio"] == pytest.approx(sum(lengths) / sum(clusters), abs=1e-4) and c["ratio"] > 1.5
    assert "compression (history length / clusters" in (run_dir / "summary.md").read_text()


def test_bad_settings_and_an_existing_store_are_refused(runs, in_process, capsys):
    assert history(runs, "history.gamma=1", f"store.path={runs / 'never.sqlite'}") == 2
    assert "history.gamma=1 is out of range; allowed: an integer >= 2" in capsys.readouterr().err
    assert not (runs / "never.sqlite").exists()
    before = in_process[0].read_bytes()
    assert history(runs, "history.use_ray=false", f"store.path={in_process[0]}") == 2
    assert "exists; `recsys history` makes a new store and never overwrites one" in capsys.readouterr().err
    assert in_process[0].read_bytes() == before


@pytest.mark.ray
def test_the_ray_data_job_stores_exactly_what_the_in_process_path_stores(runs, in_process, ray_session):
    path = runs / "ray.sqlite"
    assert history(runs, "history.blocks=3", "history.cpus_per_task=0.5", f"store.path={path}") == 0
    a, b = open_store(StoreConfig(path=str(in_process[0])), readonly=True), open_store(StoreConfig(path=str(path)),
                                                                                       readonly=True)
    assert a.users() == b.users()
    for u in a.users():
        for label in ("serve", "test"):
            x, y = a.clusters(u, label), b.clusters(u, label)
            assert x.cutoff == y.cutoff and np.array_equal(x.clusters.members, y.clusters.members)
            np.testing.assert_array_equal(x.clusters.vector, y.clusters.vector)
    a.close()
    b.close()
