"""Hierarchical k-means: Ray (subtrees as tasks) against the single-process faiss recursion,
on an embed run's vectors (e.g. Beauty) and on synthetic N x 384 tables, to show how wall time
grows with N. Writes benchmarks/results/hkmeans/<dataset>/scaling.json (the
--embed run's dataset, else synthetic).

    python benchmarks/hkmeans_scaling.py --embed runs/embed/<run-id> --sizes 10000,100000,1000000

Inertia is the top level's k-means objective: the sum over items of the squared distance to the
mean of the items sharing its level-0 code. (Distance to the deepest centroid would be 0 here,
since the last level gives each item a direct code.) Both methods must produce identical codes;
the script checks it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.record import run_dataset, write_record  # noqa: E402
from recsys.semantic_ids import HierarchicalKMeans, HKMeansConfig, single_process_recursion  # noqa: E402
from recsys.text import load_embeddings  # noqa: E402


def synthetic_table(n: int, dim: int = 384, clusters: int = 1000, seed: int = 0) -> np.ndarray:
    """A gaussian mixture on the unit sphere, like normalised sentence embeddings."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim), dtype=np.float32)
    x = centers[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def inertia(tokenizer: HierarchicalKMeans, x: np.ndarray) -> float:
    top = tokenizer.fit_codes[:, 0].numpy()
    order = np.argsort(top, kind="stable")
    groups = np.split(order, np.flatnonzero(np.diff(top[order])) + 1)
    return float(sum(((x[g] - x[g].mean(0)) ** 2).sum() for g in groups))


def measure(name: str, x: np.ndarray, cfg: HKMeansConfig, cpus_per_task: float) -> dict:
    from pipelines.ids_job import ray_map

    start = time.perf_counter()
    reference, _ = single_process_recursion(x, cfg)
    single_s = time.perf_counter() - start
    start = time.perf_counter()
    tokenizer = HierarchicalKMeans(config=cfg).fit(x, map_fn=ray_map(cpus_per_task))
    ray_s = time.perf_counter() - start
    same = bool(np.array_equal(tokenizer.fit_codes.numpy(), reference))
    row = {"table": name, "n_items": len(x), "dim": x.shape[1], "single_process_s": round(single_s, 2),
           "ray_s": round(ray_s, 2), "inertia": inertia(tokenizer, x), "identical_codes": same,
           "items_per_s": round(len(x) / ray_s, 1)}
    print(row, flush=True)
    return row


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embed", type=Path, help="an embed run directory (e.g. Beauty)")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--branching", type=int, default=256)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--cpus-per-task", type=float, default=1.0)
    args = parser.parse_args(argv)
    import ray

    ray.init(num_cpus=None, include_dashboard=False, object_store_memory=6 << 30, log_to_driver=False)
    cfg = HKMeansConfig(branching=args.branching, max_levels=args.levels, niter=args.niter)
    rows, start = [], time.perf_counter()
    if args.embed:
        _, x = load_embeddings(args.embed)
        rows.append(measure(f"embed:{args.embed.name}", x, cfg, args.cpus_per_task))
    for n in [int(s) for s in args.sizes.split(",") if s]:
        rows.append(measure(f"synthetic-{n}x384", synthetic_table(n), cfg, args.cpus_per_task))
    write_record("scaling", model="hkmeans", dataset=run_dataset(args.embed) if args.embed else "synthetic",
                 config={"hkmeans": cfg.__dict__, "cpus_per_task": args.cpus_per_task},
                 wall_s=time.perf_counter() - start, metrics={"rows": rows})


if __name__ == "__main__":
    main(sys.argv[1:])
