"""The ``recsys`` command: one verb per stage, plus ``pipeline`` that chains them.

    recsys data      [CONFIG] [key=value ...]
    recsys embed     [CONFIG] [key=value ...] [--data DATA_RUN]
    recsys ids       [CONFIG] [key=value ...] [--method rqvae|hkmeans] [--embed EMBED_RUN] [--data DATA_RUN]
    recsys ids       [CONFIG] [key=value ...] --from-train TRAIN_RUN     (IDs from a model's item embeddings)
    recsys train     [CONFIG] [key=value ...] [--data DATA_RUN] [--ids [SPACE=]IDS_RUN ...] [--resume TRAIN_RUN]
                     [--candidates CANDIDATES_RUN]  (rankers)  [--embed EMBED_RUN]  (content vectors)
    recsys evaluate  TRAIN_RUN [--split test|valid]
    recsys candidates TRAIN_RUN --top-n N [--splits train,valid,test]
    recsys rank      [CONFIG] [key=value ...] --retriever TRAIN_RUN [--top-n 100] [--folds K]   (the cascade)
    recsys rank      --resume RANK_RUN                                     (an interrupted cascade)
    recsys history   [CONFIG] [key=value ...] [--data DATA_RUN] [--embed EMBED_RUN]   (a new store: store.path)
    recsys pipeline  [CONFIG] [key=value ...]
    recsys demo      [CONFIG] --baseline BASELINE_CONFIG [key=value ...] [baseline.key=value ...]
    recsys tune      SWEEP_CONFIG [key=value ...] [--embed EMBED_RUN] [--data DATA_RUN] [--behavior TRAIN_RUN]
    recsys tune      --resume SWEEP_RUN
    recsys serve     RUN [--host 127.0.0.1] [--port 8000] [--replicas N] [--api-key-env VAR] [--ann [--ann-index Flat]]
                     [--top-n N] [--store STORE [--create-store]]

CONFIG is a YAML file; without one the embedded defaults run (the synthetic dataset, offline).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from recsys.experiment import behavior_experiment, load_experiment, resumed_experiment
from recsys.models import get_spec
from recsys.reporting import results_table
from recsys.runs import (
    CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, mark_complete, new_run_dir, read_json, write_json, write_text,
)


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """The first argument is the config file unless it is already an override."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def cmd_data(ns: argparse.Namespace) -> None:
    from pipelines.stages import run_data

    exp = load_experiment(*split_config_args(ns.config))
    run_dir = run_data(exp)
    print(Path(run_dir / SUMMARY_FILE).read_text())
    print(f"data run: {run_dir}")


def cmd_embed(ns: argparse.Namespace) -> None:
    from pipelines.stages import run_embed_stage

    exp = load_experiment(*split_config_args(ns.config))
    run_dir = run_embed_stage(exp, data_dir=ns.data)
    print(Path(run_dir / SUMMARY_FILE).read_text())
    print(f"embed run: {run_dir}")


def cmd_ids(ns: argparse.Namespace) -> None:
    from pipelines.stages import run_ids_stage

    path, overrides = split_config_args(ns.config)
    if ns.method:
        overrides = [*overrides, f"ids.method={ns.method}"]
    exp = load_experiment(path, overrides)
    run_dir = run_ids_stage(exp, embed_dir=ns.embed, data_dir=ns.data, train_dir=ns.from_train)
    print(Path(run_dir / SUMMARY_FILE).read_text())
    print(f"ids run: {run_dir}")


def ids_runs_by_space(model_name: str, values: list[str] | None) -> dict[str, Path]:
    """``--ids`` values -> {space: run}: ``SPACE=RUN``, or a bare ``RUN`` for a model with one space."""
    spaces = get_spec(model_name).model_cls.capabilities.id_spaces
    out: dict[str, Path] = {}
    for value in values or []:
        space, sep, run = value.partition("=")
        if not sep or "/" in space:  # a bare run directory
            if len(spaces) != 1:
                raise ValueError(f"--ids {value}: model.name={model_name!r} declares the ID spaces {list(spaces)}; "
                                 "name the space, --ids SPACE=RUN")
            space, run = spaces[0], value
        if not run:  # Path("") is the working directory: say what was given instead
            raise ValueError(f"--ids {value}: no run directory after {space!r}=")
        if space in out:
            raise ValueError(f"--ids names the space {space!r} twice")
        out[space] = Path(run)
    return out


def cmd_train(ns: argparse.Namespace) -> None:
    from pipelines.stages import run_train

    if ns.resume:
        path, overrides = split_config_args(ns.config)
        if path is not None or ns.data or ns.embed:
            raise ValueError("--resume continues a run with its saved config and data; give only overrides "
                             f"(key=value), not {path or ('--data' if ns.data else '--embed')}")
        saved = read_json(Path(ns.resume) / CONFIG_FILE)
        exp = resumed_experiment(saved, overrides)
        run_dir = run_train(exp, resume_dir=Path(ns.resume))
    else:
        exp = load_experiment(*split_config_args(ns.config))
        run_dir = run_train(exp, data_dir=ns.data, ids_dirs=ids_runs_by_space(exp.model_name, ns.ids),
                            candidates_dir=ns.candidates, embed_dir=ns.embed)
    print(Path(run_dir / SUMMARY_FILE).read_text())
    print(f"train run: {run_dir}")


def cmd_evaluate(ns: argparse.Namespace) -> None:
    from pipelines.stages import run_evaluate

    run_dir, figures = run_evaluate(Path(ns.train_run), ns.split)
    print(results_table({ns.split: figures}))
    print(f"evaluate run: {run_dir}")


def cmd_candidates(ns: argparse.Namespace) -> None:
    """A trained retriever's top-N per user at each split, for rankers to train and be evaluated on."""
    from pipelines.stages import run_candidates

    run_dir, metrics = run_candidates(Path(ns.train_run), ns.top_n, tuple(s for s in ns.splits.split(",") if s))
    print(Path(run_dir / SUMMARY_FILE).read_text())
    print(f"candidates run: {run_dir}")


def cmd_rank(ns: argparse.Namespace) -> None:
    """The cascade: a retriever's candidates, a ranker trained on them, test figures of both."""
    from pipelines.rank_stage import resume_rank, run_rank

    if ns.resume is not None:
        if ns.config or ns.retriever or ns.folds or ns.vectors_from:
            raise ValueError("--resume continues a rank run with the inputs it was started with; give it alone")
        run_dir, _ = resume_rank(ns.resume)
    elif ns.retriever is None:
        raise ValueError("give the retriever's train run, e.g. recsys rank --retriever runs/train/<run> (or --resume "
                         "RANK_RUN)")
    else:
        exp = load_experiment(*split_config_args(ns.config))
        run_dir, _ = run_rank(exp, Path(ns.retriever), ns.top_n, folds=ns.folds, fold_examples=ns.fold_examples,
                              vectors_from=ns.vectors_from)
    print(Path(run_dir / SUMMARY_FILE).read_text())
    print(f"rank run: {run_dir}")


def cmd_history(ns: argparse.Namespace) -> None:
    """Every user's whole history clustered into virtual items (history.gamma), with the user's
    events, into a new store (store.path; default <run>/state.sqlite) that `recsys serve --store` reads."""
    from pipelines.history_job import run_history
    from pipelines.stages import run_embed_stage

    exp = load_experiment(*split_config_args(ns.config))
    if ns.embed is None:  # embed first (and prepare the data when no data run is given)
        ns.embed = run_embed_stage(exp, data_dir=ns.data)
    data_dir = ns.data if ns.data is not None else read_json(Path(ns.embed) / CONFIG_FILE)["data_dir"]
    run_dir = run_history(exp, Path(data_dir), Path(ns.embed))
    print(Path(run_dir / SUMMARY_FILE).read_text())
    print(f"history run: {run_dir}")


def cmd_pipeline(ns: argparse.Namespace) -> None:
    """data -> [embed -> ids ->] [behaviour model -> ids ->] train -> evaluate, each stage a
    subdirectory of one pipeline run."""
    from pipelines.stages import run_data, run_evaluate, run_train

    exp = load_experiment(*split_config_args(ns.config))
    spaces = get_spec(exp.model_name).model_cls.capabilities.id_spaces
    unknown = set(spaces) - {"semantic", "behavior"}
    if unknown:
        raise ValueError(f"model.name={exp.model_name!r} decodes the ID spaces {list(spaces)}; the pipeline builds "
                         "the semantic and behavior spaces only: build the others with `recsys ids` and run "
                         "`recsys train --ids SPACE=RUN ...`")
    if "behavior" in spaces:
        behavior_experiment(exp)  # checked before any work
    run_dir = new_run_dir(exp.run.root, "pipeline", exp.run.name or exp.model_name)
    write_json(run_dir / CONFIG_FILE, exp.to_dict())
    data_dir = run_data(exp, run_dir)
    ids_dirs = {}
    if "semantic" in spaces:  # data -> embed -> ids -> train
        from pipelines.stages import run_ids_stage

        ids_dirs["semantic"] = run_ids_stage(exp, data_dir=data_dir, parent=run_dir)
    if "behavior" in spaces:  # data -> behaviour model -> ids from its item vectors -> train
        from pipelines.stages import run_behavior_ids

        ids_dirs["behavior"] = run_behavior_ids(exp, data_dir, parent=run_dir)
    train_dir = run_train(exp, data_dir=data_dir, ids_dirs=ids_dirs, parent=run_dir)
    eval_dir, test = run_evaluate(train_dir, "test", parent=run_dir)
    train_metrics = read_json(train_dir / METRICS_FILE)
    users = exp.trainer.selection.valid_users
    valid_label = "valid (selected" + (f", {users} users)" if users else ")")
    if train_metrics["valid"]:
        table = results_table({valid_label: train_metrics["valid"], "test": test})
    else:  # a refit (trainer.selection.refit): trained on the validation targets, so no validation figure
        table = results_table({"test (refit on training + validation)": test})
    stages = {p.name: str(p) for p in sorted(run_dir.iterdir()) if p.is_dir()}
    write_json(run_dir / METRICS_FILE, {"valid": train_metrics["valid"], "test": test,
                                         "best_epoch": train_metrics["best_epoch"],
                                         "train_wall_s": train_metrics["wall_s"], "stages": stages})
    write_text(run_dir / SUMMARY_FILE, f"# pipeline: {exp.model_name} on {exp.data.format}\n\n{table}\n\n"
               + "".join(f"- {name}: {name}/summary.md\n" for name in stages)
               + "- training curve: train/training_curve.png\n")
    mark_complete(run_dir, "pipeline")
    print(f"\n{exp.model_name} on {exp.data.format}: best epoch {train_metrics['best_epoch']}, "
          f"train wall time {train_metrics['wall_s']} s\n")
    print(table)
    print(f"\npipeline run: {run_dir}")


def cmd_demo(ns: argparse.Namespace) -> None:
    """The tour behind `make demo` (pipelines/demo.py): both models, the table, one served request."""
    from pipelines.demo import load_demo, run_demo

    path, overrides = split_config_args(ns.config)
    exp, baseline = load_demo(path, ns.baseline, overrides)  # both validated before any work
    run_demo(exp, baseline)


def cmd_tune(ns: argparse.Namespace) -> int:
    """A Ray Tune sweep (tune/): trials ranked on validation, the winner tested once."""
    from recsys.sweep import load_sweep

    path, overrides = split_config_args(ns.config)
    if ns.resume and (path is not None or overrides or ns.embed or ns.data or ns.behavior):
        raise ValueError("--resume continues a sweep with its saved config and inputs; give only the sweep "
                         "run directory")
    if not ns.resume and path is None:
        raise ValueError("give a sweep config, e.g. recsys tune configs/tune-demo.yaml (or --resume SWEEP_RUN)")
    sweep = None if ns.resume else load_sweep(path, overrides)  # every trial is validated before any work
    from tune.driver import SweepInterrupted, resume_sweep, run_sweep

    try:
        resume_sweep(ns.resume) if ns.resume else run_sweep(sweep, embed_dir=ns.embed, data_dir=ns.data,
                                                              behavior_dir=ns.behavior)
    except SweepInterrupted as err:
        print(f"recsys tune: {err}", file=sys.stderr)
        return 130
    return 0


def inference_settings(pairs: list[str]) -> dict[str, str]:
    """``["fusion=behavior", "beam_size=50"]`` -> a dict; the model's config types the values."""
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"--inference {pair!r} must be KEY=VALUE, e.g. --inference fusion=behavior")
        settings[key] = value
    return settings


def cmd_serve(ns: argparse.Namespace) -> None:
    """Serve a train run over HTTP until Ctrl-C (Ray Serve on a local Ray instance, or the cluster
    in RAY_ADDRESS)."""
    from pipelines.ray_env import init_ray
    from serve.launch import prepare, serve_until_interrupted

    if ns.create_store and ns.store is None:
        raise ValueError("--create-store needs --store PATH: the file of the new store")
    if ns.ann_index is not None and not ns.ann:
        raise ValueError("--ann-index sets the faiss index of the ANN baseline: give --ann too")
    store = None if ns.store is None else {"kind": "sqlite", "path": str(ns.store), "create": ns.create_store}
    app = prepare({"run_dir": str(ns.train_run), "num_replicas": ns.replicas, "max_batch_size": ns.max_batch_size,
                   "api_key_env": ns.api_key_env, "retrieval": "ann" if ns.ann else "model", "store": store,
                   **({} if ns.ann_index is None else {"ann_index": ns.ann_index}),
                   "ranker_dir": None if ns.ranker is None else str(ns.ranker), "cascade_top_n": ns.top_n,
                   "inference": inference_settings(ns.inference)},
                  host=ns.host)
    key = f" -H \"X-API-Key: ${ns.api_key_env}\"" if ns.api_key_env else ""

    def ready(url: str) -> None:
        print(f"serving {ns.train_run} at {url}  (OpenAPI: {url}/docs; Ctrl-C stops)\n"
              f"  curl -s {url}/recommend -H 'Content-Type: application/json'{key} "
              """-d '{"history": ["<item id>", "<item id>"], "k": 10}'""", flush=True)

    init_ray()
    serve_until_interrupted(app, ns.host, ns.port, ready)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    for name, func, help_text in [("data", cmd_data, "read a dataset into a data run"),
                                  ("embed", cmd_embed, "embed item texts with a sentence encoder (Ray Data)"),
                                  ("ids", cmd_ids, "semantic IDs: RQ-VAE (Ray Train) or hierarchical k-means (Ray tasks)"),
                                  ("train", cmd_train, "train a model (Ray Train)"),
                                  ("history", cmd_history, "cluster every user's whole history into a new store "
                                   "(Ray Data)"),
                                  ("pipeline", cmd_pipeline, "data -> train -> evaluate")]:
        sub = verbs.add_parser(name, help=help_text)
        sub.add_argument("config", nargs="*", help="[CONFIG.yaml] [key.subkey=value ...]")
        sub.set_defaults(func=func)
        if name in ("embed", "ids", "train", "history"):
            sub.add_argument("--data", type=Path, help="a `recsys data` run directory (default: prepare it)")
        if name == "history":
            sub.add_argument("--embed", type=Path, help="a `recsys embed` run: the items' content vectors (default: "
                             "embed first)")
        if name == "ids":
            sub.add_argument("--method", choices=("rqvae", "hkmeans"), help="shorthand for ids.method=")
            sub.add_argument("--embed", type=Path, help="a `recsys embed` run directory (default: embed first)")
            sub.add_argument("--from-train", type=Path, metavar="TRAIN_RUN",
                             help="build IDs from a train run's item embeddings (behaviour IDs; e.g. sasrec), "
                                  "not from content; a refit run is refused")
        if name == "train":
            sub.add_argument("--resume", type=Path, help="a train run directory to continue")
            sub.add_argument("--ids", action="append", metavar="[SPACE=]RUN",
                             help="a `recsys ids` run per ID space the model declares, e.g. --ids semantic=RUN "
                                  "--ids behavior=RUN; a bare RUN is the model's one space")
            sub.add_argument("--candidates", type=Path, help="a `recsys candidates` run, for rankers")
            sub.add_argument("--embed", type=Path, help="a `recsys embed` run over the same data: each item's content "
                             "vector, for a model that reads them (two_tower with model.content=true)")
    dm = verbs.add_parser("demo", help="the demo: generative model and baseline on one data run, the results "
                          "table, one request to the served model")
    dm.add_argument("config", nargs="*", help="[CONFIG.yaml] [key.subkey=value ...] [baseline.key.subkey=value ...]")
    dm.add_argument("--baseline", type=Path, required=True, help="the baseline's config (model, trainer, eval; "
                    "data and run come from CONFIG), e.g. configs/demo-sasrec.yaml")
    dm.set_defaults(func=cmd_demo)
    tn = verbs.add_parser("tune", help="Ray Tune sweep (ASHA) over config keys; ranked on validation")
    tn.add_argument("config", nargs="*", help="SWEEP.yaml [key.subkey=value ...]")
    tn.add_argument("--resume", type=Path, help="a `recsys tune` run directory to continue")
    tn.add_argument("--embed", type=Path, help="a `recsys embed` run to use (default: embed first)")
    tn.add_argument("--data", type=Path, help="a `recsys data` run directory (default: prepare it)")
    tn.add_argument("--behavior", type=Path, help="a train run whose item vectors every trial's behavior IDs are "
                    "clustered from (e.g. a two_tower on the same data run; default: train behavior.config once)")
    tn.set_defaults(func=cmd_tune)
    ev = verbs.add_parser("evaluate", help="evaluate a train run's selected checkpoint")
    ev.add_argument("train_run", type=Path)
    ev.add_argument("--split", choices=("test", "valid"), default="test")
    ev.set_defaults(func=cmd_evaluate)
    cd = verbs.add_parser("candidates", help="a retriever run's top-N per user (train/valid/test), for rankers")
    cd.add_argument("train_run", type=Path, help="a complete train run of a retriever")
    cd.add_argument("--top-n", type=int, required=True, help="candidates per user (1 .. catalogue size)")
    cd.add_argument("--splits", default="train,valid,test", help="comma-separated splits (default train,valid,test)")
    cd.set_defaults(func=cmd_candidates)
    rk = verbs.add_parser("rank", help="the cascade: a retriever's top-N re-ranked by a ranker (e.g. twin_v2)")
    rk.add_argument("config", nargs="*", help="[CONFIG.yaml] [key.subkey=value ...] (model.name: a ranker)")
    rk.add_argument("--resume", type=Path, metavar="RANK_RUN",
                    help="continue an interrupted rank run: finished fold retrievers are reused, an unfinished one "
                    "continues from its last checkpoint")
    rk.add_argument("--retriever", type=Path,
                    help="a complete retriever train run: trained with trainer.data.ranker_holdout=true, or on every "
                    "training transition with --folds")
    rk.add_argument("--top-n", type=int, default=100, help="candidates per user (default 100)")
    rk.add_argument("--folds", type=int, default=0,
                    help="K >= 2: train K retrievers as RUN was, each without one user fold, and take the ranker's "
                    "examples from them (RUN keeps every transition); 0 (default): RUN's ranker holdout")
    rk.add_argument("--fold-examples", type=int, default=5,
                    help="with --folds: each user's last M training transitions are ranker examples (default 5)")
    rk.add_argument("--vectors-from", type=Path, metavar="VRUN",
                    help="take the ranker's frozen item vectors from this run of the same data: a `recsys embed` run "
                    "(content vectors), or a retriever run trained with trainer.data.drop_last_transitions >= the "
                    "examples per user, so they never saw the ranker's examples (default: RUN's item table; for a "
                    "retriever without one, such as TIGER or EAGER, the embed run its semantic IDs were built from)")
    rk.set_defaults(func=cmd_rank)
    sv = verbs.add_parser("serve", help="serve a retriever, or a retriever -> ranker cascade, over HTTP (Ray Serve) "
                          "until Ctrl-C")
    sv.add_argument("train_run", type=Path, help="a retriever's train run (or a pipeline run), or a `recsys rank` run: "
                    "its retriever's top-N re-ranked by its ranker")
    sv.add_argument("--ranker", type=Path, help="a ranker's train run: serve the cascade of the retriever given as "
                    "RUN and this ranker (trained on the retriever's candidates)")
    sv.add_argument("--top-n", type=int, help="cascade: the retriever's top items the ranker re-ranks (default: the "
                    "rank run's N, else 100)")
    sv.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--replicas", type=int, default=1, help="model replicas (default 1)")
    sv.add_argument("--max-batch-size", type=int, default=8, help="requests batched per model call (default 8)")
    sv.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the API key; requests "
                    "must then send it in X-API-Key")
    sv.add_argument("--ann", action="store_true", help="serve the ANN baseline (user embedding + faiss index) "
                    "instead of the model's own recommend; for sasrec runs")
    sv.add_argument("--ann-index", metavar="INDEX", help="with --ann: the faiss index, 'HNSW<M>' (default HNSW32) or "
                    "'Flat' (exact: every item scored, for small catalogues)")
    sv.add_argument("--store", type=Path, help="the serving state (an SQLite store, e.g. made by `recsys history`): "
                    "registered items and events are written there before they are acknowledged; without it the "
                    "app registers no items and records no events")
    sv.add_argument("--create-store", action="store_true", help="make a new, empty store at --store if none is there "
                    "(without it a missing store is an error)")
    sv.add_argument("--inference", action="append", default=[], metavar="KEY=VALUE",
                    help="change one of the model's inference settings from its checkpoint's (repeatable), e.g. "
                    "--inference fusion=behavior (EAGER: the behaviour stream alone) or --inference beam_size=50")
    sv.set_defaults(func=cmd_serve)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Like ``parse_args``, but config words may come after options too: argparse fills the
    ``config`` list before it sees ``--data RUN``, so ``train --data RUN k=v`` would reject ``k=v``.
    Words left over are appended to ``config`` when they are all overrides (or when no config word
    came before them); anything else is an error, as before."""
    ns, extra = parser.parse_known_args(argv)
    if extra:
        words = not any(a.startswith("-") for a in extra)
        fits = hasattr(ns, "config") and words and (not ns.config or all("=" in a for a in extra))
        if not fits:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        ns.config = [*ns.config, *extra]
    return ns


INTERRUPTED_HINTS = {"train": "; the run keeps its checkpoints: `recsys train --resume RUN_DIR` goes on from the "
                              "last one (RUN_DIR is under run.root/train/)"}


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(build_parser(), argv)
    try:
        code = ns.func(ns)  # None from verbs that only succeed or raise
    except (ValueError, FileNotFoundError) as err:
        print(f"recsys {ns.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; 130 as a shell reports SIGINT
        print(f"recsys {ns.verb}: interrupted{INTERRUPTED_HINTS.get(ns.verb, '')}", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
