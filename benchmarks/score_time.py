"""Time full-catalogue scoring of a checkpoint (what validation and `recsys evaluate` do) and save the
target ranks, so that two versions of the code can be compared on the same users.

    python benchmarks/score_time.py CHECKPOINT --data DATA_RUN [--split valid] [--users 1000] \
        [--threads 2] [--ranks OUT.npy]

Scores the first ``--users`` users of the split (history kept), after a 50-user warm-up, and prints
the seconds and users/s. ``--ranks`` saves each user's target rank (-1: not in the top 20). To
compare code versions, run it once per version (e.g. ``PYTHONPATH=<a worktree at the old commit>``)
and compare the saved ranks with numpy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recsys.data.schema import InteractionData  # noqa: E402
from recsys.data.split import leave_one_out  # noqa: E402
from recsys.training.checkpoint import load_model  # noqa: E402
from recsys.training.evaluate import target_ranks_of  # noqa: E402


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a train run's checkpoints/best (or last)")
    parser.add_argument("--data", type=Path, required=True, help="the `recsys data` run it trained on")
    parser.add_argument("--split", choices=("valid", "test"), default="valid")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--max-history", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ranks", type=Path, help="save the target ranks here (.npy)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint).eval()
    split = leave_one_out(InteractionData.load(args.data), args.max_history)
    examples = getattr(split, args.split)
    n = min(args.users, len(examples))
    target_ranks_of(model, examples.subset(np.arange(min(50, n))))  # warm-up
    start = time.perf_counter()
    ranks = target_ranks_of(model, examples.subset(np.arange(n)))
    seconds = time.perf_counter() - start
    print(f"{n} {args.split} users in {seconds:.2f} s ({n / seconds:.1f} users/s)")
    if args.ranks is not None:
        np.save(args.ranks, ranks)
    return {"users": n, "seconds": seconds, "ranks": ranks}


if __name__ == "__main__":
    main(sys.argv[1:])
