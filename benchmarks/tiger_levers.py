"""The CPU speed levers for TIGER training, measured one at a time on the same batches.

    python benchmarks/tiger_levers.py --data DATA_RUN --ids IDS_RUN configs/beauty-tiger.yaml \
        [--steps 20] [key=value ...]

Rows (training samples/s over ``--steps`` steps after 2 warm-up steps, in-process):
- model shape: the paper's (4 + 4 layers, 6 heads of 64, MLP 1024) against the config's;
- precision: fp32 against bf16 autocast;
- padding: every history padded to max_history, batches trimmed to their longest history,
  and trimmed batches bucketed by length (``trainer.data.bucket``).
Each row starts from the same initial weights and sees the same batches as the rows with the
same padding, so the mean loss over the timed steps shows whether bf16 tracks fp32.
Also: training windows per epoch for ``samples=last`` against ``prefixes``, and the cost of
one validation by beam search over a fixed sample of users against all validation users.
Writes benchmarks/results/tiger/<dataset>/training-levers.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.record import dataset_name, write_record  # noqa: E402
from pipelines.cli import split_config_args  # noqa: E402
from recsys.data.schema import InteractionData  # noqa: E402
from recsys.data.split import leave_one_out, training_windows  # noqa: E402
from recsys.experiment import load_experiment  # noqa: E402
from recsys.models import Batch  # noqa: E402
from recsys.training.batching import epoch_batches  # noqa: E402
from recsys.training.session import build_trainer, model_context  # noqa: E402

PAPER_SHAPE = ["model.d_model=128", "model.n_encoder_layers=4", "model.n_decoder_layers=4", "model.n_heads=6",
               "model.head_dim=64", "model.d_ff=1024"]


def samples_per_s(trainer, steps: int, padding: str, max_len: int) -> tuple[float, float]:
    """-> (training samples/s, mean loss over the timed steps); the same batches for every call."""
    bucket = 50 if padding == "bucketed" else 0
    batches = epoch_batches(trainer.inputs, trainer.targets, trainer.cfg.optim.batch_size, 0, 0, bucket=bucket,
                            users=trainer.users)
    if padding == "padded":  # undo the trimming: every row as long as max_history
        batches = (Batch(history=F.pad(b.history, (max_len - b.history.shape[1], 0)),
                         targets=F.pad(b.targets, (max_len - b.targets.shape[1], 0)), users=b.users) for b in batches)
    for _ in range(2):
        trainer.train_step(next(batches))
    rows, losses, t0 = 0, [], time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        losses.append(trainer.train_step(batch)["loss"])
        rows += len(batch.history)
    return rows / (time.perf_counter() - t0), sum(losses) / len(losses)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--ids", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--valid-users", type=int, default=2000)
    ns, rest = parser.parse_known_args(argv)
    path, overrides = split_config_args(rest)
    base = load_experiment(path, [*overrides, "trainer.resources.use_ray=false"])
    split = leave_one_out(InteractionData.load(ns.data), base.data.max_history)
    context = model_context(base, split.n_items, ns.ids)
    start, rows = time.perf_counter(), []
    for shape, shape_overrides in (("paper", PAPER_SHAPE), ("config", [])):
        for precision in ("fp32", "bf16"):
            for padding in ("padded", "trimmed", "bucketed"):
                exp = load_experiment(path, [*overrides, "trainer.resources.use_ray=false", *shape_overrides,
                                             f"trainer.data.precision={precision}", "trainer.data.samples=prefixes"])
                trainer = build_trainer(exp, split, context=context)
                speed, loss = samples_per_s(trainer, ns.steps, padding, exp.data.max_history)
                epoch_min = len(trainer.inputs) / speed / 60
                rows.append({"shape": shape, "precision": precision, "padding": padding,
                             "params": sum(p.numel() for p in trainer.model.parameters()),
                             "samples_per_s": round(speed, 1), "prefixes_epoch_min": round(epoch_min, 1),
                             "mean_loss": round(loss, 4)})
                print(rows[-1], flush=True)
    windows = {mode: len(training_windows(split.train, base.data.max_history, mode)[0]) for mode in ("last", "prefixes")}
    validation = {}
    for users in (ns.valid_users, 0):
        sample = build_trainer(load_experiment(path, [*overrides, "trainer.resources.use_ray=false",
                                                      f"trainer.selection.valid_users={users}"]),
                               split, context=context)
        t0 = time.perf_counter()
        sample.validate()
        validation[str(users or len(split.valid))] = round(time.perf_counter() - t0, 1)
        print("validation", users or len(split.valid), "users:", validation[str(users or len(split.valid))], "s",
              flush=True)
    write_record("training-levers", model="tiger", dataset=dataset_name(base.to_dict()["data"]),
                 config=base.to_dict(), wall_s=time.perf_counter() - start,
                 metrics={"training": rows, "windows_per_epoch": windows, "validation_s_by_users": validation},
                 extra={"steps": ns.steps, "batch_size": base.trainer.optim.batch_size,
                        "torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    main(sys.argv[1:])
