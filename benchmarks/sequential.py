"""Train and evaluate a sequence model on a real dataset through the pipeline stages, and
record the figures: benchmarks/results/<model>/<dataset>/<name>.json.

    python benchmarks/sequential.py configs/beauty-sasrec.yaml data.path=/path/to/amazon-beauty
    python benchmarks/sequential.py --train-run runs/train/<run-id>   # record a finished train run
    python benchmarks/sequential.py --name NAME ...                   # record as <model>/<dataset>/NAME.json

NAME defaults to the IDs method for a model that decodes semantic IDs, else ``default``. The
record's ``protocol`` says whether history items were kept in the ranking (``eval.exclude_history``)
and whether the test model is a refit.

Selection is on validation; test is computed once, for the selected checkpoint (for a refit,
``trainer.selection.refit``, the last epoch's, recorded without a validation figure).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.record import dataset_name, protocol, write_record  # noqa: E402
from pipelines.cli import split_config_args  # noqa: E402
from pipelines.stages import run_data, run_evaluate, run_train  # noqa: E402
from recsys.experiment import experiment_dict_from_run, experiment_from_dict, ids_runs_of, load_experiment  # noqa: E402
from recsys.runs import read_json  # noqa: E402


def main(argv: list[str]) -> None:
    if argv[:1] in (["-h"], ["--help"]) or not argv:
        print(__doc__.strip())
        raise SystemExit(0 if argv else 2)
    start = time.perf_counter()
    record_name = None
    if argv[:1] == ["--name"]:
        if len(argv) < 2:
            raise SystemExit("--name needs a record name")
        record_name, argv = argv[1], argv[2:]
    if argv[:1] == ["--train-run"]:
        train_dir = Path(argv[1]).resolve()
        saved = read_json(train_dir / "config.json")
        exp = experiment_from_dict(experiment_dict_from_run(saved))
    else:
        exp = load_experiment(*split_config_args(argv))
        train_dir = run_train(exp, data_dir=run_data(exp))
    _, test = run_evaluate(train_dir, "test")
    train = read_json(train_dir / "metrics.json")
    wall = time.perf_counter() - start if argv[:1] != ["--train-run"] else train["elapsed_s"]
    saved = read_json(train_dir / "config.json")
    ids = {}
    semantic = ids_runs_of(saved).get("semantic")
    if semantic:  # a generative retriever: which IDs it decoded, named in the record
        ids = {"ids_run": semantic, "ids_method": read_json(Path(semantic) / "config.json")["ids"]["method"]}
    name = ids["ids_method"] if ids else "default"
    epochs = [json.loads(line) for line in (train_dir / "epochs.jsonl").read_text().splitlines()]
    to_best = next(e for e in epochs if e["epoch"] == train["best_epoch"])
    elapsed_to_best = to_best["finished_at"] - (epochs[0]["finished_at"] - epochs[0]["epoch_s"])
    path = write_record(
        record_name or name, model=exp.model_name, dataset=dataset_name(exp.to_dict()["data"]),
        # a refit's epoch count was selected on validation by an earlier run
        protocol=protocol(exclude_history=exp.eval.exclude_history, refit=train.get("refit", False)),
        config=exp.to_dict(), wall_s=wall,
        # a refit (trainer.selection.refit) has no validation figure: its targets were trained on
        metrics={"test": test, **({"valid": train["valid"]} if train["valid"] else {}),
                 "samples_per_s": train["samples_per_s"]},
        extra={"train_elapsed_s": train["elapsed_s"], "train_epochs_s": train["train_epochs_s"],
               "best_epoch": train["best_epoch"], "elapsed_to_best_epoch_s": round(elapsed_to_best, 1),
               "epochs_run": train["epochs_run"], "refit": train.get("refit", False), "train_run": str(train_dir), **ids},
    )
    print(f"record: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
