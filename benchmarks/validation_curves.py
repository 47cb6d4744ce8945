"""Compare training runs on validation only: per-epoch curves, the selected epoch of each, and
one plot. No test figure is computed, so runs can be compared (and a setting chosen) without
touching the test split.

    python benchmarks/validation_curves.py runs/train/<a> runs/train/<b> --name NAME \
        [--label a=... --label b=...] [--metric recall@10] [--plot docs/figures/NAME.png] \
        [--from-record tiger/beauty/<earlier>=<label in it>]

``--from-record`` adds a run of an earlier record of this script (a path, ``MODEL/DATASET/NAME`` under
``benchmarks/results/`` or a unique NAME; its train directory may be gone,
for example trained on another machine); it keeps the settings recorded there and takes no part in
working out which keys vary.

Writes ``benchmarks/results/<model>/<dataset>/<NAME>.json`` (model and dataset of the first run;
a ``protocol`` when every run's ``eval.exclude_history`` is the same): for each run its label, the config keys in which the
runs differ, every epoch's train loss, seconds and validation figures, and the best epoch by
``--metric``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.record import dataset_name, find_record, protocol, save_figure, write_record  # noqa: E402
from pipelines.stages import IDS_EXECUTION_KEYS  # noqa: E402
from recsys.config import flatten_dict  # noqa: E402
from recsys.experiment import rename_experiment_keys  # noqa: E402
from recsys.runs import read_json  # noqa: E402
from recsys.sweep import dotted_values  # noqa: E402


# how a run's IDs were computed (on Ray or not, how many workers), not what they are
EXECUTION_KEYS = {f"ids.{key}" for key in IDS_EXECUTION_KEYS}


def differing_keys(configs: list[dict]) -> list[str]:
    """Dotted keys whose value is not the same in every config (``run.*`` and the ids run's
    execution keys left out)."""
    flat = [flatten_dict(c) for c in configs]
    keys = sorted(set().union(*flat) - EXECUTION_KEYS)
    return [k for k in keys if not k.startswith("run.") and len({json.dumps(f.get(k)) for f in flat}) > 1]


def read_run(train_dir: Path, metric: str) -> dict:
    epochs = [json.loads(line) for line in (train_dir / "epochs.jsonl").read_text().splitlines() if line.strip()]
    scored = [e for e in epochs if f"valid_{metric}" in e]
    if not scored:
        raise ValueError(f"{train_dir / 'epochs.jsonl'} has no epoch with valid_{metric}")
    best = max(scored, key=lambda e: e[f"valid_{metric}"])  # first of equals, as the trainer selects
    keep = ("epoch", "train_loss", "epoch_s", "samples_per_s", "validated_users")
    curve = [{**{k: e[k] for k in keep if k in e},
              **{k.removeprefix("valid_"): v for k, v in e.items() if k.startswith("valid_")}} for e in epochs]
    return {"train_run": str(train_dir), "best_epoch": best["epoch"], "epochs_run": len(epochs),
            "best_valid": {k.removeprefix("valid_"): v for k, v in best.items() if k.startswith("valid_")},
            "train_epochs_s": round(sum(e["epoch_s"] for e in epochs), 1), "epochs": curve}


def run_from_record(spec: str, metric: str) -> tuple[str, dict]:
    """``RECORD.json=LABEL``: that run of an earlier validation-curves record, labelled for this one."""
    name, sep, label = spec.partition("=")
    if not sep or not label:
        raise ValueError(f"--from-record {spec!r}: expected RECORD=LABEL")
    path = str(find_record(name))
    record = read_json(Path(path))
    runs = record.get("runs")
    if not isinstance(runs, dict) or label not in runs:
        known = sorted(runs) if isinstance(runs, dict) else "none (not a validation-curves record)"
        raise ValueError(f"--from-record {spec!r}: {path} has no run labelled {label!r}; its runs: {known}")
    if record.get("select_metric") != metric:  # its best epoch was chosen by that metric
        raise ValueError(f"--from-record {spec!r}: {path} selected on {record.get('select_metric')!r}, "
                         f"not {metric!r}; pass --metric {record.get('select_metric')}")
    return f"{label} ({record['name']})", {**runs[label], "from_record": path}


def plot(runs: dict[str, dict], metric: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_valid) = plt.subplots(1, 2, figsize=(11, 4))
    for label, run in runs.items():
        xs = [e["epoch"] for e in run["epochs"]]
        ax_loss.plot(xs, [e["train_loss"] for e in run["epochs"]], marker=".", label=label)
        scored = [e for e in run["epochs"] if metric in e]
        ax_valid.plot([e["epoch"] for e in scored], [e[metric] for e in scored], marker=".", label=label)
    users = {e.get("validated_users") for r in runs.values() for e in r["epochs"]} - {None}
    ax_loss.set(xlabel="epoch", ylabel="train loss (mean token cross-entropy)", title="training loss")
    ax_valid.set(xlabel="epoch", ylabel=f"valid {metric}",
                 title=f"validation {metric}" + (f" ({', '.join(map(str, sorted(users)))} users)" if users else ""))
    for ax in (ax_loss, ax_valid):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train_runs", type=Path, nargs="+")
    parser.add_argument("--name", required=True)
    parser.add_argument("--label", action="append", default=[], help="RUN_DIR_NAME=label (default: the run directory's name)")
    parser.add_argument("--metric", default="recall@10")
    parser.add_argument("--plot", type=Path, help="write the curves here (PNG)")
    parser.add_argument("--from-record", action="append", default=[], metavar="RECORD.json=LABEL",
                        help="also show that run of an earlier record of this script")
    args = parser.parse_args(argv)
    labels = dict(item.split("=", 1) for item in args.label)
    configs, runs = [], {}
    for train_dir in args.train_runs:
        # current key names, so that a run saved before a rename compares key by key with a newer one
        configs.append(rename_experiment_keys(read_json(train_dir / "config.json"), f"{train_dir}/config.json"))
        label = labels.get(train_dir.name) or train_dir.name
        if label in runs:
            raise ValueError(f"two runs share the label {label!r}; give --label")
        runs[label] = read_run(train_dir, args.metric)
    varied = differing_keys(configs)
    for run, config in zip(runs.values(), configs):
        run["settings"] = dotted_values(config, varied)
    for spec in args.from_record:
        label, run = run_from_record(spec, args.metric)
        if label in runs:
            raise ValueError(f"two runs share the label {label!r}")
        runs[label] = run
    extra = {"select_metric": args.metric, "varied_keys": varied, "runs": runs}
    if args.plot:
        extra["plot"] = str(plot(runs, args.metric, args.plot))
    wall = sum(r["train_epochs_s"] for r in runs.values() if "from_record" not in r)
    excluded = {json.dumps(c.get("eval", {}).get("exclude_history")) for c in configs}
    shared = protocol(exclude_history=json.loads(excluded.pop())) if excluded in ({"true"}, {"false"}) else None
    path = write_record(args.name, model=configs[0].get("model", {}).get("name", "unknown"),
                        dataset=dataset_name(configs[0].get("data", {})), protocol=shared,
                        config={"runs": [str(p) for p in args.train_runs]}, wall_s=wall, metrics={}, extra=extra)
    print(f"record: {path}")
    for label, run in runs.items():
        print(f"{label}: best epoch {run['best_epoch']}/{run['epochs_run']}  {args.metric} "
              f"{run['best_valid'][args.metric]:.4f}  {run['settings']}")


if __name__ == "__main__":
    main(sys.argv[1:])
