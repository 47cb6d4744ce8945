"""Score one EAGER checkpoint under each fusion of its two streams: the inference side of the
issue's ablation (confidence-ranked fusion, the released code's sum, each stream alone), on the
same trained model.

    python benchmarks/eager_fusions.py CHECKPOINT --data DATA_RUN --name NAME [--splits valid,test]
        [--fusions confidence,sum,behavior,semantic] [--exclude-history]

Writes ``benchmarks/results/eager/<dataset>/<NAME>-<fusion>.json`` per fusion, with its protocol,
its figures under ``metrics.valid`` / ``metrics.test``, and ``stream_share``: per split, the share
of the top 10 that came from the behaviour stream only, the semantic stream only, or both. Pick
the shipped fusion on validation; the test column is reported once, beside it.

``paired``: each fusion against the first one named (``--fusions``; default ``confidence``), per
split and metric, the mean per-user difference with its standard error (the same users, so the
difference is a finding when it exceeds about two of them).

``latency``: per fusion, one user per call (``model.recommend``, k = 10, in this process, no HTTP),
over the first ``--latency-users`` validation users: p50/p95 in ms. ``behavior`` and ``semantic``
are each stream's beam search alone; ``confidence`` and ``sum`` run both and merge.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.paired import paired_difference  # noqa: E402
from benchmarks.protocols import trained_with_refit  # noqa: E402
from benchmarks.record import protocol, run_dataset, write_record  # noqa: E402
from recsys.data.schema import InteractionData  # noqa: E402
from recsys.data.split import EvalSet, leave_one_out  # noqa: E402
from recsys.models import Batch, Eager  # noqa: E402
from recsys.models.eager import FUSIONS, SPACES  # noqa: E402
from recsys.training.batching import trim_padding  # noqa: E402
from recsys.training.checkpoint import load_model  # noqa: E402
from recsys.metrics import per_user_metrics  # noqa: E402
from recsys.training.evaluate import target_ranks_of  # noqa: E402

STREAMS = (*SPACES, "both")  # FusedRecommendation.streams: 0, 1, 2


@torch.no_grad()
def stream_share(model: Eager, eval_set: EvalSet, k: int, exclude_history: bool, batch_size: int = 512) -> dict:
    """The share of all users' top-k items found by the behaviour stream only, the semantic one
    only, or both."""
    counts = torch.zeros(len(STREAMS))
    histories, targets = torch.tensor(eval_set.histories), torch.tensor(eval_set.targets)
    for start in range(0, len(targets), batch_size):
        batch = Batch(history=trim_padding(histories[start:start + batch_size])[0],
                      target=targets[start:start + batch_size])
        streams = model.recommend_streams(batch, k, exclude_history).streams
        counts += torch.bincount(streams.flatten(), minlength=len(STREAMS)).float()
    return {name: round(float(c / counts.sum()), 4) for name, c in zip(STREAMS, counts)}


@torch.no_grad()
def one_user_latency(model: Eager, eval_set: EvalSet, users: int, exclude_history: bool) -> dict:
    """p50/p95 ms of ``recommend`` for one user at a time (k = 10), after one warm-up call."""
    histories = torch.tensor(eval_set.histories[:max(1, users)])
    model.recommend(Batch(history=trim_padding(histories[:1])[0]), 10, exclude_history)
    times = []
    for row in range(len(histories)):
        batch = Batch(history=trim_padding(histories[row:row + 1])[0])
        start = time.perf_counter()
        model.recommend(batch, 10, exclude_history)
        times.append((time.perf_counter() - start) * 1000)
    ordered = sorted(times)
    return {"users": len(times), "p50_ms": round(ordered[len(ordered) // 2], 2),
            "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2)}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="the `recsys data` run the model was trained on")
    parser.add_argument("--name", required=True, help="records eager/<dataset>/<name>-<fusion>.json")
    parser.add_argument("--splits", default="valid,test", help="comma-separated: valid, test (default: both)")
    parser.add_argument("--fusions", default=",".join(FUSIONS), help=f"comma-separated, of {', '.join(FUSIONS)}")
    parser.add_argument("--exclude-history", action="store_true", help="the second protocol: history items removed")
    parser.add_argument("--max-history", type=int, default=20)
    parser.add_argument("--latency-users", type=int, default=200, help="one-user calls timed per fusion (0: none)")
    parser.add_argument("--valid-users", type=int, default=0,
                        help="> 0: score validation on this fixed random sample of users (the sample training "
                             "selects on with trainer.selection.valid_users and seed 0); test always on all")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    splits, fusions = [s for s in args.splits.split(",") if s], [f for f in args.fusions.split(",") if f]
    if not splits or set(splits) - {"valid", "test"}:
        parser.error(f"--splits must name valid and/or test, got {args.splits!r}")
    if not fusions or set(fusions) - set(FUSIONS):
        parser.error(f"--fusions must name some of {', '.join(FUSIONS)}, got {args.fusions!r}")
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint)
    if not isinstance(model, Eager):
        parser.error(f"{args.checkpoint} holds a {type(model).__name__}, not an EAGER model")
    split = leave_one_out(InteractionData.load(args.data), args.max_history)
    dataset, refit = run_dataset(args.data), trained_with_refit(args.checkpoint)
    reference: dict[str, dict[str, np.ndarray]] = {}  # the first fusion's per-user figures, per split
    for fusion in fusions:
        model.config = dataclasses.replace(model.config, fusion=fusion)
        start = time.perf_counter()
        metrics, share, paired = {}, {}, {}
        for name in splits:
            eval_set = split.eval_set(name)
            if name == "valid":  # as training draws it at seed 0
                eval_set = eval_set.sample(args.valid_users, seed=0)
            per_user = per_user_metrics(target_ranks_of(model, eval_set, batch_size=512,
                                                        exclude_history=args.exclude_history))
            figures = {k: float(v.mean()) for k, v in per_user.items()}
            metrics[name] = {k: round(v, 4) for k, v in figures.items()}
            reference.setdefault(name, per_user)
            if fusion != fusions[0]:
                keys = ("recall@10", "ndcg@10")
                difference = paired_difference({k: reference[name][k] for k in keys}, {k: per_user[k] for k in keys})
                paired[name] = {k: {"mean": round(d["diff"], 4), "se": round(d["se"], 4)} for k, d in difference.items()}
                print(f"{fusion:10s} {name:5s} minus {fusions[0]}: " + "  ".join(
                    f"{k} {v['mean']:+.4f} ± {v['se']:.4f}" for k, v in paired[name].items()), flush=True)
            share[name] = stream_share(model, eval_set, 10, args.exclude_history)
            print(f"{fusion:10s} {name:5s} " + "  ".join(f"{k} {v:.4f}" for k, v in figures.items())
                  + f"  top-10 from {share[name]}", flush=True)
        latency = one_user_latency(model, split.eval_set("valid"), args.latency_users, args.exclude_history) \
            if args.latency_users else None
        if latency:
            print(f"{fusion:10s} one user per call: p50 {latency['p50_ms']} ms, p95 {latency['p95_ms']} ms", flush=True)
        path = write_record(f"{args.name}-{fusion}", model="eager", dataset=dataset,
                            config={"checkpoint": str(args.checkpoint), "data_run": str(args.data), "fusion": fusion,
                                    "max_history": args.max_history, "threads": args.threads,
                                    "valid_users": args.valid_users or "all"},
                            wall_s=time.perf_counter() - start, metrics=metrics,
                            protocol=protocol(exclude_history=args.exclude_history, refit=refit),
                            extra={"stream_share": share, "source_checkpoint": str(args.checkpoint),
                                   "latency_one_user": latency,
                                   "paired": {"against": fusions[0], **paired} if paired else None})
        print(f"record: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
