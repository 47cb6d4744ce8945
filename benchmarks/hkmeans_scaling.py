"""Hierarchical k-means on one node and, on paper, on N: the single-process faiss recursion
against the ids stage's two paths (in-process, what ``ids.use_ray=auto`` takes on one node, and
Ray tasks per subtree), then Ray's fixed costs on this machine and the item count from which N
nodes would win. Writes benchmarks/results/hkmeans/<dataset>/scaling.json (the --embed run's
dataset, else synthetic).

    python benchmarks/hkmeans_scaling.py --embed runs/embed/<run-id> --dataset beauty --sizes 10000,100000

Per table: ``single_process_s`` (``single_process_recursion``), ``in_process_s`` (the stage's
in-process fit) and ``ray_s`` (subtrees as Ray tasks, Ray already started), with the top split's
share (``top_s``); all three must give identical codes. The in-process timings are the best of
``--repeats`` runs, in wall and in this process's CPU seconds (``*_cpu_s``; with one faiss thread
these hardly move when other work shares the machine). Ray's costs, measured here:
``ray_init_s``; ``task_s``, the wall time per no-op task over a burst of tasks; ``level_s``, one
fan-out round of K no-op tasks and its barrier (this design has one round: the subtrees below the
top split); ``transfer_s_per_mb``, shipping subtree vectors to tasks and back. The projection:
Ray on N nodes costs ``ray_init_s + level_s + n * bytes_per_item * transfer`` more and divides the
subtree work (single-process CPU seconds less the top split's) by N, so it wins from
``n* = fixed / (sub_s_per_item * (1 - 1/N) - transfer_s_per_item)`` items on.
``ray start`` workers on this 2-core machine share its cores, so no speed-up can show here.

Inertia is the top level's k-means objective: the sum over items of the squared distance to the
mean of the items sharing its level-0 code.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.record import run_dataset, write_record  # noqa: E402
from recsys.semantic_ids import HierarchicalKMeans, HKMeansConfig, single_process_recursion  # noqa: E402
from recsys.semantic_ids.hkmeans_tree import split_node  # noqa: E402
from recsys.text import load_embeddings  # noqa: E402

NODES = (2, 4, 8, 16)
NETWORK_BYTES_PER_S = 1.25e9  # 10 Gb/s between nodes, an assumption of the projection (stated in the record)


def synthetic_table(n: int, dim: int = 384, clusters: int = 1000, seed: int = 0) -> np.ndarray:
    """A gaussian mixture on the unit sphere, like normalised sentence embeddings."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim), dtype=np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def inertia(codes: np.ndarray, x: np.ndarray) -> float:
    top = codes[:, 0]
    order = np.argsort(top, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(top[order])) + 1)
    return float(sum(((x[g] - x[g].mean(0)) ** 2).sum() for g in groups))


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def best_of(repeats: int, fn, *args, **kwargs) -> tuple[object, float, float]:
    """(result, min wall s, min CPU s of this process) over ``repeats`` calls: the minimum is the
    run the machine's other load disturbed least; CPU time barely depends on that load at all."""
    walls, cpus = [], []
    for _ in range(repeats):
        cpu = time.process_time()
        out, wall = timed(fn, *args, **kwargs)
        walls.append(wall)
        cpus.append(time.process_time() - cpu)
    return out, min(walls), min(cpus)


def measure(name: str, x: np.ndarray, cfg: HKMeansConfig, cpus_per_task: float, repeats: int) -> dict:
    from pipelines.ids_job import ray_map

    (reference, _), single_s, single_cpu = best_of(repeats, single_process_recursion, x, cfg)
    local, in_process_s, in_process_cpu = best_of(repeats, HierarchicalKMeans(config=cfg).fit, x)
    on_ray, ray_s = timed(HierarchicalKMeans(config=cfg).fit, x, map_fn=ray_map(cpus_per_task))
    _, top_s, top_cpu = best_of(repeats, split_node, x, np.arange(len(x)), (), cfg)
    same = all(np.array_equal(t.fit_codes.numpy(), reference) for t in (local, on_ray))
    row = {"table": name, "n_items": len(x), "dim": x.shape[1], "single_process_s": round(single_s, 3),
           "in_process_s": round(in_process_s, 3), "ray_s": round(ray_s, 3), "top_s": round(top_s, 3),
           "single_process_cpu_s": round(single_cpu, 3), "in_process_cpu_s": round(in_process_cpu, 3),
           "top_cpu_s": round(top_cpu, 3),
           "in_process_to_single": round(in_process_s / single_s, 3),
           "in_process_to_single_cpu": round(in_process_cpu / single_cpu, 3),
           "ray_to_single": round(ray_s / single_s, 3), "inertia": inertia(reference, x), "identical_codes": same}
    print(row, flush=True)
    return row


def _noop(payload):
    return payload


def _size(payload: np.ndarray) -> int:
    return payload.shape[0]


def ray_costs(branching: int, dim: int, repeats: int = 3) -> dict:
    """Ray's fixed costs on this machine (Ray started here, first call included in ray_init_s)."""
    import ray

    from pipelines.ray_env import init_ray

    _, init_s = timed(init_ray)
    noop, size = ray.remote(num_cpus=1)(_noop), ray.remote(num_cpus=1)(_size)
    ray.get([noop.remote(i) for i in range(8)])  # workers up: steady-state costs, not first-start
    burst = []
    for _ in range(repeats):
        _, s = timed(lambda: ray.get([noop.remote(i) for i in range(1000)]))
        burst.append(s / 1000)
    level = []
    for _ in range(repeats):  # one fan-out round of K subtree tasks and the barrier after it
        _, s = timed(lambda: ray.get([noop.remote((i,)) for i in range(branching)]))
        level.append(s)
    block = np.zeros((20_000, dim), dtype=np.float32)  # ~30 MB of vectors, shipped 8 times
    transfer = []
    for _ in range(repeats):
        _, s = timed(lambda: ray.get([size.remote(block) for _ in range(8)]))
        transfer.append(s / (8 * block.nbytes / 1e6))
    return {"ray_init_s": round(init_s, 3), "task_s": round(min(burst), 6), "level_s": round(min(level), 4),
            "transfer_s_per_mb": round(min(transfer), 5), "repeats": repeats,
            "cpus": ray.cluster_resources().get("CPU")}


def projection(rows: list[dict], costs: dict, cfg: HKMeansConfig) -> list[dict]:
    """n* per node count from the largest synthetic table's per-item subtree cost (see docstring)."""
    big = max((r for r in rows if r["table"].startswith("synthetic")), key=lambda r: r["n_items"], default=None)
    if big is None:
        return []
    # CPU seconds (one thread): what the subtree work costs, whatever else ran on the machine
    sub_per_item = (big["single_process_cpu_s"] - big["top_cpu_s"]) / big["n_items"]
    bytes_per_item = 4 * big["dim"]
    local_transfer = costs["transfer_s_per_mb"] * bytes_per_item / 1e6
    transfer = local_transfer + bytes_per_item / NETWORK_BYTES_PER_S
    out = []
    for started in (False, True):
        fixed = costs["level_s"] + (0 if started else costs["ray_init_s"])
        for nodes in NODES:
            gain = sub_per_item * (1 - 1 / nodes) - transfer
            out.append({"nodes": nodes, "ray_already_running": started, "fixed_s": round(fixed, 3),
                        "crossover_items": int(fixed / gain) if gain > 0 else None})
    print({"sub_s_per_item": sub_per_item, "transfer_s_per_item": transfer}, flush=True)
    return [{"from_table": big["table"], "sub_s_per_item": sub_per_item, "transfer_s_per_item": transfer,
             "branching": cfg.branching}, *out]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embed", type=Path, help="an embed run directory (e.g. Beauty)")
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--branching", type=int, default=256)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--cpus-per-task", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each single-process timing; the best counts")
    parser.add_argument("--dataset", default="", help="the record's dataset folder (default: the --embed run's)")
    parser.add_argument("--note", default="", help="stored in the record, e.g. what else ran on the machine")
    args = parser.parse_args(argv)
    cfg = HKMeansConfig(branching=args.branching, max_levels=args.levels, niter=args.niter)
    load, start = os.getloadavg(), time.perf_counter()
    costs = ray_costs(args.branching, 384)
    print(costs, flush=True)
    rows = []
    if args.embed:
        _, x = load_embeddings(args.embed)
        rows.append(measure(f"embed:{args.embed.name}", x, cfg, args.cpus_per_task, args.repeats))
    for n in [int(s) for s in args.sizes.split(",") if s]:
        rows.append(measure(f"synthetic-{n}x384", synthetic_table(n), cfg, args.cpus_per_task, args.repeats))
    projected = projection(rows, costs, cfg)
    for p in projected:
        print(p, flush=True)
    dataset = args.dataset or (run_dataset(args.embed) if args.embed else "synthetic")
    write_record("scaling", model="hkmeans", dataset=dataset,
                 config={"hkmeans": cfg.__dict__, "cpus_per_task": args.cpus_per_task,
                         "network_bytes_per_s_assumed": NETWORK_BYTES_PER_S},
                 wall_s=time.perf_counter() - start,
                 metrics={"rows": rows, "ray_costs": costs, "projection": projected},
                 extra={"note": args.note, "load_average_at_start": [round(v, 1) for v in load],
                        "load_average_at_end": [round(v, 1) for v in os.getloadavg()]})


if __name__ == "__main__":
    main(sys.argv[1:])
