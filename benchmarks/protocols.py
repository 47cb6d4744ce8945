"""Score one checkpoint under both full-ranking protocols: history items kept in the ranking, and
history items excluded (S3-Rec's evaluation, which produced Beauty's ``sequences.txt``, masks every
item the user interacted with; no Beauty user repeats an item).

    python benchmarks/protocols.py CHECKPOINT --data DATA_RUN --name NAME [--splits valid,test]

CHECKPOINT is a checkpoint directory (``runs/train/<id>/checkpoints/best``); the model's own
``recommend`` does the excluding (TIGER masks history items at the leaf of the constrained beam
search and widens the beam by the history length; score-all models mask their scores). Only the
model's input window (the last ``max_history`` items) is excluded. Writes
``benchmarks/results/<NAME>-protocols.json``: ``metrics.test``/``metrics.valid`` hold the
history-excluded figures, ``history_kept`` the others, each with its wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.record import write_record  # noqa: E402
from recsys.data.schema import InteractionData  # noqa: E402
from recsys.data.split import leave_one_out  # noqa: E402
from recsys.training.checkpoint import load_model  # noqa: E402
from recsys.training.evaluate import evaluate  # noqa: E402

PROTOCOLS = {"history_kept": False, "history_excluded": True}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="the `recsys data` run the model was trained on")
    parser.add_argument("--name", required=True, help="record name: benchmarks/results/<name>-protocols.json")
    parser.add_argument("--splits", default="test", help="comma-separated: valid, test (default: test)")
    parser.add_argument("--max-history", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    splits = [s for s in args.splits.split(",") if s]
    if not splits or set(splits) - {"valid", "test"}:
        parser.error(f"--splits must name valid and/or test, got {args.splits!r}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    split = leave_one_out(InteractionData.load(args.data), args.max_history)
    model = load_model(args.checkpoint)
    results: dict[str, dict] = {protocol: {} for protocol in PROTOCOLS}
    wall: dict[str, float] = {}
    for name in splits:
        for protocol, exclude in PROTOCOLS.items():
            t = time.perf_counter()
            m = evaluate(model, split.eval_set(name), batch_size=1024, exclude_history=exclude)
            results[protocol][name] = {k: round(v, 4) for k, v in m.items()}
            wall[f"{protocol}/{name}"] = round(time.perf_counter() - t, 1)
            print(f"{name:5s} {protocol:16s} " + "  ".join(f"{k} {v:.4f}" for k, v in m.items())
                  + f"  ({wall[f'{protocol}/{name}']} s)", flush=True)
    path = write_record(
        f"{args.name}-protocols", config={"checkpoint": str(args.checkpoint), "data_run": str(args.data),
                                          "max_history": args.max_history, "threads": args.threads},
        wall_s=time.perf_counter() - start, metrics=results["history_excluded"],
        extra={"history_kept": results["history_kept"], "eval_wall_s": wall},
    )
    print(f"record: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
