"""Training speed of SASRec on a dataset, fp32 against bf16 autocast, in-process (no Ray), the
same seed and batches. Writes benchmarks/results/sasrec/<dataset>/precision.json.

    python benchmarks/sasrec_precision.py configs/beauty-sasrec.yaml data.path=/path/to/amazon-beauty

Each precision trains ``--epochs`` epochs (default 3) after one warm-up step; samples/s counts
training windows. The loss after those epochs shows whether bf16 tracks fp32.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.record import dataset_name, protocol, write_record  # noqa: E402
from pipelines.cli import split_config_args  # noqa: E402
from recsys.data import load_dataset  # noqa: E402
from recsys.data.split import leave_one_out  # noqa: E402
from recsys.experiment import load_experiment  # noqa: E402
from recsys.training.session import build_trainer  # noqa: E402


def main(argv: list[str]) -> None:
    epochs = 3
    if argv and argv[0].startswith("--epochs="):
        epochs, argv = int(argv[0].split("=", 1)[1]), argv[1:]
    path, overrides = split_config_args(argv)
    base = load_experiment(path, overrides)
    split = leave_one_out(load_dataset(base.data), base.data.max_history)
    results, start = {}, time.perf_counter()
    for precision in ("fp32", "bf16"):
        exp = load_experiment(path, [*overrides, f"trainer.data.precision={precision}",
                                     "trainer.resources.use_ray=false"])
        trainer = build_trainer(exp, split)
        stats = [trainer.train_epoch(epoch) for epoch in range(epochs)]
        valid = trainer.validate()
        results[precision] = {
            "samples_per_s": round(sum(s["samples_per_s"] for s in stats) / epochs, 1),
            "epoch_s": round(sum(s["epoch_s"] for s in stats) / epochs, 2),
            "train_loss": stats[-1]["train_loss"], f"valid_ndcg@10_after_{epochs}_epochs": valid["ndcg@10"],
        }
        print(precision, results[precision], flush=True)
    results["speedup"] = round(results["bf16"]["samples_per_s"] / results["fp32"]["samples_per_s"], 2)
    # a validation figure after a fixed number of epochs: nothing selected
    write_record("precision", model="sasrec", dataset=dataset_name(base.to_dict()["data"]),
                 protocol=protocol(exclude_history=base.eval.exclude_history, selected_on="none"),
                 config=base.to_dict(), wall_s=time.perf_counter() - start,
                 metrics=results, extra={"epochs": epochs})


if __name__ == "__main__":
    main(sys.argv[1:])
