"""Paired per-user comparison of rankers re-ranking the same candidate lists: each `recsys rank` run's
Recall/NDCG@K after re-ranking, and each against the first as the mean of the per-user differences
with its standard error.

    python benchmarks/compare_rankers.py LABEL=RANK_RUN LABEL=RANK_RUN ... [--split test] [--name NAME]
        [--longer-than N]

Every RANK_RUN must hold the same lists of the split (the same candidates run, or one made again
from it, e.g. by ``twin_cascade.py --candidates``): rankers differ, lists do not. ``LABEL=retriever``
in place of a run scores the lists in the retriever's own order. With ``--name`` it writes
``benchmarks/results/<model>/<dataset>/paired-<NAME>.json``, ``model`` being the last run's ranker.
``--longer-than N`` pairs only the users whose whole history before the split's target holds more
than N items (issue 22's slice: N = the retrievers' 20, where the lifelong history has more to give).

Several retriever seeds: ``LABEL=RUN_SEED0,RUN_SEED1,...`` for every label, the same number of runs
each; the runs at one position share their lists, and every position ranks the same users. Each
user's figure is averaged over the seeds before pairing (``benchmarks.paired``), so the standard
error is over users; the per-seed differences are reported beside it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.paired import paired_difference, paired_table  # noqa: E402
from benchmarks.record import protocol, run_dataset, write_record  # noqa: E402
from recsys.candidates import CandidateSet, candidates_file  # noqa: E402
from recsys.data import InteractionData  # noqa: E402
from recsys.data.split import leave_one_out  # noqa: E402
from recsys.metrics import metric_names, per_user_metrics, reranked_ranks  # noqa: E402
from recsys.runs import read_json, require_complete  # noqa: E402
from recsys.training.checkpoint import load_model  # noqa: E402
from recsys.training.evaluate import ranker_scores  # noqa: E402

RETRIEVER = "retriever"


def parse_runs(words: list[str]) -> list[tuple[str, list[str]]]:
    """``LABEL=RUN[,RUN...]`` words -> (label, runs by seed); ``retriever`` stands for every seed."""
    specs = []
    for word in words:
        label, sep, spec = word.partition("=")
        if not sep or not label or not spec:
            raise ValueError(f"expected LABEL=RANK_RUN[,RANK_RUN...] (or LABEL=retriever), got {word!r}")
        runs = spec.split(",")
        if "" in runs:
            raise ValueError(f"{label}: an empty run in {spec!r}")
        if RETRIEVER not in runs:
            for run in runs:
                require_complete(Path(run), "rank")
        elif runs != [RETRIEVER]:
            raise ValueError(f"{label}: 'retriever' stands alone (it scores every seed's lists in their own order)")
        specs.append((label, runs))
    seeds = {len(runs) for _, runs in specs if runs != [RETRIEVER]}
    if not seeds:
        raise ValueError("give at least one rank run: 'retriever' alone names no lists")
    if len(seeds) > 1:
        raise ValueError(f"every label needs the same number of runs (one per retriever seed), got {sorted(seeds)}")
    return specs


def same_lists(runs: list[Path], split: str) -> tuple[CandidateSet, dict]:
    """The split's candidate lists, which every run must share (item for item)."""
    first = None
    for run in runs:
        config = read_json(run / "config.json")
        cand_dir = Path(config["candidates_dir"])
        lists = CandidateSet.load(cand_dir / candidates_file(split))
        if first is None:
            first, first_run, cand_config = lists, run, read_json(cand_dir / "config.json")
        elif not (np.array_equal(lists.candidates, first.candidates) and np.array_equal(lists.targets, first.targets)):
            raise ValueError(f"{run} re-ranks other {split} lists than {first_run}: compare rankers on the same "
                             "candidates (twin_cascade.py --candidates)")
    return first, cand_config


def seed_lists(specs: list[tuple[str, list[str]]], split: str) -> list[tuple[CandidateSet, dict]]:
    """Per seed position, the lists its runs share; every position must rank the same users."""
    n_seeds = max(len(runs) for _, runs in specs)
    out = [same_lists([Path(runs[s]) for _, runs in specs if runs != [RETRIEVER]], split) for s in range(n_seeds)]
    first = out[0][0]
    for s, (lists, _) in enumerate(out[1:], start=1):
        if not (np.array_equal(lists.user_index, first.user_index) and np.array_equal(lists.targets, first.targets)):
            raise ValueError(f"the runs of seed position {s} rank other {split} users or targets than those of "
                             "position 0: pair seeds of one dataset")
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=RANK_RUN[,RANK_RUN...] (one per retriever seed) or "
                        "LABEL=retriever; the first is the reference")
    parser.add_argument("--split", default="test", choices=("valid", "test"))
    parser.add_argument("--name", help="write a record paired-<NAME>.json")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--longer-than", type=int, metavar="N",
                        help="only users with more than N items before the split's target")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give at least two: a reference and one to compare with it")
    if args.longer_than is not None and args.longer_than < 0:
        parser.error(f"--longer-than must be >= 0, got {args.longer_than}")
    try:
        specs = parse_runs(args.runs)
    except ValueError as exc:
        parser.error(str(exc))
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    by_seed = seed_lists(specs, args.split)
    lists, cand_config = by_seed[0]
    histories = leave_one_out(InteractionData.load(cand_config["data_dir"]),
                              cand_config["max_history"]).full_histories(args.split)
    per_user = {}  # label -> metric -> (seeds, U)
    for label, spec in specs:
        seeds = []
        for s, (lists_s, _) in enumerate(by_seed):
            if spec == [RETRIEVER]:
                scores = lists_s.scores.astype(np.float64)
            else:
                model = load_model(Path(read_json(Path(spec[s]) / "config.json")["train_dir"]) / "checkpoints" / "best")
                scores = ranker_scores(model, lists_s, histories)
            ranks = reranked_ranks(torch.from_numpy(scores), torch.from_numpy(lists_s.candidates),
                                   torch.from_numpy(lists_s.targets)).numpy()
            seeds.append(per_user_metrics(ranks))
        per_user[label] = {n: np.stack([pu[n] for pu in seeds]) for n in seeds[0]}
    rows = np.arange(len(lists)) if args.longer_than is None else lists.rows_longer_than(histories, args.longer_than)
    per_user = {label: {n: v[:, rows] for n, v in pu.items()} for label, pu in per_user.items()}
    if len(rows) < 2:
        raise SystemExit(f"only {len(rows)} {args.split} users have more than {args.longer_than} prior items: "
                         "too few to pair")
    names, reference = metric_names(), specs[0][0]
    means = {label: {n: round(float(v.mean()), 4) for n, v in pu.items()} for label, pu in per_user.items()}
    paired = {label: {n: {**{k: round(d[k], 5) for k in ("diff", "se", "z")},
                          "seed_differences": [round(x, 5) for x in d["seed_differences"]]}
                      for n, d in paired_difference(per_user[reference], per_user[label]).items()}
              for label, _ in specs[1:]}
    who = "" if args.longer_than is None else f", the {len(rows)} users with more than {args.longer_than} prior items"
    pooled = "" if len(by_seed) == 1 else f", each user's figures averaged over {len(by_seed)} retriever seeds"
    print(f"{args.split}, {len(lists)} lists re-ranked{who}{pooled}; differences against {reference!r} (mean of per-user "
          "differences ± its standard error)\n")
    print(paired_table("ranker", names, means, paired, reference))
    if len(by_seed) > 1:
        for label, _ in specs[1:]:
            print(f"{label}: NDCG@10 difference per seed " + ", ".join(
                f"{x:+.4f}" for x in paired[label]["ndcg@10"]["seed_differences"]))
    if args.name:
        last = next(runs for _, runs in reversed(specs) if runs != [RETRIEVER])[-1]
        model = read_json(Path(last) / "config.json")["model"]["name"]
        path = write_record(
            f"paired-{args.name}", model=model, dataset=run_dataset(Path(cand_config["data_dir"])),
            config={"runs": {label: runs if len(runs) > 1 else runs[0] for label, runs in specs},
                    "split": args.split, "candidates": [c.get("train_dir") for _, c in by_seed]
                    if len(by_seed) > 1 else cand_config.get("train_dir"), "longer_than": args.longer_than},
            wall_s=time.perf_counter() - start, metrics={},
            protocol=protocol(exclude_history=bool(cand_config["exclude_history"])),
            extra={"lists": len(lists), "users": int(len(rows)), "seeds": len(by_seed), "split": args.split,
                   "reference": reference,
                   "means": means, "paired_against_reference": paired})
        print(f"\nrecord: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
