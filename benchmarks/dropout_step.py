"""What the dropout mask costs: training steps of any config with torch's dropout (``F.dropout``,
one ``bernoulli_`` draw per element on a CPU) against the project's ``layers.inverted_dropout``
(four 16-bit uniforms per random 64-bit word), on the same batches, model and threads.

    python benchmarks/dropout_step.py CONFIG [key=value ...] --data DATA_RUN [--ids IDS_RUN | --ids SPACE=RUN] \
        [--steps 25] [--warmup 3] [--rounds 2] [--threads 2] [--name NAME]

Both masks alternate over ``--rounds`` rounds (torch, ours, torch, ours, ...), each round training
``--warmup`` untimed and ``--steps`` timed steps of the config's first batches, so a machine that
slows down during the run slows both. The figure per mask is its best round. The record also holds
the mask alone on a 5.6M-element bf16 tensor (an EAGER feed-forward activation of a 256 batch).
Writes ``benchmarks/results/<model>/<dataset>/dropout-step[-NAME].json``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.record import dataset_name, machine_note, protocol, run_dataset, write_record  # noqa: E402
from pipelines.cli import ids_runs_by_space, split_config_args  # noqa: E402
from recsys.data.schema import InteractionData  # noqa: E402
from recsys.data.split import leave_one_out  # noqa: E402
from recsys.experiment import load_experiment  # noqa: E402
from recsys.models import layers  # noqa: E402
from recsys.training.batching import epoch_batches  # noqa: E402
from recsys.training.session import build_trainer, model_context  # noqa: E402

MASK_ELEMENTS = 5_600_000


def torch_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    return F.dropout(x, p, training)


MASKS = {"torch": torch_dropout, "inverted": layers.inverted_dropout}


def mask_ms(fn, reps: int = 20) -> float:
    x = torch.randn(MASK_ELEMENTS, dtype=torch.bfloat16)
    fn(x, 0.1)
    start = time.perf_counter()
    for _ in range(reps):
        fn(x, 0.1)
    return (time.perf_counter() - start) / reps * 1000


def step_seconds(trainer, batches: list, warmup: int) -> float:
    for batch in batches[:warmup]:
        trainer.train_step(batch)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        trainer.train_step(batch)
    return (time.perf_counter() - start) / (len(batches) - warmup)


def step_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments every step-timing script takes (this one and optimizer_step.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", type=Path, required=True, help="a `recsys data` run")
    parser.add_argument("--ids", action="append", help="an ids run, or SPACE=RUN (models that read semantic IDs)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    return parser


def trainer_and_batches(parser: argparse.ArgumentParser, argv: list[str]):
    """(args, experiment, trainer, its first warmup + steps batches), the trainer in training mode."""
    args, rest = parser.parse_known_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--steps and --rounds take at least 1, --warmup at least 0")
    config, overrides = split_config_args(rest)
    exp = load_experiment(config, [*overrides, "trainer.resources.use_ray=false",
                                   f"trainer.resources.threads={args.threads}"])
    torch.set_num_threads(args.threads)
    split = leave_one_out(InteractionData.load(args.data), exp.data.max_history)
    context = model_context(exp, split.n_items, ids_runs_by_space(exp.model_name, args.ids))
    trainer = build_trainer(exp, split, context=context)
    cfg = trainer.cfg
    stream = epoch_batches(trainer.inputs, trainer.targets, cfg.optim.batch_size, cfg.data.seed, 0, 0, 1,
                           bucket=cfg.data.bucket, users=trainer.users, timestamps=trainer.times,
                           target_times=trainer.target_times)
    batches = [batch for _, batch in zip(range(args.warmup + args.steps), stream)]
    if len(batches) <= args.warmup:
        raise SystemExit(f"the data gives {len(batches)} batches of {cfg.optim.batch_size}; "
                         f"--warmup {args.warmup} leaves none to time")
    trainer.train_model.train()
    return args, exp, trainer, batches


def time_variants(trainer, batches: list, args: argparse.Namespace,
                  variants: dict[str, Callable[[], ContextManager]]) -> dict[str, list[float]]:
    """Seconds per step of each variant (a context the steps run in), alternating over the rounds."""
    rounds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, variant in variants.items():
            with variant():
                rounds[name].append(step_seconds(trainer, batches, args.warmup))
            print(f"{name}: {rounds[name][-1]:.4f} s/step", flush=True)
    return rounds


def write_step_record(kind: str, args: argparse.Namespace, exp, trainer, rounds: dict[str, list[float]],
                      baseline: str, start: float, metrics: dict | None = None, extra: dict | None = None) -> None:
    """``<kind>[-NAME].json``: each variant's best round, and the step time the other saves against
    ``baseline``."""
    best = {name: min(times) for name, times in rounds.items()}
    (other,) = set(best) - {baseline}
    batch_size = trainer.cfg.optim.batch_size
    metrics = {"s_per_step": {name: round(t, 4) for name, t in best.items()},
               "samples_per_s": {name: round(batch_size / t, 1) for name, t in best.items()},
               "step_time_saved": round(1 - best[other] / best[baseline], 3), **(metrics or {})}
    print(metrics, flush=True)
    dataset = run_dataset(args.data)
    dataset = dataset_name(exp.to_dict()["data"]) if dataset == "unknown" else dataset
    path = write_record(f"{kind}-{args.name}" if args.name else kind, model=exp.model_name,
                        dataset=dataset, config=exp.to_dict(), wall_s=time.perf_counter() - start, metrics=metrics,
                        # timed training steps only: nothing is ranked or selected
                        protocol=protocol(exclude_history=False, selected_on="none"),
                        extra={"rounds_s_per_step": rounds, "steps": args.steps, "warmup": args.warmup,
                               "batch_size": batch_size, "precision": trainer.precision,
                               "data_run": str(args.data), "ids_runs": args.ids or [],
                               "machine_note": machine_note(args.threads), **(extra or {})})
    print(f"record: {path}")


def main(argv: list[str]) -> None:
    parser = step_arguments(__doc__.splitlines()[0])
    parser.add_argument("--name", default="", help="record name suffix (dropout-step-<NAME>.json)")
    start = time.perf_counter()
    args, exp, trainer, batches = trainer_and_batches(parser, argv)
    rounds = time_variants(trainer, batches, args, {name: functools.partial(mock.patch.object, layers,
                                                                            "inverted_dropout", fn)
                                                    for name, fn in MASKS.items()})
    mask = {name: round(mask_ms(fn), 2) for name, fn in MASKS.items()}
    write_step_record("dropout-step", args, exp, trainer, rounds, "torch", start, {"mask_ms_5_6M_bf16": mask})


if __name__ == "__main__":
    main(sys.argv[1:])
