"""Load on the served cascade over real HTTP, beside its retriever alone: latency percentiles,
throughput and errors at each concurrency level.

    python benchmarks/serve_cascade.py RANK_RUN [--name lastfm] [--concurrency 1,8,32] [--duration 15]
        [--top-n 100] [--replicas 1] [--replica-cpus 1]

RANK_RUN is a ``recsys rank`` run (retriever + ranker). Two systems are deployed in turn, with the
same replicas, CPUs and batching: ``retriever`` (the rank run's retriever, serving its top k) and
``cascade`` (that retriever's top N re-ranked by the ranker, ``serve.app``'s cascade). Requests
are test-split users of the retriever's data: the cascade gets each user's whole history before
the test target (what the ranker reads; the retriever inside it still reads the last max_len),
the retriever alone its last max_len items. Closed-loop clients as in ``serve_load.py``.

Writes benchmarks/results/serve/<name>/cascade-load.json and prints a markdown table. The client
runs on the same machine as the server and shares its CPUs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.record import protocol, write_record  # noqa: E402
from benchmarks.serve_load import load_systems, start_serve  # noqa: E402
from recsys.data.schema import InteractionData  # noqa: E402
from recsys.data.split import leave_one_out  # noqa: E402
from recsys.runs import CONFIG_FILE, read_json  # noqa: E402


def whole_test_histories(run, n: int, seed: int) -> list[list[str]]:
    """``n`` test users' whole histories before their target, as dataset item ids, oldest first."""
    data = InteractionData.load(read_json(run.run_dir / CONFIG_FILE)["data_dir"])
    full = leave_one_out(data, run.exp.data.max_history).full_histories("test")
    raw = data.items.set_index("item_id")["raw_id"].astype(str)
    rows = np.random.default_rng(seed).choice(len(full), min(n, len(full)), replace=False)
    return [[raw[int(i)] for i in full.items[r]] for r in rows]


def markdown(results: dict) -> str:
    lines = ["| system | concurrency | p50 ms | p95 ms | p99 ms | throughput req/s | errors |",
             "|---|---|---|---|---|---|---|"]
    for system in ("retriever", "cascade"):
        for level, s in results.get(system, {}).items():
            lines.append(f"| {system} | {level[1:]} | {s['p50_ms']} | {s['p95_ms']} | {s['p99_ms']} | "
                         f"{s['throughput_rps']} | {s['errors']} |")
    return "\n".join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",") if x != ""]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rank_run", type=Path, help="a `recsys rank` run")
    p.add_argument("--name", default="lastfm", help="dataset name of the record: serve/<name>/cascade-load.json")
    p.add_argument("--concurrency", type=ints, default=[1, 8, 32])
    p.add_argument("--duration", type=float, default=15.0, help="seconds per concurrency level")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--top-n", type=int, help="cascade: candidates re-ranked (default: the rank run's)")
    p.add_argument("--histories", type=int, default=1000, help="test users sampled as requests")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--replica-cpus", type=float, default=1.0)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str]) -> dict:
    from ray import serve

    from serve.run import open_serving

    ns = parse(argv)
    retriever, cascade = open_serving(ns.rank_run, top_n=ns.top_n)
    if cascade is None:
        raise ValueError(f"{ns.rank_run} is not a `recsys rank` run")
    whole = whole_test_histories(retriever, ns.histories, ns.seed)
    window = retriever.load_model().max_len
    common = {"num_replicas": ns.replicas, "replica_cpus": ns.replica_cpus, "max_batch_size": ns.max_batch_size,
              "batch_wait_timeout_s": ns.batch_wait_ms / 1000, "torch_threads": ns.torch_threads}
    systems = {"retriever": ({"run_dir": str(retriever.run_dir), **common}, [h[-window:] for h in whole]),
               "cascade": ({"run_dir": str(Path(ns.rank_run).resolve()), "cascade_top_n": cascade.top_n,
                            "ranker_max_history": max(len(h) for h in whole), **common}, whole)}
    url = start_serve(ns.port)
    start = time.perf_counter()
    results = load_systems(systems, url, ns)
    serve.shutdown()
    table = markdown(results)
    print("\n" + table)
    lengths = [len(h) for h in whole]
    # the requests ask for no exclusion: the served answers keep history items (the headline protocol)
    write_record("cascade-load", model="serve", dataset=ns.name, protocol=protocol(exclude_history=False),
                 config={"args": {k: str(v) for k, v in vars(ns).items()},
                         "systems": {name: args for name, (args, _) in systems.items()},
                         "ranker_dir": str(cascade.ranker_dir), "top_n": cascade.top_n},
                 wall_s=time.perf_counter() - start, metrics=results,
                 extra={"requests": {"k": ns.k, "users": len(whole), "retriever_window": window,
                                     "mean_whole_history": round(float(np.mean(lengths)), 1),
                                     "max_whole_history": int(max(lengths))},
                        "table_md": table, "threads_note": "client and server share the machine's CPUs"})
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
