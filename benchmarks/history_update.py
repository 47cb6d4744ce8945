"""The cost of keeping a user's virtual items current: offline clustering of a whole history, then
the incremental update per new event, in memory (``add_event``) and through the SQLite store
(``append_events``: events + clusters in one fsync'd transaction), on synthetic lifelong
histories of 10^2 .. 10^5 events.

    OMP_NUM_THREADS=1 python -m benchmarks.history_update --lengths 100 1000 10000 100000

Vectors: a mixture of topics (unit-norm), so clusters mean something; history items are drawn
from the catalogue at random. Writes benchmarks/results/history/synthetic/<name>.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.record import machine_note, write_record
from recsys.history.clustering import cluster_history
from recsys.history.incremental import add_event
from recsys.history.store import ClusterSet, Event, StoreConfig, open_store


def catalogue_vectors(n: int, dim: int, topics: int, rng: np.random.Generator) -> np.ndarray:
    centers = rng.normal(size=(topics, dim))
    x = centers[rng.integers(topics, size=n)] + 0.5 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def percentiles(ms: list[float]) -> dict:
    return {"mean_ms": round(float(np.mean(ms)), 3), "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p95_ms": round(float(np.percentile(ms, 95)), 3)}


def one_length(length: int, vectors: np.ndarray, args: argparse.Namespace, rng: np.random.Generator) -> dict:
    n_items = len(vectors)
    history = rng.integers(1, n_items + 1, size=length + args.events)  # (L + E,)
    start = time.perf_counter()
    clusters = cluster_history(history[:length], vectors[history[:length] - 1], args.gamma)
    offline_s = time.perf_counter() - start
    base = copy.deepcopy(clusters)  # add_event updates rows in place
    memory_ms = []
    for end in range(length + 1, length + args.events + 1):
        t = time.perf_counter()
        clusters = add_event(clusters, history[:end], vectors[history[end - 1] - 1], args.gamma,
                             lambda items: vectors[items - 1])
        memory_ms.append(1e3 * (time.perf_counter() - t))
    with tempfile.TemporaryDirectory() as tmp:
        catalogue = [f"I{i}" for i in range(1, n_items + 1)]
        store = open_store(StoreConfig(path=str(Path(tmp) / "state.sqlite"), create=True), catalogue, vectors)
        events = [Event(f"e{i}", catalogue[int(item) - 1], i) for i, item in enumerate(history)]
        store.import_histories([("u", events[:length], [ClusterSet("serve", length, args.gamma, base)])])
        store.enable_clusters(args.gamma, seed=0)
        store_ms = []
        for e in events[length:]:
            t = time.perf_counter()
            store.append_events("u", [e])
            store_ms.append(1e3 * (time.perf_counter() - t))
        served = store.clusters("u", "serve").clusters
        store.close()
    assert (served.size <= args.gamma).all() and served.size.sum() == length + args.events
    return {"length": length, "offline_s": round(offline_s, 4), "clusters": int(len(base.item)),
            "compression": round(base.compression, 3), "clusters_after": int(len(served.item)),
            "add_event": percentiles(memory_ms), "store_append": percentiles(store_ms)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 1000, 10000, 100000])
    parser.add_argument("--events", type=int, default=200, help="new events appended one by one per length")
    parser.add_argument("--gamma", type=int, default=8)
    parser.add_argument("--dim", type=int, default=384, help="content vector size (all-MiniLM-L6-v2: 384)")
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--name", default="incremental-update")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    vectors = catalogue_vectors(args.items, args.dim, 32, rng)
    start = time.perf_counter()
    rows = []
    for length in args.lengths:
        rows.append(one_length(length, vectors, args, rng))
        r = rows[-1]
        print(f"L={length:>6}: offline {r['offline_s']:.3f} s, {r['clusters']} clusters (x{r['compression']}); "
              f"add_event {r['add_event']['mean_ms']:.3f} ms/event; store append {r['store_append']['mean_ms']:.3f} "
              f"ms/event (p95 {r['store_append']['p95_ms']:.3f})", flush=True)
    path = write_record(args.name, model="history", dataset="synthetic", wall_s=round(time.perf_counter() - start, 1),
                        config=vars(args), metrics={"per_length": rows},
                        extra={"machine_note": machine_note(1),
                               "note": f"numpy; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"})
    print(f"record: {path}")


if __name__ == "__main__":
    main()
