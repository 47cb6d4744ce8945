"""Choose EAGER's ``sum`` fusion weight on validation, over one trained checkpoint, and report test once.

    python benchmarks/eager_fusion_weight.py CHECKPOINT --data DATA_RUN --name NAME
        [--weights 0,0.1,...,1] [--select-metric recall@10] [--valid-users N] [--exclude-history]
        [--plot docs/figures/NAME.png]

The ``sum`` fusion ranks the union of both streams' top k by 2 (w log p_behavior + (1 - w)
log p_semantic); the released code's plain sum is w = 0.5 (``model.fusion_weight``, an inference
setting). The fusion only re-orders the candidates both beams found, so each split is decoded once
(``Eager.stream_candidates``, both streams' log-probabilities of all 2k candidates) and every weight
is scored from that. Validation finds the weight with the best ``--select-metric`` (the nearest to
0.5 among equals); it is **selected** only when it beats 0.5 there by more than two paired standard
errors, else the plain sum stays (a grid's best on noise is not a finding). Test is scored at the
best weight and at 0.5, paired per user.

Writes ``benchmarks/results/eager/<dataset>/<NAME>.json``: ``metrics.valid`` and ``metrics.test`` at
the selected weight (``config.fusion_weight``; ``config.best_weight`` the grid's best), ``weights``
(each weight's validation figures), and ``paired`` (best minus 0.5, per split, with standard
errors). With ``--plot``, validation Recall@10 and NDCG@10 against w.
Serve the chosen weight with ``inference: {fusion_weight: W}`` (or ``load_model(..., inference=)``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.paired import paired_difference  # noqa: E402
from benchmarks.protocols import trained_with_refit  # noqa: E402
from benchmarks.record import protocol, run_dataset, save_figure, write_record  # noqa: E402
from recsys.data.schema import InteractionData  # noqa: E402
from recsys.data.split import EvalSet, leave_one_out  # noqa: E402
from recsys.metrics import DEFAULT_KS, per_user_metrics, target_ranks  # noqa: E402
from recsys.models import Batch, Eager  # noqa: E402
from recsys.models.eager import StreamCandidates, merge_streams  # noqa: E402
from recsys.training.batching import trim_padding  # noqa: E402
from recsys.training.checkpoint import load_model  # noqa: E402

DEFAULT_WEIGHTS = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1"
PLAIN = 0.5


@torch.no_grad()
def decode(model: Eager, eval_set: EvalSet, k: int, exclude_history: bool,
           batch_size: int = 512) -> tuple[StreamCandidates, torch.Tensor]:
    """Both streams' top k for every user of ``eval_set``, in its order, and the targets."""
    model.eval()
    parts = []
    histories = torch.tensor(eval_set.histories)
    for start in range(0, len(histories), batch_size):
        batch = Batch(history=trim_padding(histories[start:start + batch_size])[0])
        parts.append(model.stream_candidates(batch, k, exclude_history))
    spaces = parts[0].log_probs.keys()
    joined = StreamCandidates(torch.cat([p.items for p in parts]), torch.cat([p.streams for p in parts]),
                              {s: torch.cat([p.found_by[s] for p in parts]) for s in spaces},
                              {s: torch.cat([p.log_probs[s] for p in parts]) for s in spaces})
    return joined, torch.tensor(eval_set.targets)


def per_user_at(found: StreamCandidates, targets: torch.Tensor, weight: float, k: int,
                chunk: int = 4096) -> dict[str, np.ndarray]:
    """Per-user Recall/NDCG of the fused top ``k`` at behaviour weight ``weight``."""
    ranks = []
    for start in range(0, len(targets), chunk):
        rows = slice(start, start + chunk)
        part = StreamCandidates(found.items[rows], found.streams[rows], {},
                                {s: v[rows] for s, v in found.log_probs.items()})
        top = merge_streams(part.items, part.summed(weight), part.streams, k)
        ranks.append(target_ranks(top.items, targets[rows]))
    return per_user_metrics(torch.cat(ranks).numpy())


def best_weight(table: dict[float, dict[str, float]], metric: str) -> float:
    """The weight with the best ``metric``; among equals, the one nearest the plain sum."""
    return max(table, key=lambda w: (table[w][metric], -abs(w - PLAIN)))


def selected_weight(best: float, against_plain: dict[str, dict[str, float]], metric: str) -> float:
    """``best`` when it beats the plain sum on ``metric`` by more than two paired standard errors."""
    diff = against_plain[metric]
    return best if diff["mean"] > 2 * diff["se"] else PLAIN


def paired(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    return {k: {"mean": round(d["diff"], 5), "se": round(d["se"], 5)} for k, d in paired_difference(a, b).items()}


def plot(table: dict[float, dict[str, float]], best: float, chosen: float, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = sorted(table)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric in zip(axes, ("recall@10", "ndcg@10")):
        ax.plot(weights, [table[w][metric] for w in weights], marker="o")
        ax.axvline(best, color="tab:red", linestyle="--", label=f"best w = {best:g}")
        ax.axvline(PLAIN, color="grey", linestyle=":", label="plain sum (0.5)")
        ax.plot([chosen], [table[chosen][metric]], marker="*", markersize=14, color="tab:green", linestyle="none",
                label=f"selected w = {chosen:g}")
        ax.set_xlabel("behaviour stream's weight w")
        ax.set_ylabel(f"validation {metric}")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def parse_weights(text: str) -> list[float]:
    try:
        weights = sorted({float(w) for w in text.split(",") if w.strip()})
    except ValueError:
        raise ValueError(f"--weights must be comma-separated numbers in [0, 1], got {text!r}") from None
    if not weights or weights[0] < 0 or weights[-1] > 1:
        raise ValueError(f"--weights must be comma-separated numbers in [0, 1], got {text!r}")
    return sorted({*weights, PLAIN})


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="the `recsys data` run the model was trained on")
    parser.add_argument("--name", required=True, help="record eager/<dataset>/<name>.json")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS, help="behaviour weights to try, in [0, 1] (0.5 added)")
    parser.add_argument("--select-metric", default="recall@10", help="the validation figure that picks the weight")
    parser.add_argument("--exclude-history", action="store_true", help="the second protocol: history items removed")
    parser.add_argument("--max-history", type=int, default=20)
    parser.add_argument("--valid-users", type=int, default=0,
                        help="> 0: choose on this fixed random sample of validation users (default: all)")
    parser.add_argument("--plot", type=Path, help="write validation Recall@10 and NDCG@10 against w here")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    try:
        weights = parse_weights(args.weights)
    except ValueError as err:
        parser.error(str(err))
    metrics_known = {f"{m}@{k}" for m in ("recall", "ndcg") for k in DEFAULT_KS}
    if args.select_metric not in metrics_known:
        parser.error(f"--select-metric must be one of {sorted(metrics_known)}, got {args.select_metric!r}")
    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint)
    if not isinstance(model, Eager) or model.config.streams != "both":
        parser.error(f"{args.checkpoint} is not an EAGER model with both streams: nothing to weigh")
    split = leave_one_out(InteractionData.load(args.data), args.max_history)
    k = max(DEFAULT_KS)
    start = time.perf_counter()

    valid = split.eval_set("valid").sample(args.valid_users, seed=0)  # as training draws it at seed 0
    found, targets = decode(model, valid, k, args.exclude_history)
    per_weight = {w: per_user_at(found, targets, w, k) for w in weights}
    table = {w: {m: round(float(v.mean()), 5) for m, v in per_weight[w].items()} for w in weights}
    best = best_weight(table, args.select_metric)
    compared = {"valid": paired(per_weight[PLAIN], per_weight[best])}
    chosen = selected_weight(best, compared["valid"], args.select_metric)
    for w in weights:
        mark = "  <- best" if w == best else ""
        mark += "  (plain sum)" if w == PLAIN else ""
        print(f"valid w={w:<5g} " + "  ".join(f"{m} {v:.4f}" for m, v in table[w].items()) + mark, flush=True)

    found, targets = decode(model, split.eval_set("test"), k, args.exclude_history)
    test_at = {w: per_user_at(found, targets, w, k) for w in {best, PLAIN}}
    compared["test"] = paired(test_at[PLAIN], test_at[best])
    for name, diff in compared.items():
        print(f"{name}: w={best:g} minus 0.5: " + "  ".join(f"{m} {d['mean']:+.4f} ± {d['se']:.4f}"
                                                            for m, d in diff.items()), flush=True)
    print(f"selected: w={chosen:g} ({'beats' if chosen != PLAIN else 'the best does not beat'} the plain sum on "
          f"validation {args.select_metric} by more than 2 standard errors)", flush=True)
    metrics = {"valid": table[chosen], "test": {m: round(float(v.mean()), 5) for m, v in test_at[chosen].items()}}
    history = "excluded" if args.exclude_history else "kept"
    path = write_record(args.name, model="eager", dataset=run_dataset(args.data),
                        config={"checkpoint": str(args.checkpoint), "data_run": str(args.data), "fusion": "sum",
                                "fusion_weight": chosen, "best_weight": best, "weights_tried": weights, "select_metric": args.select_metric,
                                "max_history": args.max_history, "threads": args.threads,
                                "valid_users": args.valid_users or "all"},
                        wall_s=time.perf_counter() - start, metrics=metrics,
                        protocol=protocol(exclude_history=args.exclude_history,
                                          refit=trained_with_refit(args.checkpoint)),
                        extra={"weights": {str(w): table[w] for w in weights},
                               "plain_sum_test": {m: round(float(v.mean()), 5) for m, v in test_at[PLAIN].items()},
                               "paired": {"best": best, "against": "fusion_weight 0.5", **compared}})
    print(f"record: {path}")
    if args.plot:
        print(f"plot: {plot(table, best, chosen, f'{args.name} (history {history})', args.plot)}")


if __name__ == "__main__":
    main(sys.argv[1:])
