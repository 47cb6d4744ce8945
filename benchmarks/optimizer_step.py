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

import contextlib
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.dropout_step import step_arguments, time_variants, trainer_and_batches, write_step_record  # noqa: E402
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

    @contextlib.contextmanager
    def optimizer(build):
        trainer.optimizer = build(trainer.train_model, trainer.cfg)
        trainer.scheduler = build_scheduler(trainer.optimizer, trainer.cfg,
                                            trainer.steps_per_epoch * trainer.cfg.optim.epochs)
        yield

    rounds = time_variants(trainer, batches, args,
                           {name: functools.partial(optimizer, build) for name, build in OPTIMIZERS.items()})
    parameters = [p for p in trainer.train_model.parameters() if p.requires_grad]
    write_step_record("optimizer-step", args, exp, trainer, rounds, "per_tensor", start,
                      extra={"parameter_tensors": len(parameters), "parameters": sum(p.numel() for p in parameters)})


if __name__ == "__main__":
    main(sys.argv[1:])
