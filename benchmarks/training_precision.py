"""Training precision, fp32 against bf16 autocast, for any retriever config: samples/s, each as a
fraction of this machine's measured matmul limit, and the test figures each precision reaches
after the same epochs, paired per user. In-process (no Ray), the same seed, batches and users.

    python benchmarks/training_precision.py CONFIG [key=value ...] --data DATA_RUN [--ids IDS_RUN] \
        [--epochs 3] [--threads 2] [--name NAME]

For each precision the model trains ``--epochs`` epochs with the config's validation and selection
(``trainer.selection``), the selected weights are scored on test once (history kept, the headline
protocol, and excluded), and the two precisions are paired user by user (``benchmarks.paired``).

The matmul limit is the best of several square products (``--matmul-size``) in each precision on
the same threads; the model's FLOPs per training sample (forward and backward) are counted by
``torch.utils.flop_counter`` on one training step. ``achieved / limit`` says how much of the
machine a training step uses. It can pass 1 in bf16 where the CPU has no native bf16: a bf16 autocast
step keeps its elementwise work in fp32, and the emulated bf16 matmul is the slower part (an AVX2-only
Zen 3 measured 1.3 GFLOP/s for a 256 x 256 bf16 product against 62.8 in fp32). Writes
``benchmarks/results/<model>/<dataset>/precision-<NAME>.json``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.paired import paired_difference  # noqa: E402
from benchmarks.record import dataset_name, machine_note, protocol, run_dataset, write_record  # noqa: E402
from pipelines.cli import ids_runs_by_space, split_config_args  # noqa: E402
from recsys.data.schema import InteractionData  # noqa: E402
from recsys.data.split import leave_one_out  # noqa: E402
from recsys.experiment import load_experiment  # noqa: E402
from recsys.metrics import per_user_metrics  # noqa: E402
from recsys.training.batching import epoch_batches  # noqa: E402
from recsys.training.evaluate import target_ranks_of  # noqa: E402
from recsys.training.session import build_trainer, model_context  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def matmul_limit(size: int, threads: int, reps: int = 5) -> dict[str, float]:
    """Best GFLOP/s of a (size x size) @ (size x size) product in each precision on ``threads``."""
    torch.set_num_threads(threads)
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # warm-up
        best = min(_timed(lambda: a @ b) for _ in range(reps))
        out[name] = 2 * size ** 3 / best / 1e9
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def flops_per_sample(exp, split, context: dict) -> float:
    """Forward + backward FLOPs of one training step of a throwaway trainer, per training sample."""
    from torch.utils.flop_counter import FlopCounterMode

    trainer = build_trainer(exp, split, context=context)
    cfg = trainer.cfg
    batch = next(iter(epoch_batches(trainer.inputs, trainer.targets, cfg.optim.batch_size, cfg.data.seed, 0, 0, 1,
                                    bucket=cfg.data.bucket, users=trainer.users, timestamps=trainer.times,
                                    target_times=trainer.target_times)))
    trainer.train_model.train()
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(batch)
    return counter.get_total_flops() / len(batch.history)


def train_and_test(exp, split, context: dict, protocols: list[str]) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """Train with the config's selection; the selected weights' test figures, per user, per protocol."""
    trainer = build_trainer(exp, split, context=context)
    best: dict = {}

    def keep_best(metrics: dict, improved: bool, trainer) -> None:
        if improved:  # called with the validated weights (the average, with ema) swapped in
            best["state"] = copy.deepcopy(trainer.model.state_dict())

    start = time.perf_counter()
    state = trainer.fit(keep_best)
    wall = time.perf_counter() - start
    history = state.history
    if "state" in best:
        trainer.model.load_state_dict(best["state"])
    per_user = {}
    for label in protocols:
        ranks = target_ranks_of(trainer.model, split.test, batch_size=exp.eval.batch_size, exclude_history=label == "excluded")
        per_user[label] = per_user_metrics(ranks)
    steps = list(history)
    row = {
        "samples_per_s": round(float(np.mean([h["samples_per_s"] for h in steps])), 1),
        "epoch_s": round(float(np.mean([h["epoch_s"] for h in steps])), 2),
        "epochs": len(steps), "selected_epoch": state.best_epoch,
        "valid": {k[len("valid_"):]: v for k, v in next(h for h in steps if h["epoch"] == state.best_epoch).items()
                  if k.startswith("valid_")} if state.best_epoch else {},
        "train_loss_by_epoch": [round(h["train_loss"], 5) for h in steps],
        "test": {label: {k: float(v.mean()) for k, v in figures.items()} for label, figures in per_user.items()},
        "wall_s": round(wall, 1),
    }
    return row, per_user


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a `recsys data` run")
    parser.add_argument("--ids", action="append", help="an ids run, or SPACE=RUN (models that read semantic IDs)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--protocols", default="kept,excluded",
                        help="test protocols: kept (the headline), excluded, or both")
    parser.add_argument("--name", default="", help="record name suffix (precision-<NAME>.json)")
    parser.add_argument("--note", default="", help="stored in the record, e.g. what else ran")
    args, rest = parser.parse_known_args(argv)
    config, overrides = split_config_args(rest)
    protocols = args.protocols.split(",")
    if not protocols or set(protocols) - {"kept", "excluded"}:
        parser.error(f"--protocols takes kept, excluded or both, got {args.protocols!r}")
    common = [*overrides, "trainer.resources.use_ray=false", f"trainer.resources.threads={args.threads}",
              f"trainer.optim.epochs={args.epochs}"]
    base = load_experiment(config, common)
    data = InteractionData.load(args.data)
    split = leave_one_out(data, base.data.max_history)
    context = model_context(base, split.n_items, ids_runs_by_space(base.model_name, args.ids))
    start = time.perf_counter()
    limit = matmul_limit(args.matmul_size, args.threads)
    print("matmul limit, GFLOP/s:", {k: round(v, 1) for k, v in limit.items()}, flush=True)
    results, per_user = {}, {}
    for precision in PRECISIONS:
        exp = load_experiment(config, [*common, f"trainer.data.precision={precision}"])
        flops = flops_per_sample(exp, split, context)
        row, per_user[precision] = train_and_test(exp, split, context, protocols)
        achieved = flops * row["samples_per_s"] / 1e9
        row.update(gflop_per_sample=round(flops / 1e9, 4), achieved_gflop_s=round(achieved, 2),
                   fraction_of_matmul_limit=round(achieved / limit[precision], 4))
        results[precision] = row
        print(precision, row, flush=True)
    paired = {label: paired_difference(per_user["fp32"][label], per_user["bf16"][label]) for label in protocols}
    speedup = round(results["bf16"]["samples_per_s"] / results["fp32"]["samples_per_s"], 3)
    # keyed by precision (metrics.test/valid are one model's figures; this record holds two)
    metrics = {"test_by_precision": {p: results[p]["test"][protocols[0]] for p in PRECISIONS},
               "valid_by_precision": {p: results[p]["valid"] for p in PRECISIONS},
               "samples_per_s": {p: results[p]["samples_per_s"] for p in PRECISIONS}, "bf16_speedup": speedup,
               "fraction_of_matmul_limit": {p: results[p]["fraction_of_matmul_limit"] for p in PRECISIONS},
               "matmul_limit_gflop_s": {k: round(v, 1) for k, v in limit.items()},
               "bf16_minus_fp32_test": {label: {k: {"diff": round(v["diff"], 5), "se": round(v["se"], 5)}
                                                 for k, v in d.items() if k in ("recall@10", "ndcg@10")}
                                        for label, d in paired.items()}}
    print(metrics, flush=True)
    name = f"precision-{args.name}" if args.name else "precision"
    dataset = run_dataset(args.data)  # a `recsys data` run names it; a bare saved dataset has no config
    dataset = dataset_name(base.to_dict()["data"]) if dataset == "unknown" else dataset
    path = write_record(name, model=base.model_name, dataset=dataset,
                        protocol=protocol(exclude_history=protocols[0] == "excluded", selected_on="valid"),
                        config=base.to_dict(), wall_s=time.perf_counter() - start, metrics=metrics,
                        extra={"details": results, "epochs": args.epochs, "threads": args.threads,
                               "data_run": str(args.data), "ids_runs": args.ids or [],
                               "machine_note": machine_note(args.threads), "note": args.note})
    print(f"record: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
