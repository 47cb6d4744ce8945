"""What a training step costs in each precision on this CPU: steps of any config under bf16 autocast
against fp32, on the same batches, model and threads. Where the CPU has no native bf16 (no AVX-512
BF16 or AMX), bf16 is converted through fp32 and is the slower one; ``trainer.data.precision=auto``
picks fp32 there (``recsys.hardware``).

    python benchmarks/precision_step.py CONFIG [key=value ...] --data DATA_RUN [--ids IDS_RUN | --ids SPACE=RUN] \
        [--steps 25] [--warmup 3] [--rounds 2] [--threads 2] [--matmul-size 2048] [--name NAME]

The two alternate over ``--rounds`` rounds as in ``dropout_step.py``; the figure per precision is its
best round. The record also holds the best of five ``--matmul-size`` square matmuls per precision on
the same threads (the machine's matmul limit), and what ``auto`` resolves to here. Writes
``benchmarks/results/<model>/<dataset>/precision-step[-NAME].json``.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.dropout_step import step_arguments, time_variants, trainer_and_batches, write_step_record  # noqa: E402
from benchmarks.training_precision import matmul_limit  # noqa: E402
from recsys import hardware  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def main(argv: list[str]) -> None:
    parser = step_arguments(__doc__.splitlines()[0])
    parser.add_argument("--name", default="", help="record name suffix (precision-step-<NAME>.json)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the square matmuls timed per precision")
    start = time.perf_counter()
    args, exp, trainer, batches = trainer_and_batches(parser, argv)
    rounds = time_variants(trainer, batches, args, {p: functools.partial(mock.patch.object, trainer, "precision", p)
                                                    for p in PRECISIONS})
    matmul = {name: round(gflop_s, 1) for name, gflop_s in matmul_limit(args.matmul_size, args.threads).items()}
    write_step_record("precision-step", args, exp, trainer, rounds, "fp32", start,
                      {"matmul_gflops": matmul, "auto_resolves_to": hardware.resolve_precision("auto", "cpu")},
                      extra={"matmul_size": args.matmul_size})


if __name__ == "__main__":
    main(sys.argv[1:])
