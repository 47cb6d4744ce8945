"""Count-based baselines on validation and test of a data run: how much of the valid/test gap
belongs to the split rather than to a model.

    python benchmarks/split_baselines.py DATA_RUN [--max-history 20] [--refit]

Two scorers, both fitted on the training prefixes only (``s[:n-2]``), full ranking over all items:
- ``popularity``: items by how often they are a training interaction;
- ``transition``: the items that followed the history's last item in training, by count, then
  filled from popularity (a first-order Markov chain; nothing is learned).
Both score validation and test with the same code, so their valid/test ratio is the split's own.
Each is also scored with the history's items removed from the ranking (``*_history_excluded``;
no Beauty user repeats an item, and S3-Rec's full-ranking evaluation masks interacted items).
``--refit`` fits both on training + validation (``s[:n-1]``, as ``trainer.selection.refit`` trains) and
scores test only, the protocol of a refitted test model.
Writes benchmarks/results/baselines/<dataset>/counts[-refit].json: ``metrics`` holds the
transition scorer with the history kept (the headline protocol), ``by_scorer`` every scorer.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.record import dataset_name, protocol, write_record  # noqa: E402
from recsys.data.schema import InteractionData  # noqa: E402
from recsys.data.split import EvalSet, LeaveOneOutSplit, leave_one_out  # noqa: E402
from recsys.metrics import DEFAULT_KS, RankingMetrics  # noqa: E402
from recsys.runs import read_json  # noqa: E402

TOP = max(DEFAULT_KS)


def popularity_counts(split: LeaveOneOutSplit) -> np.ndarray:
    """(n_items + 1,) training interaction counts by item id (row 0, padding, stays 0)."""
    return np.bincount(np.concatenate(split.train), minlength=split.n_items + 1)


def popular_items(counts: np.ndarray) -> np.ndarray:
    """Item ids (never 0, the padding), most frequent first, ties by id."""
    return np.argsort(-counts[1:], kind="stable") + 1


def transition_counts(split: LeaveOneOutSplit) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """last item -> (next items, counts), from consecutive pairs of every training prefix."""
    pairs = np.concatenate([np.stack([s[:-1], s[1:]], 1) for s in split.train if len(s) > 1])
    keys, counts = np.unique(pairs, axis=0, return_counts=True)
    table: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    starts = np.flatnonzero(np.r_[True, keys[1:, 0] != keys[:-1, 0]])
    for lo, hi in zip(starts, np.r_[starts[1:], len(keys)]):
        table[int(keys[lo, 0])] = (keys[lo:hi, 1], counts[lo:hi])
    return table


def rank_popularity(es: EvalSet, popular: np.ndarray, length: int = TOP) -> np.ndarray:
    return np.tile(popular[:length], (len(es), 1))


def rank_transition(es: EvalSet, table: dict, popular: np.ndarray, length: int = TOP) -> np.ndarray:
    """(U, length): successors of each history's last item by training count, then popular items."""
    out = np.empty((len(es), length), dtype=np.int64)
    for row, history in enumerate(es.histories):
        nxt, cnt = table.get(int(history[-1]), (np.empty(0, np.int64), np.empty(0)))
        ranked = list(nxt[np.argsort(-cnt, kind="stable")][:length])
        seen = set(ranked)
        ranked += [i for i in popular[: 2 * length] if i not in seen][: length - len(ranked)]
        out[row] = ranked
    return out


def drop_history(ranked: np.ndarray, es: EvalSet, length: int = TOP) -> np.ndarray:
    """Keep each row's first ``length`` items that are not in its history (ranked must be long
    enough: ``length`` + the history length)."""
    out = np.empty((len(es), length), dtype=np.int64)
    for row, (items, history) in enumerate(zip(ranked, es.histories)):
        kept = items[~np.isin(items, history[history > 0])][:length]
        if len(kept) < length:
            raise ValueError(f"row {row}: {len(kept)} items left after dropping the history; rank more")
        out[row] = kept
    return out


def score(top: np.ndarray, es: EvalSet) -> dict[str, float]:
    metrics = RankingMetrics()
    metrics.update(torch.from_numpy(top), torch.from_numpy(es.targets))
    return {k: round(v, 4) for k, v in metrics.summary().items()}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_run", type=Path)
    parser.add_argument("--max-history", type=int, default=20)
    parser.add_argument("--refit", action="store_true",
                        help="count training + validation transitions; score test only")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    split = leave_one_out(InteractionData.load(args.data_run), args.max_history)
    if args.refit:  # the validation targets become training transitions, so only test is scored
        split = dataclasses.replace(split, train=split.training_with_validation())
    splits = ("test",) if args.refit else ("valid", "test")
    counts = popularity_counts(split)
    popular = popular_items(counts)
    table = transition_counts(split)
    results, context = {}, {}
    for name in splits:
        es = split.eval_set(name)
        longer = TOP + es.histories.shape[1]
        results[name] = {"popularity": score(rank_popularity(es, popular), es),
                         "transition": score(rank_transition(es, table, popular), es),
                         "popularity_history_excluded":
                             score(drop_history(rank_popularity(es, popular, longer), es), es),
                         "transition_history_excluded":
                             score(drop_history(rank_transition(es, table, popular, longer), es), es)}
        target_counts = counts[es.targets]
        context[name] = {"users": len(es), "median_training_count_of_target": float(np.median(target_counts)),
                         "share_of_targets_never_in_training": round(float(np.mean(target_counts <= 0)), 4),
                         "share_of_last_items_with_a_training_successor":
                             round(float(np.mean([int(h[-1]) in table for h in es.histories])), 4)}
    ratios = {} if args.refit else {
        scorer: round(results["valid"][scorer]["recall@10"] / results["test"][scorer]["recall@10"], 3)
        for scorer in ("popularity", "transition")}
    for name in splits:
        for scorer, m in results[name].items():
            print(f"{name:5s} {scorer:28s} " + "  ".join(f"{k} {v:.4f}" for k, v in m.items()))
    if ratios:
        print(f"valid/test Recall@10 ratio: {ratios}")
    dataset = dataset_name(read_json(args.data_run / "config.json").get("data", {}))
    path = write_record(
        "counts" + ("-refit" if args.refit else ""), model="baselines", dataset=dataset,
        protocol=protocol(exclude_history=False, refit=args.refit, selected_on="none"),
        config={"data_run": str(args.data_run), "max_history": args.max_history, "refit": args.refit},
        wall_s=time.perf_counter() - start,
        metrics={name: results[name]["transition"] for name in splits},
        extra={"by_scorer": results, "valid_over_test_recall@10": ratios, "targets": context},
    )
    print(f"record: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
