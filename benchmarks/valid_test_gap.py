"""Where a model's validation-to-test drop comes from, beside the last-item transition counts: each
split's users are sliced by whether the training data holds the transition (last history item ->
target), and each slice's NDCG@10 and Recall@10 are given for the model and the counts.

    python benchmarks/valid_test_gap.py CHECKPOINT --data DATA_RUN [--history kept|excluded] \
        [--splits valid,test] [--threads 2]

Slices (fixed from training transitions alone, before any scoring):
- ``seen``: the pair (last history item, target) occurs in the training sequences;
- ``unseen-known``: it does not, but the last item has training successors;
- ``unseen-new``: the last item has no training successor at all (at test it is often the validation
  target, an item that only ever ended a training sequence).

Prints a table; ``--name`` also writes benchmarks/results/<model>/<dataset>/gap-<NAME>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.compare_paired import counts_ranks  # noqa: E402
from benchmarks.record import checkpoint_model, protocol, run_dataset, write_record  # noqa: E402
from benchmarks.split_baselines import transition_counts  # noqa: E402
from recsys.data.schema import InteractionData  # noqa: E402
from recsys.data.split import EvalSet, leave_one_out  # noqa: E402
from recsys.metrics import per_user_metrics  # noqa: E402
from recsys.training.checkpoint import load_model  # noqa: E402
from recsys.training.evaluate import target_ranks_of  # noqa: E402

SLICES = ("seen", "unseen-known", "unseen-new")


def slice_of_users(es: EvalSet, table: dict) -> np.ndarray:
    """(U,) slice name of each user (see the module docstring)."""
    out = np.empty(len(es.targets), dtype=object)
    for row, (history, target) in enumerate(zip(es.histories, es.targets)):
        successors = table.get(int(history[-1]))
        if successors is None:
            out[row] = "unseen-new"
        else:
            out[row] = "seen" if int(target) in set(successors[0].tolist()) else "unseen-known"
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--history", default="kept", choices=("kept", "excluded"))
    parser.add_argument("--max-history", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--splits", default="valid,test", help="valid, test or both (a pilot reads valid only)")
    parser.add_argument("--name", help="write a record gap-<NAME>.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    exclude = args.history == "excluded"
    split = leave_one_out(InteractionData.load(args.data), args.max_history)
    table = transition_counts(split)
    model = load_model(args.checkpoint)
    figures: dict = {}
    splits = args.splits.split(",")
    if not splits or set(splits) - {"valid", "test"}:
        parser.error(f"--splits takes valid, test or both, got {args.splits!r}")
    for name in splits:
        es = split.eval_set(name)
        slices = slice_of_users(es, table)
        per_model = {"model": per_user_metrics(target_ranks_of(model, es, exclude_history=exclude)),
                     "counts": per_user_metrics(counts_ranks(split, es, exclude))}
        figures[name] = {}
        for part in ("all", *SLICES):
            rows = np.ones(len(es), bool) if part == "all" else slices == part
            figures[name][part] = {"users": int(rows.sum()), **{
                label: {k: round(float(m[k][rows].mean()), 4) if rows.any() else None for k in ("recall@10", "ndcg@10")}
                for label, m in per_model.items()}}
    print(f"history {args.history}; NDCG@10 (Recall@10), model / counts")
    print("| slice | " + " | ".join(f"{n} users | {n} model | {n} counts" for n in splits) + " |")
    print("|---" * (1 + 3 * len(splits)) + "|")
    for part in ("all", *SLICES):
        cells = []
        for name in splits:
            f = figures[name][part]
            cells += [f"{f['users']}"] + [f"{f[label]['ndcg@10']} ({f[label]['recall@10']})" for label in ("model", "counts")]
        print(f"| {part} | " + " | ".join(cells) + " |")
    if args.name:
        path = write_record(f"gap-{args.name}", model=checkpoint_model(args.checkpoint), dataset=run_dataset(args.data),
                            config={"checkpoint": str(args.checkpoint), "data_run": str(args.data),
                                    "history": args.history, "max_history": args.max_history, "splits": splits},
                            wall_s=time.perf_counter() - start, metrics={},
                            protocol=protocol(exclude_history=exclude), extra={"slices": figures})
        print(f"record: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
