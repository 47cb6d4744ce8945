"""HSTU's relative attention bias, ablated on the time-structured synthetic data (issue 21):
no rab, rab^p (positions), and rab^{p,t} (positions and time) with the query time of the last
position set to the target's time (``model.query_time=next_event``, the official code) or to the
last history event's time (``last_event``, which reads nothing about the target).

    python benchmarks/hstu_time_ablation.py [--seeds 0,1] [--threads 1] [--variants a,b] \
        [--dataset synthetic-time] [CONFIG] [key=value ...]

CONFIG defaults to configs/synthetic-time-hstu.yaml. Each variant trains in-process once per
seed (the data is the same for all: the generator's seed is the config's), is selected on
validation NDCG@10 (history kept), and ranks the validation and test users under both protocols.
Writes, under benchmarks/results/hstu/synthetic-time/:
- ``<variant>-history-kept.json`` and ``...-history-excluded.json``: the figures averaged over
  the seeds, each seed's figures and selected epoch;
- ``ablation-paired.json``: for each comparison and protocol, the mean per-user difference of
  every test metric and its paired standard error (``benchmarks.paired``).
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
from benchmarks.record import machine_note, protocol, write_record  # noqa: E402
from recsys.data import load_dataset  # noqa: E402
from recsys.data.split import LeaveOneOutSplit, leave_one_out  # noqa: E402
from recsys.experiment import ExperimentConfig, load_experiment  # noqa: E402
from recsys.metrics import per_user_metrics  # noqa: E402
from recsys.training.evaluate import target_ranks_of  # noqa: E402
from recsys.training.session import build_trainer  # noqa: E402

CONFIG = "configs/synthetic-time-hstu.yaml"
DATASET = "synthetic-time"
VARIANTS = {  # name -> overrides; "no rab" drops both terms of the bias
    "no-rab": ["model.time_bias=off", "model.position_bias=false"],
    "rab-p": ["model.time_bias=off", "model.position_bias=true"],
    "rab-pt-next-event": ["model.time_bias=on", "model.position_bias=true", "model.query_time=next_event"],
    "rab-pt-last-event": ["model.time_bias=on", "model.position_bias=true", "model.query_time=last_event"],
}
COMPARISONS = [  # (baseline, variant): the variant's gain over the baseline
    ("no-rab", "rab-p"),
    ("rab-p", "rab-pt-next-event"),
    ("rab-p", "rab-pt-last-event"),
    ("rab-pt-last-event", "rab-pt-next-event"),
]
PROTOCOLS = {"kept": False, "excluded": True}


def train_and_rank(exp: ExperimentConfig, split: LeaveOneOutSplit) -> dict:
    """Train, keep the weights of the best validated epoch, and rank every validation and test
    user's target under both protocols. -> {"ranks": {(split, protocol): (U,)}, "best_epoch",
    "epochs", "train_s"}."""
    trainer = build_trainer(exp, split)
    best: dict = {}

    def keep_best(metrics: dict, improved: bool, trainer) -> None:
        if improved:
            best["state"] = copy.deepcopy(trainer.model.state_dict())

    start = time.perf_counter()
    state = trainer.fit(keep_best)
    train_s = time.perf_counter() - start
    trainer.model.load_state_dict(best["state"])
    ranks = {(name, kind): target_ranks_of(trainer.model, split.eval_set(name), exclude_history=exclude,
                                           batch_size=exp.eval.batch_size)
             for name in ("valid", "test") for kind, exclude in PROTOCOLS.items()}
    return {"ranks": ranks, "best_epoch": state.best_epoch, "epochs": state.epoch, "train_s": round(train_s, 1)}


def mean_figures(per_user: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: round(float(values.mean()), 4) for name, values in per_user.items()}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1", help="training seeds, comma-separated (default 0,1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    parser.add_argument("--dataset", default=DATASET, help="the records' dataset folder: benchmarks/results/hstu/"
                        f"<DATASET>/ (default {DATASET}; e.g. synthetic-pace with data.synthetic.time_signal_kind=pace)")
    parser.add_argument("args", nargs="*", help="[CONFIG] key=value ...")
    ns = parser.parse_args(argv)
    seeds = [int(s) for s in ns.seeds.split(",") if s]
    variants = [v for v in ns.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants or not seeds:
        parser.error(f"--variants must name some of {list(VARIANTS)} (unknown: {unknown}), --seeds at least one seed")
    config, overrides = (ns.args[0], ns.args[1:]) if ns.args and "=" not in ns.args[0] else (CONFIG, ns.args)
    torch.set_num_threads(ns.threads)
    common = [*overrides, "trainer.resources.use_ray=false", f"trainer.resources.threads={ns.threads}"]
    base = load_experiment(config, common)
    split = leave_one_out(load_dataset(base.data), base.data.max_history)
    start, note = time.perf_counter(), machine_note(ns.threads)
    runs: dict[str, list[dict]] = {}
    for variant in variants:
        for seed in seeds:
            exp = load_experiment(config, [*common, *VARIANTS[variant], f"trainer.data.seed={seed}"])
            run = train_and_rank(exp, split)
            runs.setdefault(variant, []).append(run)
            test = mean_figures(per_user_metrics(run["ranks"]["test", "kept"]))
            print(f"{variant} seed {seed}: best epoch {run['best_epoch']}/{run['epochs']}, {run['train_s']} s; "
                  f"test (history kept) recall@10 {test['recall@10']:.4f} ndcg@10 {test['ndcg@10']:.4f}", flush=True)
    per_user = {variant: {key: {name: np.stack([per_user_metrics(r["ranks"][key])[name] for r in rs])
                                for name in per_user_metrics(rs[0]["ranks"][key])}
                          for key in rs[0]["ranks"]}
                for variant, rs in runs.items()}  # variant -> (split, protocol) -> metric -> (seeds, U)
    wall_s = time.perf_counter() - start
    note["load_average_at_end"] = machine_note(ns.threads)["load_average_1_5_15"]
    for variant, rs in runs.items():
        exp = load_experiment(config, [*common, *VARIANTS[variant]])
        for kind, exclude in PROTOCOLS.items():
            other = "excluded" if kind == "kept" else "kept"
            metrics = {name: {m: round(float(v.mean()), 4) for m, v in per_user[variant][name, kind].items()}
                       for name in ("test", "valid")}
            per_seed = [{"seed": seed, "best_epoch": r["best_epoch"], "epochs": r["epochs"], "train_s": r["train_s"],
                         **{name: mean_figures(per_user_metrics(r["ranks"][name, kind])) for name in ("test", "valid")}}
                        for seed, r in zip(seeds, rs)]
            path = write_record(f"{variant}-history-{kind}", model="hstu", dataset=ns.dataset, config=exp.to_dict(),
                                wall_s=wall_s, metrics=metrics, protocol=protocol(exclude_history=exclude),
                                extra={"variant_overrides": VARIANTS[variant], "seeds": seeds, "per_seed": per_seed,
                                       "machine_note": note, "other_protocol": f"{variant}-history-{other}.json",
                                       "note": "metrics are the means over the seeds; the checkpoint of each seed "
                                               "is selected on validation ndcg@10 with history kept"})
            print(f"record: {path}")
    comparisons = {f"{b} - {a}": {kind: paired_difference(per_user[a]["test", kind], per_user[b]["test", kind])
                                  for kind in PROTOCOLS}
                   for a, b in COMPARISONS if a in runs and b in runs}
    for label, by_protocol in comparisons.items():
        for kind, diffs in by_protocol.items():
            d = diffs["ndcg@10"]
            print(f"{label:45s} history {kind:8s} ndcg@10 {d['diff']:+.4f} ± {d['se']:.4f} (z {d['z']:+.1f})")
    path = write_record("ablation-paired", model="hstu", dataset=ns.dataset, config=base.to_dict(), wall_s=wall_s,
                        metrics={"test_paired_differences": comparisons},
                        extra={"seeds": seeds, "users": int(len(split.test)), "variants": {v: VARIANTS[v] for v in runs},
                               "machine_note": note,
                               "note": "per comparison 'B - A' and protocol: the mean over test users of B's figure "
                                       "minus A's (each user's figures averaged over the seeds first), its paired "
                                       "standard error sd/sqrt(U), z = diff / se, and each seed's difference"})
    print(f"record: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
