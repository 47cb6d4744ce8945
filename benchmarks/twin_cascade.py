"""The cascade table of issue 22: one retriever, re-ranked by TWIN-V2, TWIN and the last-20 target
attention, beside the retriever alone ("no ranker").

    python benchmarks/twin_cascade.py RETRIEVER_RUN --config configs/lastfm-twin_v2.yaml --name NAME \
        [--variants twin_v2,twin,last20] [--top-n 100] [key=value ...]

RETRIEVER_RUN: a retriever train run trained with ``trainer.data.ranker_holdout=true``; or, with
``--folds K [--fold-examples M]``, one trained on every training transition, and the ranker's
examples come from K fold retrievers trained once and shared by all variants
(``pipelines.rank_stage``); ``--candidates DIR`` reuses such lists from an earlier run, and
``--resume-folds DIR`` continues an interrupted one (its ``<NAME>-folds`` directory).
``--vectors-from VRUN`` gives every ranker the content vectors of a ``recsys embed`` run, or the item
table of a run that never trained on the examples (``trainer.data.drop_last_transitions``); by
default a retriever's own table, or for TIGER and EAGER the embed run behind their IDs. Each variant
runs ``recsys rank`` (candidates, ranker training selected on validation, test once) and writes
``benchmarks/results/<ranker>/<dataset>/<NAME>[-history-none].json``: the cascade's re-ranked
figures at ``metrics.test`` / ``metrics.valid`` (Recall/NDCG@5/10/20, AUC, GAUC), the retriever alone
on the same candidates at ``metrics.retriever``, the slice of users with more than the retriever's
20 prior items, and the paired standard error of the per-user NDCG@10 gain.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.record import QUALITY_KEYS, RANKER_KEYS, protocol, run_dataset, write_record  # noqa: E402
from recsys.experiment import load_experiment  # noqa: E402
from recsys.runs import new_run_dir, read_json  # noqa: E402

VARIANTS = {"twin_v2": ["model.name=twin_v2"], "twin": ["model.name=twin"],
            "last20": ["model.name=twin", "model.history=none"]}


def figures(metrics: dict) -> dict:
    return {k: metrics[k] for k in QUALITY_KEYS + RANKER_KEYS}


def main(argv: list[str] | None = None) -> None:
    from pipelines.rank_stage import run_rank

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("retriever", type=Path)
    parser.add_argument("--config", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--top-n", type=int, default=100)
    parser.add_argument("--folds", type=int, default=0, help="K >= 2: ranker examples from K fold retrievers")
    parser.add_argument("--fold-examples", type=int, default=5, help="with --folds: last M training transitions per user")
    parser.add_argument("--candidates", type=Path, help="a candidates run of RETRIEVER_RUN made before (e.g. the "
                        "<rank run>/candidates of an earlier --folds cascade): reused, so its fold retrievers are not "
                        "trained again and rankers compare on the same lists")
    parser.add_argument("--resume-folds", type=Path, help="the <NAME>-folds directory of a --folds run that was "
                        "interrupted: its finished fold retrievers are reused, an unfinished one continues from its "
                        "last checkpoint, and the candidates are made once all are done")
    parser.add_argument("--vectors-from", type=Path, help="a `recsys embed` run, or a retriever run trained with "
                        "trainer.data.drop_last_transitions: the rankers' frozen item vectors (pipelines.rank_stage)")
    parser.add_argument("--note", default="", help="said in every record (e.g. pilot, one seed, machine shared)")
    ns, overrides = parser.parse_known_args(argv)
    retriever_config = read_json(ns.retriever / "config.json")
    dataset = run_dataset(Path(retriever_config["data_dir"]))
    if ns.candidates is not None and ns.folds:
        raise SystemExit("--candidates reuses an earlier run's lists (and its folds); give it without --folds")
    candidates_dir = ns.candidates
    examples_last = ns.fold_examples if ns.folds else 1  # the training transitions per user the ranker reads
    if ns.candidates is not None:  # its own examples apply (the holdout's one, or the M it was made with)
        examples = read_json(ns.candidates / "config.json").get("train_examples")
        examples_last = 1 if examples is None else examples["last"]
    if ns.vectors_from is not None:  # before the fold retrievers train
        from pipelines.rank_stage import require_vectors_run

        require_vectors_run(ns.vectors_from, ns.retriever, examples_last)
    if ns.resume_folds is not None and not ns.folds:
        raise SystemExit("--resume-folds continues the fold retrievers of an earlier --folds run; give --folds too")
    if ns.folds:  # the fold retrievers and their candidates, once for every variant
        from pipelines.rank_stage import finished_or_cleared, run_fold_candidates, run_fold_retrievers

        first = load_experiment(ns.config, overrides)
        resume = ns.resume_folds is not None
        parent = ns.resume_folds if resume else new_run_dir(first.run.root, "rank", f"{ns.name}-folds")
        fold_dirs = run_fold_retrievers(ns.retriever, ns.folds, parent=parent, examples_last=ns.fold_examples,
                                        resume=resume)
        candidates_dir = finished_or_cleared(parent / "candidates", "candidates") if resume else None
        if candidates_dir is None:
            candidates_dir, _ = run_fold_candidates(ns.retriever, fold_dirs, ns.fold_examples, ns.top_n, parent=parent)
    for variant in ns.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"--variants: {variant!r} is not one of {list(VARIANTS)}")
        exp = load_experiment(ns.config, [*overrides, *VARIANTS[variant], f"run.name={ns.name}-{variant}"])
        start = time.perf_counter()
        run_dir, metrics = run_rank(exp, ns.retriever, ns.top_n, candidates_dir=candidates_dir,
                                    vectors_from=ns.vectors_from)
        history_none = exp.model.history == "none"
        path = write_record(
            f"{ns.name}-history-none" if history_none else ns.name, model=exp.model_name, dataset=dataset,
            config=exp.to_dict(), wall_s=time.perf_counter() - start, protocol=protocol(exclude_history=False),
            metrics={"test": figures(metrics["test"]), "valid": figures(metrics["valid"]),
                     "retriever": {split: figures(metrics["retriever"][split]) for split in ("valid", "test")},
                     "target_in_set": {split: metrics["candidates"][split]["target_in_set"] for split in ("valid", "test")},
                     "test_long_history": {"users": metrics["test_long_history"]["users"],
                                           "ranker": figures(metrics["test_long_history"]["ranker"]),
                                           "retriever": figures(metrics["test_long_history"]["retriever"])},
                     "test_ndcg@10_gain": metrics["test_ndcg@10_gain"]},
            extra={"variant": variant, "retriever_run": str(ns.retriever), "retriever_config": retriever_config,
                   "ranker_examples": read_json(run_dir / "config.json")["ranker_examples"],
                   "item_vectors_run": read_json(run_dir / "config.json")["item_vectors_dir"],
                   "rank_run": str(run_dir), "top_n": ns.top_n, "note": ns.note})
        print(f"{variant}: test ndcg@10 {metrics['test']['ndcg@10']:.4f} (retriever {metrics['retriever']['test']['ndcg@10']:.4f}), "
              f"auc {metrics['test']['auc']:.4f}, gauc {metrics['test']['gauc']:.4f} -> {path}", flush=True)


if __name__ == "__main__":
    main()
