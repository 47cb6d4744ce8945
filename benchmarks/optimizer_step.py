"""What the optimizer step costs: training steps of any config with torch's per-tensor AdamW (its
default on a CPU: about ten ops per parameter tensor, looped in Python) against the fused AdamW the
trainer builds (``recsys.training.loop.build_optimizer``: one kernel per tensor), on the same batches,
model and threads.

    python benchmarks/optimizer_step.py CONFIG [key=value ...] --data DATA_RUN [--ids IDS_RUN | --ids SPACE=RUN] \
        [--steps 25] [--warmup 3] [--rounds 2] [--threads 2] [--name NAME]

The two alternate over ``--rounds`` rounds as in ``dropout_step.py`` (each with a fresh optimizer and
schedule over the same parameters); the figure per optimizer is its best round. Writes
``benchmarks/results/<model>/<dataset>/optimizer-step[-NAME].json``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.dropout_step import step_arguments, step_seconds, trainer_and_batches  # noqa: E402
from benchmarks.record import dataset_name, machine_note, protocol, run_dataset, write_record  # noqa: E402
from recsys.training.loop import build_optimizer, build_scheduler  # noqa: E402


def per_tensor_adamw(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    fused = build_optimizer(model, cfg)  # the same hyperparameters, unfused
    group = {k: v for k, v in fused.defaults.items() if k in ("lr", "betas", "eps", "weight_decay", "amsgrad")}
    return torch.optim.AdamW(model.parameters(), **group, foreach=False, fused=False)


OPTIMIZERS = {"per_tensor": per_tensor_adamw, "fused": build_optimizer}


def main(argv: list[str]) -> None:
    parser = step_arguments(__doc__.splitlines()[0])
    parser.add_argument("--name", default="", help="record name suffix (optimizer-step-<NAME>.json)")
    start = time.perf_counter()
    args, exp, trainer, batches = trainer_and_batches(parser, argv)
    cfg = trainer.cfg
    rounds: dict[str, list[float]] = {name: [] for name in OPTIMIZERS}
    for _ in range(args.rounds):
        for name, build in OPTIMIZERS.items():
            trainer.optimizer = build(trainer.train_model, cfg)
            trainer.scheduler = build_scheduler(trainer.optimizer, cfg, trainer.steps_per_epoch * cfg.optim.epochs)
            rounds[name].append(step_seconds(trainer, batches, args.warmup))
            print(f"{name}: {rounds[name][-1]:.4f} s/step", flush=True)
    best = {name: min(times) for name, times in rounds.items()}
    tensors = sum(1 for p in trainer.train_model.parameters() if p.requires_grad)
    metrics = {"s_per_step": {name: round(t, 4) for name, t in best.items()},
               "samples_per_s": {name: round(cfg.optim.batch_size / t, 1) for name, t in best.items()},
               "step_time_saved": round(1 - best["fused"] / best["per_tensor"], 3)}
    print(metrics, flush=True)
    dataset = run_dataset(args.data)
    dataset = dataset_name(exp.to_dict()["data"]) if dataset == "unknown" else dataset
    path = write_record(f"optimizer-step-{args.name}" if args.name else "optimizer-step", model=exp.model_name,
                        dataset=dataset, config=exp.to_dict(), wall_s=time.perf_counter() - start, metrics=metrics,
                        # timed training steps only: nothing is ranked or selected
                        protocol=protocol(exclude_history=False, selected_on="none"),
                        extra={"rounds_s_per_step": rounds, "steps": args.steps, "warmup": args.warmup,
                               "batch_size": cfg.optim.batch_size, "precision": trainer.precision,
                               "parameter_tensors": tensors,
                               "parameters": sum(p.numel() for p in trainer.train_model.parameters()),
                               "data_run": str(args.data), "ids_runs": args.ids or [],
                               "machine_note": machine_note(args.threads)})
    print(f"record: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
