"""Paired per-user comparison of models on one split of one data run: each model's Recall/NDCG@K, and
each model against the first as the mean of the per-user differences with its standard error.

    python benchmarks/compare_paired.py LABEL=SPEC LABEL=SPEC ... --data DATA_RUN [--split test] \
        [--history kept|excluded] [--inference KEY=VALUE ...] [--users N] [--name NAME] [--threads 2]

SPEC is a checkpoint directory (``runs/train/<id>/checkpoints/best``), several separated by commas (the
same config's training seeds: each user's figure is averaged over them, ``benchmarks.paired``), or
``counts``: the last-item transition counts fitted on the training prefixes
(``benchmarks/split_baselines.py``). The first model
is the reference. A difference is a finding only when it is larger than its standard error
(``std(d) / sqrt(users)``, d the per-user differences). With ``--name`` it writes
``benchmarks/results/<model>/<dataset>/paired-<NAME>-history-<kept|excluded>.json``, ``model`` being the
last SPEC's model; the figures are those of the checkpoints as given (select them on validation).
``--inference fusion=sum`` scores every checkpoint under that inference setting (``recsys serve
--inference``: only the keys a model's class names as inference settings, e.g. EAGER's fusion, so two
runs selected under different fusions compare under the one that ships); the record holds it. A SPEC
may end with its own settings, ``@KEY=VALUE`` each, over ``--inference``'s: ``beam20=RUN/checkpoints/best
beam40=RUN/checkpoints/best@beam_size=40`` pairs one checkpoint under two beams. ``--users N`` pairs on a
fixed random sample of N users of the split (``--users-seed``, recorded), for models whose scoring of every
user takes too long; the standard error then grows as 1/sqrt(N).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.record import checkpoint_model, protocol, run_dataset, write_record  # noqa: E402
from benchmarks.split_baselines import (drop_history, popular_items, popularity_counts, rank_transition,  # noqa: E402
                                        transition_counts)
from recsys.data.schema import InteractionData  # noqa: E402
from recsys.data.split import EvalSet, LeaveOneOutSplit, leave_one_out  # noqa: E402
from benchmarks.paired import paired_difference, paired_table  # noqa: E402
from pipelines.cli import inference_settings  # noqa: E402
from recsys.metrics import DEFAULT_KS, metric_names, per_user_metrics, target_ranks  # noqa: E402
from recsys.training.checkpoint import load_model  # noqa: E402
from recsys.training.evaluate import target_ranks_of  # noqa: E402

TOP = max(DEFAULT_KS)


def counts_ranks(split: LeaveOneOutSplit, es: EvalSet, exclude_history: bool) -> np.ndarray:
    """Per-user target ranks of the last-item transition counts (fitted on training prefixes)."""
    popular = popular_items(popularity_counts(split))
    table = transition_counts(split)
    if exclude_history:
        top = drop_history(rank_transition(es, table, popular, TOP + es.histories.shape[1]), es)
    else:
        top = rank_transition(es, table, popular)
    return target_ranks(torch.from_numpy(top), torch.from_numpy(es.targets)).numpy()


def parse_spec(text: str) -> tuple[str, str, dict[str, str]]:
    """``LABEL=SPEC[@KEY=VALUE...]`` -> (label, spec, this model's inference settings)."""
    label, sep, rest = text.partition("=")
    spec, *settings = rest.split("@")
    if not sep or not label or not spec:
        raise ValueError(f"expected LABEL=SPEC (SPEC a checkpoint directory or 'counts'), got {text!r}")
    for part in spec.split(","):
        if part != "counts" and not (Path(part) / "model.json").is_file():
            raise ValueError(f"{label}: {part} is not a checkpoint directory (no model.json) and not 'counts'")
    if settings and "counts" in spec.split(","):
        raise ValueError(f"{label}: 'counts' takes no inference settings, got {text!r}")
    return label, spec, inference_settings(settings)


def seed_rows(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-user values (seeds, U) of two models; a deterministic one (1 row) is repeated to pair
    with each seed of the other."""
    if len(a) == 1 and len(b) > 1:
        a = np.repeat(a, len(b), axis=0)
    elif len(b) == 1 and len(a) > 1:
        b = np.repeat(b, len(a), axis=0)
    return a, b


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="LABEL=SPEC[@KEY=VALUE...]; the first is the reference")
    parser.add_argument("--data", type=Path, required=True, help="the `recsys data` run the models were trained on")
    parser.add_argument("--split", default="test", choices=("valid", "test"))
    parser.add_argument("--history", default="kept", choices=("kept", "excluded"))
    parser.add_argument("--max-history", type=int, default=20)
    parser.add_argument("--inference", action="append", default=[], metavar="KEY=VALUE",
                        help="an inference setting every checkpoint is scored under, e.g. fusion=sum")
    parser.add_argument("--users", type=int, default=0, help="> 0: a fixed random sample of this many users")
    parser.add_argument("--users-seed", type=int, default=0, help="the sample's seed (default 0)")
    parser.add_argument("--name", help="write a record paired-<NAME>-history-<kept|excluded>.json")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    if len(args.models) < 2:
        parser.error("give at least two models: a reference and one to compare with it")
    try:
        specs = [parse_spec(m) for m in args.models]
        inference = inference_settings(args.inference)
    except ValueError as exc:
        parser.error(str(exc))
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    exclude = args.history == "excluded"
    split = leave_one_out(InteractionData.load(args.data), args.max_history)
    es = split.eval_set(args.split)
    if args.users < 0 or args.users > len(es):
        parser.error(f"--users {args.users}: give 1..{len(es)} (the {args.split} split's users), or 0 for all")
    if args.users:
        es = es.subset(np.sort(np.random.default_rng(args.users_seed).choice(len(es), args.users, replace=False)))
    names = metric_names()
    per_user: dict[str, dict[str, np.ndarray]] = {}  # label -> metric -> (seeds, U)
    for label, spec, own in specs:
        runs = [counts_ranks(split, es, exclude) if part == "counts"
                else target_ranks_of(load_model(Path(part), inference={**inference, **own}), es,
                                     exclude_history=exclude)
                for part in spec.split(",")]
        metrics = [per_user_metrics(r) for r in runs]
        per_user[label] = {n: np.stack([m[n] for m in metrics]) for n in names}
    means = {label: {n: round(float(v.mean()), 4) for n, v in pu.items()} for label, pu in per_user.items()}
    reference = specs[0][0]

    def against_reference(label: str) -> dict:
        pairs = {n: seed_rows(per_user[reference][n], per_user[label][n]) for n in names}
        return paired_difference({n: a for n, (a, _) in pairs.items()}, {n: b for n, (_, b) in pairs.items()})

    paired = {label: {n: {k: (round(d[k], 5) if k != "seed_differences" else [round(x, 5) for x in d[k]])
                          for k in ("diff", "se", "z", "seed_differences")}
                      for n, d in against_reference(label).items()}
              for label, _, _ in specs[1:]}
    print(f"{args.split}, history {args.history}, {len(es)} users; differences against {reference!r} "
          "(mean of per-user differences ± its standard error)\n")
    print(paired_table("model", names, means, paired, reference))
    if args.name:
        last = specs[-1][1]
        last = last.split(",")[0]
        model = "baselines" if last == "counts" else checkpoint_model(Path(last))
        path = write_record(
            f"paired-{args.name}-history-{args.history}", model=model, dataset=run_dataset(args.data),
            config={"models": {label: spec for label, spec, _ in specs}, "data_run": str(args.data),
                    "split": args.split, "users_sample": args.users or None,
                    "users_seed": args.users_seed if args.users else None,
                    "max_history": args.max_history, "threads": args.threads, "inference": inference,
                    "inference_per_model": {label: own for label, _, own in specs if own}},
            wall_s=time.perf_counter() - start, metrics={},
            protocol=protocol(exclude_history=exclude),
            extra={"users": len(es), "split": args.split, "reference": reference, "means": means,
                   "seeds": {label: len(spec.split(",")) for label, spec, _ in specs},
                   "paired_against_reference": paired})
        print(f"\nrecord: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
