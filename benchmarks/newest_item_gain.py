"""How much a retriever gains from the newest history item: each sampled user is scored twice per
split, with the history as the protocol gives it and with its newest item dropped, against the same
target. Paired per user, so the gain comes with its standard error.

    python benchmarks/newest_item_gain.py CKPT[,CKPT...] --data DATA_RUN [--users 4000] [--names N[,N...]]

- ``valid``: history 1..n-2 -> n-1, against 1..n-3 -> n-1 (the newest item, n-2, ended the user's
  training sequence);
- ``test``: history 1..n-1 -> n, against 1..n-2 -> n (the newest item, n-1, is the validation
  target: no training sequence of this user holds it).
Users with at least 4 items (so the shortened valid history keeps one item), sampled once with
``--seed``; history kept in the ranking. A model that gains much less from the newest item than
SASRec does, or much less at test than at validation, loses the first-order transitions that the
ID models and the last-item counts exploit. ``--names`` (one per checkpoint) writes
benchmarks/results/<model>/<dataset>/newest-<NAME>.json for each.
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
from recsys.data.schema import InteractionData  # noqa: E402
from recsys.data.split import EvalSet, pad_left  # noqa: E402
from recsys.metrics import per_user_metrics  # noqa: E402
from recsys.training.checkpoint import load_model  # noqa: E402
from recsys.training.evaluate import target_ranks_of  # noqa: E402

KEYS = ("recall@10", "ndcg@10")


def eval_sets(sequences: list[np.ndarray], users: np.ndarray, max_history: int) -> dict[str, dict[str, EvalSet]]:
    """{split: {"full": ..., "without newest": ...}} over ``users`` (indices into ``sequences``)."""
    seqs = [sequences[u] for u in users]

    def rows(history_end: int, target_back: int) -> EvalSet:  # history s[:-history_end], target s[-target_back]
        return EvalSet(users, pad_left([s[:-history_end] for s in seqs], max_history),
                       np.array([s[-target_back] for s in seqs], dtype=np.int64))

    return {"valid": {"full": rows(2, 2), "without newest": rows(3, 2)},
            "test": {"full": rows(1, 1), "without newest": rows(2, 1)}}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", help="comma-separated checkpoint directories")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--users", type=int, default=4000, help="users sampled (0: all with >= 4 items)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-history", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--names", help="comma-separated, one per checkpoint: write records newest-<NAME>.json")
    args = parser.parse_args(argv)
    checkpoints = args.checkpoints.split(",")
    names = args.names.split(",") if args.names else [None] * len(checkpoints)
    if len(names) != len(checkpoints):
        parser.error(f"--names gives {len(names)} names for {len(checkpoints)} checkpoints")
    torch.set_num_threads(args.threads)
    sequences = InteractionData.load(args.data).item_sequences()
    eligible = np.array([u for u, s in enumerate(sequences) if len(s) >= 4], dtype=np.int64)
    if args.users < 0 or args.users > len(eligible):
        parser.error(f"--users must be in 0..{len(eligible)} (users with at least 4 items), got {args.users}")
    users = eligible if args.users == 0 else \
        np.sort(np.random.default_rng(args.seed).choice(eligible, size=args.users, replace=False))
    sets = eval_sets(sequences, users, args.max_history)
    print(f"{len(users)} users; history kept; Recall@10 / NDCG@10; gain = full - without newest (paired SE)")
    for checkpoint, name in zip(checkpoints, names):
        start = time.perf_counter()
        model = load_model(Path(checkpoint))
        figures: dict = {}
        for split, pair in sets.items():
            per = {name: per_user_metrics(target_ranks_of(model, es)) for name, es in pair.items()}
            figures[split] = {name: {k: round(float(m[k].mean()), 4) for k in KEYS} for name, m in per.items()}
            gain = paired_difference({k: per["without newest"][k] for k in KEYS}, {k: per["full"][k] for k in KEYS})
            figures[split]["gain"] = {k: {"mean": round(d["diff"], 4), "se": round(d["se"], 4)} for k, d in gain.items()}
        print(checkpoint)
        for split, f in figures.items():
            g = f["gain"]
            print(f"  {split:5s} full {f['full']['recall@10']:.4f} / {f['full']['ndcg@10']:.4f}   "
                  f"without newest {f['without newest']['recall@10']:.4f} / {f['without newest']['ndcg@10']:.4f}   "
                  f"gain {g['recall@10']['mean']:+.4f} ± {g['recall@10']['se']:.4f} / "
                  f"{g['ndcg@10']['mean']:+.4f} ± {g['ndcg@10']['se']:.4f}", flush=True)
        if name:
            path = write_record(f"newest-{name}", model=checkpoint_model(Path(checkpoint)),
                                dataset=run_dataset(args.data),
                                config={"checkpoint": checkpoint, "data_run": str(args.data), "users": len(users),
                                        "seed": args.seed, "max_history": args.max_history, "threads": args.threads},
                                wall_s=time.perf_counter() - start, metrics={},
                                protocol=protocol(exclude_history=False), extra={"newest_item": figures})
            print(f"  record: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
