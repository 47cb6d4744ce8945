"""What the logQ correction does to the two-tower: Recall/NDCG@10 with and without it, overall and on
popular against tail targets, each difference paired per user; and what the ANN path costs.

    python benchmarks/two_tower_logq.py --with CKPT[,CKPT] --without CKPT[,CKPT] --data DATA_RUN \
        [--split test] [--history kept] [--head-share 0.2] [--ann HNSW32] [--name NAME] [--threads 2]

``--with`` and ``--without`` are checkpoint directories (``runs/train/<id>/checkpoints/best``) of the
same config trained with ``model.log_q=streaming`` (or ``counts``) and ``off``; several, separated
by commas, are training seeds (each user's figure is averaged over them, ``benchmarks.paired``).

**Buckets** are fixed from the training counts alone, before any model is read: items sorted by
their number of training interactions (ties by id), the first ``--head-share`` of the catalogue is
``popular``, the rest ``tail``. A user falls in the bucket of their target item. The share of
training interactions the popular items hold is reported with them.

**Quality** comes from exact scoring (every item scored, ``model.recommend``). **ANN** is reported
apart: the first ``--with`` checkpoint searched through ``recsys.ann.AnnRetriever`` (``--ann``
index, ``--ef-search``), as the ``ann`` serving path does: the share of the exact top 10 it finds,
its Recall@10, and the latency of one user per query (exact faiss Flat against the ANN index).

Writes ``benchmarks/results/two_tower/<dataset>/<NAME>.json`` with ``metrics.test`` (or ``valid``)
of the ``--with`` model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.paired import paired_difference  # noqa: E402
from benchmarks.record import checkpoint_model, protocol, run_dataset, write_record  # noqa: E402
from benchmarks.split_baselines import popular_items, popularity_counts  # noqa: E402
from recsys.ann import AnnRetriever  # noqa: E402
from recsys.data.schema import InteractionData  # noqa: E402
from recsys.data.split import EvalSet, LeaveOneOutSplit, leave_one_out  # noqa: E402
from recsys.metrics import metric_names, per_user_metrics  # noqa: E402
from recsys.models.base import Batch  # noqa: E402
from recsys.training.batching import trim_padding  # noqa: E402
from recsys.training.checkpoint import load_model  # noqa: E402
from recsys.training.evaluate import target_ranks_of  # noqa: E402

FIGURES = ("recall@10", "ndcg@10")
ALL_FIGURES = tuple(metric_names())


def popularity_buckets(split: LeaveOneOutSplit, head_share: float) -> tuple[np.ndarray, dict]:
    """(n_items + 1,) bool, True for a popular item; and what the buckets hold. The head is the first
    ``head_share`` of the items by training count (ties by id), from training transitions only."""
    if not 0 < head_share < 1:
        raise ValueError(f"--head-share={head_share} is out of range; allowed: 0 < head share < 1")
    counts = popularity_counts(split)
    order = popular_items(counts)
    n_head = max(1, int(round(head_share * split.n_items)))
    popular = np.zeros(split.n_items + 1, dtype=bool)
    popular[order[:n_head]] = True
    return popular, {"head_share_of_items": head_share, "popular_items": n_head,
                     "tail_items": int(split.n_items - n_head),
                     "popular_share_of_training_interactions": round(float(counts[popular].sum() / counts.sum()), 4),
                     "min_training_count_of_a_popular_item": int(counts[order[n_head - 1]])}


def per_user(specs: str, es: EvalSet, exclude: bool) -> dict[str, np.ndarray]:
    """metric -> (seeds, U) per-user values of the comma-separated checkpoints."""
    runs = [per_user_metrics(target_ranks_of(load_model(Path(p)), es, exclude_history=exclude)) for p in specs.split(",")]
    return {n: np.stack([r[n] for r in runs]) for n in ALL_FIGURES}


def bucket_table(with_q: dict, without_q: dict, masks: dict[str, np.ndarray]) -> dict:
    """bucket -> {users, with, without, paired (with - without) per figure}."""
    out = {}
    for bucket, mask in masks.items():
        a = {n: without_q[n][:, mask] for n in FIGURES}
        b = {n: with_q[n][:, mask] for n in FIGURES}
        diff = paired_difference(a, b)
        out[bucket] = {"users": int(mask.sum()),
                       "with_log_q": {n: round(float(b[n].mean()), 4) for n in FIGURES},
                       "without_log_q": {n: round(float(a[n].mean()), 4) for n in FIGURES},
                       "paired_with_minus_without": {n: {"diff": round(d["diff"], 5), "se": round(d["se"], 5),
                                                         "seed_differences": [round(x, 5) for x in d["seed_differences"]]}
                                                     for n, d in diff.items()}}
    return out


@torch.no_grad()
def ann_figures(checkpoint: Path, es: EvalSet, index: str, ef_search: int, exclude: bool, latency_users: int) -> dict:
    """The ANN path against exact search on the same model: overlap of the top 10, Recall@10, and
    per-query latency (one user per query) of faiss Flat and of the ANN index."""
    model = load_model(checkpoint)
    exact, ann = AnnRetriever(model, index="Flat"), AnnRetriever(model, index=index, ef_search=ef_search)
    histories, targets = torch.tensor(es.histories), torch.tensor(es.targets)
    found, hits, hits_exact = [], 0, 0
    for start in range(0, len(es), 1024):
        history = trim_padding(histories[start:start + 1024])[0]
        batch = Batch(history=history, target=targets[start:start + 1024])
        top_exact = exact.recommend(batch, 10, exclude_history=exclude).items
        top_ann = ann.recommend(batch, 10, exclude_history=exclude).items
        found.extend((top_ann[:, :, None] == top_exact[:, None, :]).any(1).float().mean(1).tolist())
        hits += int((top_ann == batch.target[:, None]).any(1).sum())
        hits_exact += int((top_exact == batch.target[:, None]).any(1).sum())

    def latency(retriever) -> dict:
        times = []
        for row in range(min(latency_users, len(es))):
            batch = Batch(history=trim_padding(histories[row:row + 1])[0])
            t = time.perf_counter()
            retriever.recommend(batch, 10, exclude_history=exclude)
            times.append((time.perf_counter() - t) * 1000)
        return {"p50_ms": round(float(np.percentile(times, 50)), 3), "p95_ms": round(float(np.percentile(times, 95)), 3)}

    return {"index": index, "ef_search": ef_search, "checkpoint": str(checkpoint),
            "share_of_exact_top10_found": round(float(np.mean(found)), 4),
            "recall@10_ann": round(hits / len(es), 4), "recall@10_exact": round(hits_exact / len(es), 4),
            "latency_one_user_per_query": {"exact_flat": latency(exact), index: latency(ann),
                                           "users": min(latency_users, len(es))}}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--with", dest="with_q", required=True, help="checkpoint(s) trained with the logQ correction")
    parser.add_argument("--without", dest="without_q", required=True, help="checkpoint(s) trained with model.log_q=off")
    parser.add_argument("--data", type=Path, required=True, help="the `recsys data` run the models were trained on")
    parser.add_argument("--split", default="test", choices=("valid", "test"))
    parser.add_argument("--history", default="kept", choices=("kept", "excluded"))
    parser.add_argument("--head-share", type=float, default=0.2, help="share of items that are popular (default 0.2)")
    parser.add_argument("--ann", default="HNSW32", help="the approximate index (default HNSW32)")
    parser.add_argument("--ef-search", type=int, default=128)
    parser.add_argument("--latency-users", type=int, default=500)
    parser.add_argument("--max-history", type=int, default=20)
    parser.add_argument("--name", help="write benchmarks/results/two_tower/<dataset>/<NAME>.json")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    for label, specs in (("--with", args.with_q), ("--without", args.without_q)):
        for part in specs.split(","):
            if not (Path(part) / "model.json").is_file():
                parser.error(f"{label}: {part} is not a checkpoint directory (no model.json)")
            if checkpoint_model(Path(part)) != "two_tower":
                parser.error(f"{label}: {part} is a {checkpoint_model(Path(part))} checkpoint, not two_tower")
    if len(args.with_q.split(",")) != len(args.without_q.split(",")):
        parser.error("give as many --with seeds as --without seeds (they are paired seed by seed)")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    exclude = args.history == "excluded"
    split = leave_one_out(InteractionData.load(args.data), args.max_history)
    try:
        popular, buckets = popularity_buckets(split, args.head_share)  # fixed before any model is read
    except ValueError as exc:
        parser.error(str(exc))
    es = split.eval_set(args.split)
    with_q, without_q = per_user(args.with_q, es, exclude), per_user(args.without_q, es, exclude)
    target_popular = popular[es.targets]
    table = bucket_table(with_q, without_q, {"all": np.ones(len(es), dtype=bool), "popular": target_popular,
                                             "tail": ~target_popular})
    print(f"{args.split}, history {args.history}, {len(es)} users; popular = top {args.head_share:.0%} of items "
          f"({buckets['popular_share_of_training_interactions']:.1%} of training interactions)\n")
    print("| targets | users | " + " | ".join(f"{n} with | {n} without | with − without" for n in FIGURES) + " |")
    print("|---" * (2 + 3 * len(FIGURES)) + "|")
    for bucket, row in table.items():
        cells = [f"{row['with_log_q'][n]:.4f} | {row['without_log_q'][n]:.4f} | "
                 f"{row['paired_with_minus_without'][n]['diff']:+.4f} ± {row['paired_with_minus_without'][n]['se']:.4f}"
                 for n in FIGURES]
        print(f"| {bucket} | {row['users']} | " + " | ".join(cells) + " |")
    ann = ann_figures(Path(args.with_q.split(",")[0]), es, args.ann, args.ef_search, exclude, args.latency_users)
    print(f"\nANN {ann['index']}: finds {ann['share_of_exact_top10_found']:.1%} of the exact top 10; Recall@10 "
          f"{ann['recall@10_ann']:.4f} (exact {ann['recall@10_exact']:.4f}); latency p50 "
          f"{ann['latency_one_user_per_query'][args.ann]['p50_ms']} ms (Flat "
          f"{ann['latency_one_user_per_query']['exact_flat']['p50_ms']} ms)")
    if args.name:
        means = {n: round(float(with_q[n].mean()), 4) for n in ALL_FIGURES}
        path = write_record(
            args.name, model="two_tower", dataset=run_dataset(args.data),
            config={"with_log_q": args.with_q, "without_log_q": args.without_q, "data_run": str(args.data),
                    "split": args.split, "max_history": args.max_history, "head_share": args.head_share,
                    "threads": args.threads},
            wall_s=time.perf_counter() - start, metrics={args.split: means},
            protocol=protocol(exclude_history=exclude),
            extra={"users": len(es), "seeds": len(args.with_q.split(",")), "buckets": buckets,
                   "by_target_popularity": table,
                   "without_log_q": {n: round(float(without_q[n].mean()), 4) for n in ALL_FIGURES},
                   "ann": ann})
        print(f"\nrecord: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
