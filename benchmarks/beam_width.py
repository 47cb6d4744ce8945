"""Choose a generative retriever's beam width on validation, then score test once at that width.

    python benchmarks/beam_width.py CHECKPOINT --data DATA_RUN --name NAME [--beams 20,50]

CHECKPOINT is a TIGER checkpoint directory (``runs/train/<id>/checkpoints/best``), DATA_RUN the
``recsys data`` run it was trained on. Every width is scored on all validation users (history
items excluded, as in selection during training); the width with the best validation
``--select`` metric is chosen (the narrower one on a tie) and test is computed for it alone.
Writes ``benchmarks/results/<model>/<dataset>/<NAME>-beams.json``: ``metrics.test`` at the chosen width,
``valid_by_beam`` and ``eval_wall_s`` per width.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.record import checkpoint_model, protocol, run_dataset, write_record  # noqa: E402
from recsys.data.schema import InteractionData  # noqa: E402
from recsys.data.split import leave_one_out  # noqa: E402
from recsys.metrics import DEFAULT_KS, metric_names  # noqa: E402
from recsys.training.checkpoint import load_model  # noqa: E402
from recsys.training.evaluate import evaluate  # noqa: E402


def parse_beams(text: str) -> list[int]:
    try:
        beams = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise SystemExit(f"--beams must be comma-separated integers, got {text!r}") from None
    if not beams or beams[0] < 1:
        raise SystemExit(f"--beams must name at least one width >= 1, got {text!r}")
    return beams


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="the `recsys data` run the model was trained on")
    parser.add_argument("--name", required=True, help="record name: benchmarks/results/<model>/<dataset>/<name>-beams.json")
    parser.add_argument("--beams", default="20,50", help="comma-separated beam widths (default: 20,50)")
    parser.add_argument("--select", default="recall@10", choices=metric_names(DEFAULT_KS))
    parser.add_argument("--max-history", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    beams = parse_beams(args.beams)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    split = leave_one_out(InteractionData.load(args.data), args.max_history)
    model = load_model(args.checkpoint)
    if model.beam_width(1) is None:
        raise SystemExit(f"{args.checkpoint} holds a {type(model).__name__}, which does not decode by beam search")
    valid, wall = {}, {}
    for beam in beams:
        model.config.beam_size = beam
        t = time.perf_counter()
        m = evaluate(model, split.valid, batch_size=1024, exclude_history=True)
        valid[beam], wall[f"valid/{beam}"] = {k: round(v, 4) for k, v in m.items()}, round(time.perf_counter() - t, 1)
        print(f"valid beam {beam:4d}  " + "  ".join(f"{k} {v:.4f}" for k, v in m.items())
              + f"  ({wall[f'valid/{beam}']} s)", flush=True)
    chosen = max(beams, key=lambda b: (valid[b][args.select], -b))
    model.config.beam_size = chosen
    t = time.perf_counter()
    test = {k: round(v, 4) for k, v in evaluate(model, split.test, batch_size=1024, exclude_history=True).items()}
    wall[f"test/{chosen}"] = round(time.perf_counter() - t, 1)
    print(f"test  beam {chosen:4d}  " + "  ".join(f"{k} {v:.4f}" for k, v in test.items())
          + f"  ({wall[f'test/{chosen}']} s)", flush=True)
    path = write_record(
        f"{args.name}-beams", model=checkpoint_model(args.checkpoint), dataset=run_dataset(args.data),
        protocol=protocol(exclude_history=True), config={"checkpoint": str(args.checkpoint), "data_run": str(args.data),
                                      "beams": beams, "select": args.select, "max_history": args.max_history,
                                      "threads": args.threads, "exclude_history": True},
        wall_s=time.perf_counter() - start, metrics={"test": test, "valid": valid[chosen]},
        extra={"chosen_beam": chosen, "valid_by_beam": {str(b): v for b, v in valid.items()}, "eval_wall_s": wall},
    )
    print(f"record: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
