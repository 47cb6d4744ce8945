"""The stages as functions: each reads its inputs, writes ``runs/<stage>/<run-id>/`` and
returns that directory. The CLI, the pipeline and Ray Jobs all call these."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from recsys.candidates import SPLITS, candidate_metrics, candidates_file, check_top_n, retrieve, retriever_inputs
from recsys.config import flatten_dict
from recsys.data import InteractionData, load_dataset
from recsys.data.split import leave_one_out
from recsys.experiment import (
    ExperimentConfig, behavior_experiment, experiment_dict_from_run, experiment_from_dict, ids_runs_of,
)
from recsys.models import get_spec
from recsys.reporting import plot_training_curve, results_table
from recsys.runs import (
    CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, clear_complete, machine_description, mark_complete, named, read_json,
    require_complete, stage_run_dir, write_json, write_text,
)
from recsys.training.checkpoint import load_model
from recsys.training.config import with_resolved_precision
from recsys.training.evaluate import evaluate
from recsys.training.session import (
    EPOCH_LOG, check_embed_catalogue, check_id_spaces, check_ids_catalogue, model_context, train_in_process,
)


def run_data(exp: ExperimentConfig, parent: Path | None = None) -> Path:
    """Read the configured dataset into the canonical parquet form (into ``parent/data`` when given)."""
    start = time.perf_counter()
    data = load_dataset(exp.data)
    run_dir = stage_run_dir(exp.run.root, "data", named(exp.data.format, exp.run.name), parent)
    data.save(run_dir)
    split = leave_one_out(data, exp.data.max_history)
    stats = {**data.stats_with_counts(), "users_too_short_for_split": split.dropped_users,
             "wall_s": round(time.perf_counter() - start, 2)}
    write_json(run_dir / CONFIG_FILE, {"data": exp.to_dict()["data"]})
    write_json(run_dir / METRICS_FILE, stats)
    dropped = stats.get("dropped") or {}
    write_text(run_dir / SUMMARY_FILE, "\n".join([
        f"# data: {exp.data.format}", "",
        f"- users: {stats['n_users']}, items: {stats['n_items']}, interactions: {stats['n_interactions']}",
        f"- mean sequence length: {stats['mean_length']}",
        "- rows dropped: " + (", ".join(f"{k} = {v}" for k, v in dropped.items()) or "none"),
        f"- users with < 3 items (not split): {split.dropped_users}", ""]))
    mark_complete(run_dir, "data")
    return run_dir


def run_embed_stage(exp: ExperimentConfig, data_dir: Path | None = None, parent: Path | None = None) -> Path:
    """Embed item texts with the sentence encoder (in-process or on Ray Data: embed.encoder.use_ray);
    prepares the data run if none is given."""
    from pipelines.embed_job import run_embed

    data_dir = require_complete(data_dir, "data") if data_dir else run_data(exp, parent)
    return run_embed(data_dir, exp.embed.text, exp.embed.encoder, exp.run.root, name=exp.run.name, parent=parent)


def run_ids_stage(exp: ExperimentConfig, embed_dir: Path | None = None, data_dir: Path | None = None,
                  parent: Path | None = None, train_dir: Path | None = None) -> Path:
    """Semantic IDs from an embed run; embeds (and prepares the data) first if none is given.
    With ``train_dir``: IDs from that train run's item embeddings instead (behaviour IDs)."""
    from pipelines.ids_stage import run_ids

    if train_dir is not None:
        if embed_dir is not None or data_dir is not None:
            raise ValueError("--from-train builds IDs from a train run's item embeddings; "
                             "it takes no --embed or --data")
        return run_ids(exp, parent=parent, train_dir=train_dir)
    embed_dir = require_complete(embed_dir, "embed") if embed_dir else run_embed_stage(exp, data_dir, parent)
    return run_ids(exp, embed_dir, parent)


def run_behavior_ids(exp: ExperimentConfig, data_dir: Path, parent: Path | None = None) -> Path:
    """A behavior ID space for ``exp``: train the model of ``behavior.config`` on the data run
    (training transitions only), then cluster its item vectors with ``exp``'s ids settings (as
    ``recsys ids --from-train``). Inside a pipeline both runs go under ``parent/behavior``."""
    source = behavior_experiment(exp)
    home = None
    if parent is not None:
        home = Path(parent).resolve() / "behavior"
        home.mkdir()
    train_dir = run_train(source, data_dir=data_dir, parent=home)
    ids_dir = run_ids_stage(exp, parent=home, train_dir=train_dir)
    if home is not None:
        write_text(home / SUMMARY_FILE, f"# behavior IDs: {source.model_name} item vectors, {exp.ids.method}\n\n"
                   "- the model: train/summary.md (trained on training transitions only)\n"
                   "- its IDs: ids/summary.md\n")
        mark_complete(home, "behavior")
    return ids_dir


def run_train(exp: ExperimentConfig, data_dir: Path | None = None, resume_dir: Path | None = None,
              ids_dirs: dict[str, Path] | None = None, parent: Path | None = None,
              candidates_dir: Path | None = None, embed_dir: Path | None = None) -> Path:
    """Train with Ray Train (or in-process when ``trainer.resources.use_ray`` is false); select on validation.
    A model with ID spaces also needs ``ids_dirs``, an ids run over the same data per space; a
    ranker needs ``candidates_dir``, a candidates run; a model that reads content vectors takes
    them from ``embed_dir``, an embed run over the same data. A resumed run is incomplete (no
    COMPLETE marker) until it finishes again."""
    check_candidates_input(exp.model_name, candidates_dir)
    if candidates_dir is not None:  # a ranker (check_candidates_input refuses candidates for a retriever)
        if resume_dir is not None or ids_dirs or embed_dir is not None:
            raise ValueError("a ranker trains from a candidates run alone; it takes no --resume, --ids or --embed")
        from pipelines.rank_stage import run_train_ranker

        return run_train_ranker(exp, Path(candidates_dir), parent)
    if resume_dir is not None:
        run_dir = Path(resume_dir).resolve()
        saved = read_json(run_dir / CONFIG_FILE)
        data_dir, ids_dirs = Path(saved["data_dir"]), ids_runs_of(saved)
        embed_dir = saved.get("embed_dir")
        clear_complete(run_dir)
    else:
        check_id_spaces(exp.model_name, ids_dirs or {})  # before any work
        data_dir = require_complete(data_dir, "data") if data_dir else run_data(exp, parent)
        ids_dirs = {space: str(require_complete(d, "ids")) for space, d in (ids_dirs or {}).items()}
        check_ids_catalogue(ids_dirs, data_dir)
        if embed_dir is not None:
            embed_dir = str(require_complete(Path(embed_dir), "embed"))
            check_embed_catalogue(embed_dir, data_dir)
        run_dir = stage_run_dir(exp.run.root, "train", exp.run.name or exp.model_name, parent)
        exp = replace(exp, trainer=with_resolved_precision(exp.trainer))  # auto -> what this run uses
    record = exp.to_dict()
    if "semantic" in ids_dirs:  # record the settings of the IDs this run decodes, not the config file's
        record["ids"] = ids_settings(record["ids"], Path(ids_dirs["semantic"]))
    write_json(run_dir / CONFIG_FILE, {**record, "data_dir": str(data_dir), "ids_dirs": ids_dirs,
                                       **({"embed_dir": str(embed_dir)} if embed_dir is not None else {})})
    split = leave_one_out(InteractionData.load(data_dir), exp.data.max_history)
    context = model_context(exp, split.n_items, ids_dirs, embed_dir)
    start = time.perf_counter()
    if exp.trainer.resources.use_ray:
        from pipelines.ray_env import init_ray
        from pipelines.train_job import fit_with_ray

        init_ray()
        fit = fit_with_ray(exp, split, run_dir, context)
        history, restarts = fit.history, fit.worker_restarts
        write_text(run_dir / EPOCH_LOG, "".join(json.dumps(h) + "\n" for h in history))
    else:
        history = train_in_process(exp, split, run_dir, resume=resume_dir is not None, context=context).history
        restarts = 0  # no workers to lose: a crash ends the process, and `--resume` continues
    wall = time.perf_counter() - start
    return finish_train(exp, run_dir, history, wall, restarts)


def check_candidates_input(model_name: str, candidates_dir: Path | None) -> None:
    """A ranker trains on a retriever's candidate sets; a retriever reads none."""
    role = get_spec(model_name).model_cls.role
    if role == "ranker" and candidates_dir is None:
        raise ValueError(f"model.name={model_name!r} is a ranker: it trains on a retriever's candidate sets, and none "
                         "were given; make them with `recsys candidates RETRIEVER_RUN --top-n N` and pass "
                         "--candidates CANDIDATES_RUN")
    if candidates_dir is None:
        return
    if role != "ranker":
        raise ValueError(f"model.name={model_name!r} is a {role}; only rankers read --candidates")
    require_complete(candidates_dir, "candidates")


IDS_EXECUTION_KEYS = {"use_ray", "num_workers", "cpus_per_task", "checkpoint_every", "max_failures"}


def ids_settings(configured: dict, ids_dir: Path) -> dict:
    """The ``ids`` section of the ids run at ``ids_dir``; says which configured settings it
    overrides (how the IDs were computed, e.g. on Ray or not, is not worth a note)."""
    built = read_json(ids_dir / CONFIG_FILE)["ids"]
    configured_flat = flatten_dict(configured)
    differ = [f"ids.{k}" for k, v in flatten_dict(built).items()
              if configured_flat.get(k) != v and k not in IDS_EXECUTION_KEYS]
    if differ:
        print(f"note: the IDs in {ids_dir} were built with other settings than this config's "
              f"({', '.join(differ)}); the train run records the ids run's", flush=True)
    return built


def finish_train(exp: ExperimentConfig, run_dir: Path, history: list[dict], wall_s: float,
                 worker_restarts: int = 0) -> Path:
    """Write metrics, curve and summary from the per-epoch history, then mark the run complete.
    ``worker_restarts``: Ray Train worker-group restarts after failures in this invocation."""
    metric, refit = exp.trainer.selection.select_metric, exp.trainer.selection.refit
    if refit:  # no validation (its targets were trained on): the last epoch is the test model
        best, valid = history[-1], {}
    else:
        best = max((h for h in history if f"valid_{metric}" in h), key=lambda h: h[f"valid_{metric}"])
        valid = {k.removeprefix("valid_"): v for k, v in best.items() if k.startswith("valid_")}
    # Across resumes, elapsed time runs from the first epoch's start to the last epoch's end;
    # wall_s is this invocation only.
    elapsed = history[-1]["finished_at"] - (history[0]["finished_at"] - history[0]["epoch_s"])
    metrics = {
        "valid": valid, "best_epoch": best["epoch"], "epochs_run": history[-1]["epoch"], "refit": refit,
        "wall_s": round(wall_s, 2), "elapsed_s": round(elapsed, 1),
        "train_epochs_s": round(sum(h["epoch_s"] for h in history), 1),
        "samples_per_s": round(sum(h["samples_per_s"] for h in history) / len(history), 1),
        "machine": machine_description(),
        "workers": exp.trainer.resources.num_workers if exp.trainer.resources.use_ray else 0,
        "validated_users": best.get("validated_users"),  # how many validation users the selection saw
        # every restore from a checkpoint over the run's life (`--resume` or a Ray Train restart)
        "resumed_from_epochs": [h["resumed_from_epoch"] for h in history if "resumed_from_epoch" in h],
        "worker_restarts": worker_restarts,
    }
    write_json(run_dir / METRICS_FILE, metrics)
    resumed = metrics["resumed_from_epochs"]
    sampled = exp.trainer.selection.valid_users > 0 and best.get("validated_users") == exp.trainer.selection.valid_users
    plot_training_curve(history, run_dir / "training_curve.png", metric,
                        exp.trainer.selection.valid_users if sampled else 0)
    write_text(run_dir / SUMMARY_FILE, "\n".join([
        f"# train: {exp.model_name}", "",
        (f"- refit on training + validation transitions: {history[-1]['epoch']} epochs of a "
         f"{exp.trainer.optim.epochs}-epoch schedule, no validation; the last epoch is the test model" if refit
         else f"- selected epoch {best['epoch']} of {history[-1]['epoch']} on validation {metric}"),
        f"- training took {elapsed:.0f} s from first to last epoch ({metrics['train_epochs_s']:.0f} s in "
        f"training steps, the rest validation and checkpoints); this invocation {wall_s:.1f} s",
        f"- {metrics['samples_per_s']} samples/s (mean over epochs)",
        (f"- resumed from the checkpoint of epoch(s) {', '.join(map(str, resumed))}" if resumed
         else "- never resumed from a checkpoint")
        + f"; {worker_restarts} Ray Train worker restart(s) after a failure in this invocation",
        f"- {'test model (the last epoch)' if refit else 'best checkpoint'}: checkpoints/best; curve: training_curve.png", "",
        results_table({"valid": valid}) if valid else "", ""]))
    mark_complete(run_dir, "train")
    return run_dir


def run_evaluate(train_dir: Path, split_name: str = "test", parent: Path | None = None) -> tuple[Path, dict]:
    """Score the selected checkpoint of a train run on ``split_name`` over the whole catalogue."""
    train_dir = require_complete(train_dir, "train")
    saved = read_json(train_dir / CONFIG_FILE)
    exp = experiment_from_dict(experiment_dict_from_run(saved))
    split = leave_one_out(InteractionData.load(saved["data_dir"]), exp.data.max_history)
    model = load_model(train_dir / "checkpoints" / "best")
    if model.role != "retriever":  # rankers are judged on a retriever's candidates (evaluate_ranker)
        raise ValueError(f"{train_dir} holds a {model.role} ({exp.model_name}); `recsys evaluate` ranks the whole "
                         "catalogue, which only a retriever does")
    start = time.perf_counter()
    figures = evaluate(model, split.eval_set(split_name), batch_size=exp.eval.batch_size,
                       exclude_history=exp.eval.exclude_history)
    run_dir = stage_run_dir(exp.run.root, "evaluate", exp.run.name or exp.model_name, parent)
    write_json(run_dir / CONFIG_FILE, {"train_dir": str(train_dir), "split": split_name,
                                       "eval": exp.to_dict()["eval"]})
    write_json(run_dir / METRICS_FILE, {split_name: figures, "users": len(split.eval_set(split_name)),
                                         "wall_s": round(time.perf_counter() - start, 2)})
    write_text(run_dir / SUMMARY_FILE, f"# evaluate {train_dir.name} on {split_name}\n\n"
               + results_table({split_name: figures}) + "\n")
    mark_complete(run_dir, "evaluate")
    return run_dir, figures


def run_candidates(train_dir: Path, top_n: int, splits: tuple[str, ...] = SPLITS,
                   parent: Path | None = None) -> tuple[Path, dict]:
    """A trained retriever's top-N per user at each split -> ``runs/candidates/<run-id>/`` (see
    ``recsys.candidates``); returns the run and its metrics (per split: target_in_set, top_n, users)."""
    unknown = [s for s in splits if s not in SPLITS]
    if not splits or unknown:
        raise ValueError(f"--splits {','.join(splits)} is not allowed; choose from {','.join(SPLITS)}")
    train_dir = require_complete(train_dir, "train")
    saved = read_json(train_dir / CONFIG_FILE)
    exp = experiment_from_dict(experiment_dict_from_run(saved))
    model = load_model(train_dir / "checkpoints" / "best")
    if model.role != "retriever":
        raise ValueError(f"{train_dir} holds a {model.role} ({exp.model_name}); candidates come from a retriever run")
    check_top_n(top_n, model.n_items)  # before any work
    split = leave_one_out(InteractionData.load(saved["data_dir"]), exp.data.max_history)
    start = time.perf_counter()
    run_dir = stage_run_dir(exp.run.root, "candidates", exp.run.name or exp.model_name, parent)
    metrics: dict = {}
    for name in splits:
        found = retrieve(model, retriever_inputs(split, name), top_n, batch_size=exp.eval.batch_size,
                         exclude_history=exp.eval.exclude_history)
        found.save(run_dir / candidates_file(name))
        metrics[name] = candidate_metrics(found, top_n)
    write_json(run_dir / CONFIG_FILE, {"train_dir": str(train_dir), "data_dir": saved["data_dir"],
                                       "model": exp.model_name, "top_n": top_n, "splits": list(splits),
                                       "exclude_history": exp.eval.exclude_history,
                                       "max_history": exp.data.max_history})
    write_json(run_dir / METRICS_FILE, {**metrics, "wall_s": round(time.perf_counter() - start, 2)})
    write_text(run_dir / SUMMARY_FILE, "\n".join([
        f"# candidates: top {top_n} of {exp.model_name} ({train_dir.name})", "",
        "The retriever's top-N as it comes: the target is never inserted, so the share of users whose",
        "target is in the set (its recall@N) is the ceiling of any ranker's re-ranking figures.", "",
        "| split | users | target in set |", "|---|---|---|",
        *(f"| {name} | {m['users']} | {m['target_in_set']:.4f} |" for name, m in metrics.items()), ""]))
    mark_complete(run_dir, "candidates")
    return run_dir, metrics
