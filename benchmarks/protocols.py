"""Score one checkpoint under both full-ranking protocols: history items kept in the ranking, and
history items excluded (S3-Rec's evaluation, which produced Beauty's ``sequences.txt``, masks every
item the user interacted with; no Beauty user repeats an item).

    python benchmarks/protocols.py CHECKPOINT --data DATA_RUN --name NAME [--splits valid,test]

CHECKPOINT is a checkpoint directory (``runs/train/<id>/checkpoints/best``); the model's own
``recommend`` does the excluding (TIGER masks history items at the leaf of the constrained beam
search and widens the beam by the history length; score-all models mask their scores). Only the
model's input window (the last ``max_history`` items) is excluded. Writes two records,
``benchmarks/results/<model>/<dataset>/<NAME>-history-kept.json`` and ``...-history-excluded.json``,
each with its protocol object, its figures under ``metrics.test``/``metrics.valid``, its wall time,
the source checkpoint and the other record's path. ``protocol.refit`` is read from the checkpoint's
training run (``runs/train/<id>/config.json``) when it is there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import record as records  # noqa: E402
from benchmarks.record import checkpoint_model, protocol, run_dataset, write_record  # noqa: E402
from recsys.data.schema import InteractionData  # noqa: E402
from recsys.data.split import leave_one_out  # noqa: E402
from recsys.training.checkpoint import load_model  # noqa: E402
from recsys.runs import read_json  # noqa: E402
from recsys.training.evaluate import evaluate  # noqa: E402

PROTOCOLS = {"history_kept": False, "history_excluded": True}


def trained_with_refit(checkpoint: Path) -> bool:
    """Whether the checkpoint's training run (``<train run>/checkpoints/<name>``) was a refit."""
    config = checkpoint.parent.parent / "config.json"
    return bool(config.is_file() and read_json(config).get("trainer", {}).get("refit", False))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="the `recsys data` run the model was trained on")
    parser.add_argument("--name", required=True, help="records <model>/<dataset>/<name>-history-kept.json and -history-excluded.json")
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
    results: dict[str, dict] = {kind: {} for kind in PROTOCOLS}
    wall: dict[str, float] = {}
    for name in splits:
        for kind, exclude in PROTOCOLS.items():
            t = time.perf_counter()
            m = evaluate(model, split.eval_set(name), batch_size=1024, exclude_history=exclude)
            results[kind][name] = {k: round(v, 4) for k, v in m.items()}
            wall[f"{kind}/{name}"] = round(time.perf_counter() - t, 1)
            print(f"{name:5s} {kind:16s} " + "  ".join(f"{k} {v:.4f}" for k, v in m.items())
                  + f"  ({wall[f'{kind}/{name}']} s)", flush=True)
    model_name, dataset = checkpoint_model(args.checkpoint), run_dataset(args.data)
    refit = trained_with_refit(args.checkpoint)
    names = {kind: f"{args.name}-{kind.replace('_', '-')}" for kind in PROTOCOLS}
    config = {"checkpoint": str(args.checkpoint), "data_run": str(args.data), "max_history": args.max_history,
              "threads": args.threads}
    wall_s = time.perf_counter() - start  # both protocols' evaluations, as one run
    training = records.training_time(args.checkpoint.parent.parent)  # runs/train/<id>/checkpoints/<name>
    for kind, exclude in PROTOCOLS.items():
        other = records.record_path(model_name, dataset, names[next(p for p in PROTOCOLS if p != kind)])
        path = write_record(
            names[kind], model=model_name, dataset=dataset, config=config, wall_s=wall_s, metrics=results[kind],
            protocol=protocol(exclude_history=exclude, refit=refit),
            extra={"source_checkpoint": str(args.checkpoint), "training": training,
                   "machine_note": records.machine_note(args.threads),
                   "eval_wall_s": {k: v for k, v in wall.items() if k.startswith(f"{kind}/")},
                   "other_protocol": str(other.relative_to(records.RESULTS))},
        )
        print(f"record: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
