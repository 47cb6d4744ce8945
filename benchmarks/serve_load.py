"""Load on the Serve application over real HTTP: the generative retriever (TIGER, beam search)
and ANN baselines (an embedding model's user vector, SASRec's or the two-tower's, searched in a faiss
index over its item vectors), served the same way, and EAGER once per fusion (each stream alone, then
both fused; Serve's ``inference`` setting), then a fault run that kills a model replica's process
under load.

    python benchmarks/serve_load.py --tiger TRAIN_RUN [--sasrec TRAIN_RUN] [--ann LABEL=TRAIN_RUN ...]
        [--name beauty] [--concurrency 1,8,32] [--duration 15] [--replicas 2] [--fault-retries 0,2]
    python benchmarks/serve_load.py --eager TRAIN_RUN --name beauty --record load-eager --fault-retries ''

Each system is deployed alone (same replicas, CPUs and batching), warmed up, then driven by
closed-loop clients (asyncio + aiohttp, each sends its next request when the last one answered)
for ``--duration`` s per concurrency level. Requests are test-split histories of the data of the first run
given (dataset item ids, at most max_history items), k = ``--k``. Reported: p50/p95/p99 latency,
throughput (answers with status 200 per second) and errors by kind.

Fault run (per value of ``--fault-retries``, the ingress's retries on a dead replica): the same
load at ``--fault-concurrency``; a third of the way in, one Retriever replica's process gets
SIGKILL. Recorded: what clients saw (errors by kind, answers that needed a retry, latency before,
in the 5 s after the kill, and after Serve restored the replica count), how long Serve took to
run the replica count again, and whether fixed probe requests answer exactly as before the kill.

Writes benchmarks/results/serve/<name>/load.json and prints markdown tables. The client runs on
the same machine as the server and shares its CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.record import protocol, write_record  # noqa: E402
from recsys.data.schema import InteractionData  # noqa: E402
from recsys.data.split import leave_one_out  # noqa: E402
from recsys.runs import CONFIG_FILE, read_json  # noqa: E402

FAULT_WINDOW_S = 5.0


def percentiles(ms: list[float]) -> dict[str, float | None]:
    if not ms:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50_ms": round(float(p50), 1), "p95_ms": round(float(p95), 1), "p99_ms": round(float(p99), 1),
            "max_ms": round(float(max(ms)), 1)}


def summarise(records: list[dict], duration_s: float) -> dict:
    """records: one per request, {start (s), ms, status (int or None), error (str or None), retries}."""
    ok = [r for r in records if r["status"] == 200 and r["error"] is None]
    errors = Counter(r["error"] or f"http {r['status']}" for r in records if r not in ok)
    return {"requests": len(records), "ok": len(ok), "errors": sum(errors.values()), "error_kinds": dict(errors),
            "throughput_rps": round(len(ok) / duration_s, 1), **percentiles([r["ms"] for r in ok]),
            "retried": sum(1 for r in ok if r["retries"])}


def test_histories(run, n: int, seed: int) -> list[list[str]]:
    """``n`` test-split histories of a served run's data (``serve.run.ServingRun``), as dataset
    item ids, oldest first."""
    data = InteractionData.load(read_json(run.run_dir / CONFIG_FILE)["data_dir"])
    split = leave_one_out(data, run.exp.data.max_history)
    raw = data.items.set_index("item_id")["raw_id"].astype(str)
    rows = np.random.default_rng(seed).choice(len(split.test), min(n, len(split.test)), replace=False)
    return [[raw[int(i)] for i in split.test.histories[r] if i > 0] for r in rows]


async def drive(url: str, histories: list[list[str]], k: int, concurrency: int, duration_s: float,
                t0: float | None = None) -> list[dict]:
    """Closed-loop load: ``concurrency`` clients for ``duration_s``; returns one record per request,
    its ``start`` in seconds from ``t0`` (default: now)."""
    import aiohttp

    records: list[dict] = []
    t0 = time.perf_counter() if t0 is None else t0
    deadline = t0 + duration_s

    async def client(worker: int, session: aiohttp.ClientSession) -> None:
        i = worker
        while time.perf_counter() < deadline:
            body = {"history": histories[i % len(histories)], "k": k}
            i += concurrency
            start = time.perf_counter()
            status, error, retries = None, None, 0
            try:
                async with session.post(f"{url}/recommend", json=body) as resp:
                    status = resp.status
                    payload = await resp.json()
                    retries = int(resp.headers.get("X-Retries", "0"))
                    if status == 200 and len(payload["items"]) != k:
                        error = f"{len(payload['items'])} items instead of {k}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                error = type(err).__name__
            records.append({"start": start - t0, "ms": (time.perf_counter() - start) * 1000, "status": status,
                            "error": error, "retries": retries})

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(client(w, session) for w in range(concurrency)))
    return records


def ann_recall(run, histories: list[list[str]], k: int, index: str) -> float:
    """Mean fraction of the exact top-k (the model's full ranking) that the ANN index returns."""
    import torch

    from recsys.ann import AnnRetriever
    from recsys.models import Batch
    from serve.state import ItemIds

    model = run.load_model()
    ann, ids = AnnRetriever(model, index), ItemIds(run.items["raw_id"].astype(str).tolist())
    width = max(len(h) for h in histories)
    rows = torch.tensor([[0] * (width - len(h)) + ids.internal(h) for h in histories])  # (N, T) left-padded
    hits = 0
    for b in range(0, len(rows), 256):
        batch = Batch(history=rows[b:b + 256])
        exact, approx = model.recommend(batch, k).items, ann.recommend(batch, k).items
        hits += sum(len(set(e.tolist()) & set(a.tolist())) for e, a in zip(exact, approx))
    return round(hits / (len(rows) * k), 4)


def deploy(name: str, args: dict) -> None:
    from ray import serve

    from serve.app import build_app

    serve.run(build_app(args), name=name, route_prefix="/", blocking=False)


def wait_healthy(url: str, timeout_s: float = 300) -> None:
    import requests

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/healthz did not answer 200 in {timeout_s} s")


def start_serve(port: int) -> str:
    """Ray (``init_ray``) and Serve's HTTP proxy on 127.0.0.1:``port``; returns the base URL."""
    from ray import serve

    from pipelines.ray_env import init_ray

    init_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def load_systems(systems: dict[str, tuple[dict, list[list[str]]]], url: str, ns: argparse.Namespace) -> dict:
    """Each system (its ``ServeArgs`` and its request histories) deployed alone at ``url``, loaded
    at every concurrency level (``load_levels``), then deleted; results by system."""
    from ray import serve

    results = {}
    for name, (args, histories) in systems.items():
        t = time.perf_counter()
        deploy(name, args)
        wait_healthy(url)
        print(f"{name}: deployed in {time.perf_counter() - t:.1f} s", flush=True)
        results[name] = load_levels(name, url, histories, ns)
        serve.delete(name)
    return results


def load_levels(name: str, url: str, histories: list[list[str]], ns: argparse.Namespace) -> dict:
    asyncio.run(drive(url, histories, ns.k, 8, ns.warmup))  # warm-up: first calls, batching, caches
    results = {}
    for c in ns.concurrency:
        records = asyncio.run(drive(url, histories, ns.k, c, ns.duration))
        results[f"c{c}"] = summarise(records, ns.duration)
        print(f"{name} concurrency {c}: {results[f'c{c}']}", flush=True)
    return results


def retriever_pids(app: str) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", f"ServeReplica:{app}:Retriever"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors]


def running_replicas(app: str) -> int:
    from ray import serve

    states = serve.status().applications[app].deployments["Retriever"].replica_states
    return int(states.get("RUNNING", 0))


def probe(url: str, histories: list[list[str]], k: int) -> tuple[list, set[str]]:
    """Each history's answer (item ids, or the HTTP status of a failure) and the replicas that answered."""
    import requests

    answers, replicas = [], set()
    for h in histories:
        r = requests.post(f"{url}/recommend", json={"history": h, "k": k}, timeout=60)
        answers.append([it["id"] for it in r.json()["items"]] if r.status_code == 200 else f"http {r.status_code}")
        replicas.add(r.headers.get("X-Served-By"))
    return answers, replicas


def fault_run(app: str, url: str, histories: list[list[str]], retries: int, ns: argparse.Namespace) -> dict:
    """Kill one Retriever replica process (SIGKILL) a third of the way into a load run."""
    probes = histories[: ns.probes]
    before, old_replicas = probe(url, probes, ns.k)
    replicas = running_replicas(app)
    events: dict = {}

    def killer(t0: float) -> None:  # a thread: Ray calls here must not stall the clients' event loop
        time.sleep(ns.fault_duration / 3)
        pid = retriever_pids(app)[0]
        os.kill(pid, signal.SIGKILL)
        events.update(killed_pid=pid, killed_at=time.perf_counter() - t0)
        # Recovered: the killed actor is gone, a new one is alive, and Serve runs the full count again
        # (Serve's own status says RUNNING for the dead replica until its health check notices).
        while time.perf_counter() - t0 < ns.fault_duration + 180:
            pids = retriever_pids(app)
            if pid not in pids and len(pids) >= replicas and running_replicas(app) >= replicas:
                events["recovered_at"] = time.perf_counter() - t0
                return
            time.sleep(0.25)

    t0 = time.perf_counter()
    watcher = threading.Thread(target=killer, args=(t0,))
    watcher.start()
    records = asyncio.run(drive(url, histories, ns.k, ns.fault_concurrency, ns.fault_duration, t0))
    watcher.join()  # waits for recovery when the load ended first
    killed, recovered = events["killed_at"], events.get("recovered_at")
    after, new_replicas = [], set()
    for _ in range(20):  # until the replacement replica has answered the probes too
        answers, served = probe(url, probes, ns.k)
        after.append(answers)
        new_replicas |= served - old_replicas
        if new_replicas:
            break
    phases = {"before_kill": [r for r in records if r["start"] < killed],
              f"{FAULT_WINDOW_S:g}_s_after_kill": [r for r in records
                                                   if killed <= r["start"] < killed + FAULT_WINDOW_S],
              "after_recovery": [r for r in records if recovered is not None and r["start"] >= recovered]}
    out = {"retries_on_replica_death": retries, "concurrency": ns.fault_concurrency, "duration_s": ns.fault_duration,
           "killed_pid": events["killed_pid"], "killed_at_s": round(killed, 2),
           "recovered_after_s": None if recovered is None else round(recovered - killed, 2),
           "all": summarise(records, ns.fault_duration),
           "phases": {name: {**summarise(rs, 1.0), "throughput_rps": None} for name, rs in phases.items()},
           "probes": len(probes), "replacement_replica_answered": bool(new_replicas),
           "probes_identical_after_recovery": all(a == before for a in after),
           "replicas_running_after": running_replicas(app)}
    print(f"fault run (retries {retries}): {out}", flush=True)
    return out


def markdown(results: dict, systems: list[str]) -> str:
    lines = ["| system | concurrency | p50 ms | p95 ms | p99 ms | throughput req/s | errors |",
             "|---|---|---|---|---|---|---|"]
    for system in systems:
        for level, s in results.get(system, {}).items():
            lines.append(f"| {system} | {level[1:]} | {s['p50_ms']} | {s['p95_ms']} | {s['p99_ms']} | "
                         f"{s['throughput_rps']} | {s['errors']} |")
    for system, recall in results.get("ann_recall_at_k", {}).items():
        lines += ["", f"{system}: the faiss index returns {recall:.1%} of the exact top-k."]
    for f in results.get("fault", []):
        lines += ["", f"Fault run, ingress retries on replica death = {f['retries_on_replica_death']}, concurrency "
                  f"{f['concurrency']}: a Retriever replica SIGKILLed at {f['killed_at_s']} s; replica count "
                  f"restored {f['recovered_after_s']} s later; the replacement answered the probes: "
                  f"{f['replacement_replica_answered']}; probe answers identical to before the kill: "
                  f"{f['probes_identical_after_recovery']}", "",
                  "| phase | requests | errors (kinds) | retried | p50 ms | p99 ms | max ms |",
                  "|---|---|---|---|---|---|---|"]
        for phase, s in f["phases"].items():
            lines.append(f"| {phase} | {s['requests']} | {s['errors']} {s['error_kinds'] or ''} | {s['retried']} | "
                         f"{s['p50_ms']} | {s['p99_ms']} | {s['max_ms']} |")
    return "\n".join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",") if x != ""]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiger", type=Path, help="TIGER train run (or pipeline run); the fault runs need it")
    p.add_argument("--sasrec", type=Path, help="SASRec train run for the ANN baseline (same dataset): the system "
                   "named `ann`, as --ann ann=RUN")
    p.add_argument("--ann", action="append", default=[], metavar="LABEL=RUN",
                   help="an embedding model's train run served through its ANN index as system LABEL (repeatable; "
                        "e.g. two-tower=runs/train/<two-tower>)")
    p.add_argument("--eager", type=Path, help="EAGER train run: served once per --eager-fusions (Serve's inference "
                   "setting), i.e. each stream alone and fused")
    p.add_argument("--eager-fusions", default="behavior,semantic,sum,confidence",
                   help="comma-separated EAGER fusions, each deployed as system eager-<fusion>")
    p.add_argument("--name", default="synthetic", help="dataset name of the record: serve/<name>/<record>.json")
    p.add_argument("--record", default="load", help="record name: serve/<name>/<record>.json")
    p.add_argument("--concurrency", type=ints, default=[1, 8, 32])
    p.add_argument("--duration", type=float, default=15.0, help="seconds per concurrency level")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--histories", type=int, default=2000, help="test histories sampled as requests")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--replica-cpus", type=float, default=0.5)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--ann-index", default="HNSW32")
    p.add_argument("--fault-retries", type=ints, default=[0, 2], help="one fault run per value; empty = none")
    p.add_argument("--fault-concurrency", type=int, default=8)
    p.add_argument("--fault-duration", type=float, default=40.0, help="seconds of load; the kill comes at 1/3")
    p.add_argument("--probes", type=int, default=20)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def ann_systems(ns: argparse.Namespace) -> dict[str, Path]:
    """The ANN systems to serve, by label: ``--sasrec`` as ``ann``, then each ``--ann LABEL=RUN``."""
    systems = {} if ns.sasrec is None else {"ann": ns.sasrec}
    for spec in ns.ann:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"serve_load.py: --ann {spec!r}: give LABEL=TRAIN_RUN, e.g. two-tower=runs/train/<run>")
        if label in systems or label == "tiger" or label.startswith("eager-"):
            raise SystemExit(f"serve_load.py: --ann {spec!r}: the label {label!r} is taken; give each system its own")
        systems[label] = Path(path)
    return systems


def main(argv: list[str]) -> dict:
    from ray import serve

    from serve.run import open_run

    ns = parse(argv)
    anns = ann_systems(ns)
    runs = {name: open_run(path) for name, path in (("tiger", ns.tiger), *anns.items(), ("eager", ns.eager))
            if path is not None}
    if not runs:
        raise SystemExit("serve_load.py: give at least one of --tiger, --sasrec, --ann, --eager")
    (first, first_run), *others = runs.items()
    histories = test_histories(first_run, ns.histories, ns.seed)
    for name, run in others:
        missing = {i for h in histories for i in h} - set(run.items["raw_id"].astype(str))
        if missing:
            raise ValueError(f"{len(missing)} item ids of the {first} run's histories are not in the {name} run's "
                             f"catalogue (e.g. {sorted(missing)[:3]}): the runs must share a dataset")
    common = {"num_replicas": ns.replicas, "replica_cpus": ns.replica_cpus, "max_batch_size": ns.max_batch_size,
              "batch_wait_timeout_s": ns.batch_wait_ms / 1000, "torch_threads": 1}
    systems = {}
    if ns.tiger is not None:
        systems["tiger"] = {"run_dir": str(runs["tiger"].run_dir), **common}
    for name in anns:
        systems[name] = {"run_dir": str(runs[name].run_dir), "retrieval": "ann", "ann_index": ns.ann_index, **common}
    for fusion in [f for f in ns.eager_fusions.split(",") if f] if ns.eager is not None else []:
        systems[f"eager-{fusion}"] = {"run_dir": str(runs["eager"].run_dir), "inference": {"fusion": fusion}, **common}
    if ns.fault_retries and ns.tiger is None:
        raise SystemExit("serve_load.py: the fault runs kill a TIGER replica: give --tiger, or --fault-retries ''")
    results: dict = {"fault": [], "ann_recall_at_k": {}}
    for name in anns:
        results["ann_recall_at_k"][name] = ann_recall(runs[name], histories, ns.k, ns.ann_index)
        print(f"{name}: ANN index {ns.ann_index}, recall@{ns.k} of the exact ranking "
              f"{results['ann_recall_at_k'][name]}")
    url = start_serve(ns.port)
    start = time.perf_counter()
    results.update(load_systems({name: (args, histories) for name, args in systems.items()}, url, ns))
    for retries in ns.fault_retries:
        deploy("tiger", {**systems["tiger"], "replica_failure_retries": retries})
        wait_healthy(url)
        results["fault"].append(fault_run("tiger", url, histories, retries, ns))
        serve.delete("tiger")
    serve.shutdown()
    table = markdown(results, list(systems))
    print("\n" + table)
    # the requests ask for no exclusion: the served answers keep history items (the headline protocol)
    write_record(ns.record, model="serve", dataset=ns.name, protocol=protocol(exclude_history=False),
                 config={"args": {k: str(v) for k, v in vars(ns).items()}, "systems": systems},
                 wall_s=time.perf_counter() - start, metrics=results,
                 extra={"requests": {"k": ns.k, "histories": len(histories), "mean_history_len":
                                     round(float(np.mean([len(h) for h in histories])), 2)},
                        "table_md": table, "threads_note": "client and server share the machine's CPUs"})
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
