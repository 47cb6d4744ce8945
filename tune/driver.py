"""``recsys tune``: a Ray Tune sweep over an experiment's dotted keys, scored on validation.

    embed once ──► Tuner(trial × N, ASHA) ──► rank on validation ──► test the winner once
                   each trial: semantic IDs + train, in-process (tune/trainable.py)

Writes ``<run.root>/tune/<run-id>/``: config.json (the resolved sweep), results.csv / results.md,
metric_vs_<param>.png (and metric_grid.png for a sweep over two grids), winner.yaml, winner_test.json,
summary.md, trials/<trial id>/ (ids, train, and the winner's evaluate), and tune/ (Ray Tune's
experiment, for --resume).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import ray.tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator

from pipelines.ids_stage import trained_item_vectors
from pipelines.stages import finish_train, run_data, run_embed_stage, run_evaluate, run_train
from recsys.experiment import ExperimentConfig, behavior_experiment
from recsys.models import get_spec
from recsys.reporting import results_table
from recsys.runs import (
    CONFIG_FILE, SUMMARY_FILE, clear_complete, mark_complete, new_run_dir, read_json, require_complete, write_json, write_text,
)
from recsys.sweep import ParamSpec, Sweep
from recsys.sweep_report import (
    ASHA, TrialRecord, base_point, gain_over_base, plot_metric_grid, plot_metric_vs_params, rank_trials, trial_status,
    write_results, write_winner_config,
)
from recsys.training.session import EPOCH_LOG
from tune.progress import CtrlC, ProgressLines, ctrl_c_stops_the_sweep
from tune.trainable import TRIALS_DIR, run_trial, trial_dir_name

TUNE_DIR = "tune"  # Ray Tune's experiment directory inside the sweep run


# Tune snapshots the experiment state whenever a trial checkpoints (num_to_keep is set), which is
# what makes --resume exact; with epochs of seconds it warns that this is frequent. It is intended.
# Ctrl-C: Tune's own handler stops the run gracefully and returns normally, with the interrupted
# trials marked TERMINATED in memory and the trials not yet generated missing from the results, so
# the sweep cannot tell that it was cut short. Without the handler Ctrl-C raises KeyboardInterrupt
# out of fit(); the state on disk is Tune's last snapshot, taken at every trial checkpoint.
TUNE_ENV = {"TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
                  "TUNE_DISABLE_SIGINT_HANDLER": "1",
                  "RAY_AIR_NEW_OUTPUT": "0"}  # with verbose=0: no banner; ProgressLines prints instead


class SweepInterrupted(RuntimeError):
    """The sweep stopped before every trial ended (Ctrl-C): nothing is ranked; ``--resume`` continues."""


def domain(spec: ParamSpec):
    if spec.kind == "grid":
        return ray.tune.grid_search(list(spec.values))
    if spec.kind == "choice":
        return ray.tune.choice(list(spec.values))
    low, high = spec.values
    if spec.kind == "randint":
        return ray.tune.randint(int(low), int(high))
    return (ray.tune.loguniform if spec.kind == "loguniform" else ray.tune.uniform)(low, high)


def set_tune_env() -> None:
    for key, value in TUNE_ENV.items():
        os.environ.setdefault(key, value)


def trainable(state: dict):
    resources = state["sweep"]["resources"]
    return ray.tune.with_resources(ray.tune.with_parameters(run_trial, state=state),
                                   {"cpu": resources["cpu"], "gpu": resources["gpu"]})


def prepare_inputs(sweep: Sweep, sweep_dir: Path, embed_dir: Path | None, data_dir: Path | None,
                   behavior_dir: Path | None = None) -> dict:
    """The data (and, for semantic-ID models, the embeddings; for a behavior space, the behaviour
    model of ``behavior.config``, or the train run ``behavior_dir`` of such a model on the same data
    run) every trial shares, made once."""
    exp = sweep.base_experiment()
    if get_spec(exp.model_name).model_cls.role != "retriever":
        raise ValueError(f"model.name={exp.model_name!r} is a {get_spec(exp.model_name).model_cls.role}; a sweep "
                         "trains and selects retrievers (a ranker needs a retriever's candidate sets)")
    spaces = get_spec(exp.model_name).model_cls.capabilities.id_spaces
    if set(spaces) - {"semantic", "behavior"}:
        raise ValueError(f"model.name={exp.model_name!r} decodes the ID spaces {list(spaces)}; a sweep fits the semantic "
                         "and behavior spaces only, so it cannot tune this model yet")
    if behavior_dir is not None and "behavior" not in spaces:
        raise ValueError(f"--behavior is for models with a behavior ID space, not model.name={exp.model_name!r}")
    if behavior_dir is not None:
        behavior_dir = Path(behavior_dir).resolve()
        trained_item_vectors(behavior_dir)  # checked before any work: complete, not a refit, has item vectors
    elif "behavior" in spaces:
        behavior_experiment(exp)  # checked before any work
    inputs = shared_data_and_embeddings(exp, spaces, sweep_dir, embed_dir, data_dir)
    if behavior_dir is not None:
        trained_on = Path(read_json(behavior_dir / CONFIG_FILE)["data_dir"]).resolve()
        if trained_on != Path(inputs["data_dir"]).resolve():
            raise ValueError(f"--behavior {behavior_dir} was trained on the data run {trained_on}, not on the sweep's "
                             f"{inputs['data_dir']}: its item vectors belong to another catalogue")
        inputs["behavior_train_dir"] = str(behavior_dir)
    elif "behavior" in spaces:  # one behaviour model for every trial; each trial clusters its vectors
        home = sweep_dir / "behavior"
        home.mkdir()
        inputs["behavior_train_dir"] = str(run_train(behavior_experiment(exp), data_dir=Path(inputs["data_dir"]),
                                                     parent=home))
    return inputs


def shared_data_and_embeddings(exp: ExperimentConfig, spaces: tuple[str, ...], sweep_dir: Path,
                               embed_dir: Path | None, data_dir: Path | None) -> dict:
    if "semantic" not in spaces:
        if embed_dir:
            raise ValueError(f"--embed is for models with semantic IDs, not model.name={exp.model_name!r}")
        return {"data_dir": str(require_complete(data_dir, "data") if data_dir else run_data(exp, sweep_dir)),
                "embed_dir": None}
    if embed_dir:
        embed_dir = require_complete(embed_dir, "embed")
        embedded_from = Path(read_json(embed_dir / CONFIG_FILE)["data_dir"])
        if data_dir and Path(data_dir).resolve() != embedded_from:
            raise ValueError(f"--embed {embed_dir} embeds the data run {embedded_from}, not --data {data_dir}")
        return {"data_dir": str(embedded_from), "embed_dir": str(embed_dir)}
    embed_dir = run_embed_stage(exp, data_dir, parent=sweep_dir)
    return {"data_dir": read_json(embed_dir / CONFIG_FILE)["data_dir"], "embed_dir": str(embed_dir)}


def run_sweep(sweep: Sweep, embed_dir: Path | None = None, data_dir: Path | None = None,
              behavior_dir: Path | None = None) -> Path:
    """Run a new sweep into ``<run.root>/tune/<run-id>/`` and return that directory."""
    from pipelines.ray_env import init_ray

    sweep_dir = new_run_dir(sweep.base_experiment().run.root, "tune", sweep.config.name)
    print(f"sweep run: {sweep_dir} ({sweep.config.n_trials} trials)", flush=True)
    state = {**sweep.to_dict(), "sweep_dir": str(sweep_dir), **prepare_inputs(sweep, sweep_dir, embed_dir, data_dir, behavior_dir)}
    write_json(sweep_dir / CONFIG_FILE, state)
    set_tune_env()
    init_ray()
    cfg = sweep.config
    epochs = sweep.base_experiment().trainer.optim.last_epoch  # a base stop_epoch ends every trial there
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=cfg.scheduler.grace_period,
                               reduction_factor=cfg.scheduler.reduction_factor)
                 if cfg.scheduler.name == "asha" else FIFOScheduler())
    tuner = ray.tune.Tuner(
        trainable(state),
        param_space={s.key: domain(s) for s in cfg.specs},
        tune_config=ray.tune.TuneConfig(
            metric=f"valid_{cfg.metric}", mode="max", num_samples=cfg.num_samples, scheduler=scheduler,
            # the generator bounds concurrency itself (Tune ignores max_concurrent_trials beside it)
            search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=cfg.max_concurrent_trials),
            trial_dirname_creator=trial_dir_name, reuse_actors=True),  # no process start per trial
        run_config=ray.tune.RunConfig(
            name=TUNE_DIR, storage_path=str(sweep_dir), verbose=0,
            callbacks=[ProgressLines(cfg.metric, epochs, cfg.n_trials, [s.key for s in cfg.specs]), CtrlC()],
            checkpoint_config=ray.tune.CheckpointConfig(num_to_keep=1)))
    return finish_sweep(sweep, sweep_dir, fit(tuner, sweep_dir))


def fit(tuner: ray.tune.Tuner, sweep_dir: Path):
    try:
        with ctrl_c_stops_the_sweep():
            return tuner.fit()
    except KeyboardInterrupt:
        raise SweepInterrupted(f"interrupted; continue the sweep with: recsys tune --resume {sweep_dir}") from None


def resume_sweep(sweep_dir: Path) -> Path:
    """Continue an interrupted sweep: finished trials are kept, unfinished and errored ones
    continue from their last checkpoint; then the results are written as for a new sweep."""
    from pipelines.ray_env import init_ray

    sweep_dir = Path(sweep_dir).resolve()
    state = read_json(sweep_dir / CONFIG_FILE)
    experiment = sweep_dir / TUNE_DIR
    if not ray.tune.Tuner.can_restore(str(experiment)):
        raise FileNotFoundError(f"{experiment} holds no Ray Tune experiment to resume")
    require_search_state(experiment)
    sweep = Sweep.from_state(state)
    print(f"resuming sweep run: {sweep_dir}", flush=True)
    clear_complete(sweep_dir)  # incomplete until its results are written again
    set_tune_env()
    init_ray()
    tuner = ray.tune.Tuner.restore(str(experiment), trainable(state), resume_unfinished=True, resume_errored=True)
    return finish_sweep(sweep, sweep_dir, fit(tuner, sweep_dir))


LIVE_STATUSES = {"PENDING", "RUNNING", "PAUSED"}  # a trial the search algorithm still counts as live


def require_search_state(experiment: Path) -> None:
    """Refuse to resume from a torn or stale search-algorithm state. Tune writes the trials' state
    and the search algorithm's state together, then copies both files into the experiment one after
    the other, non-atomically. A driver killed mid-copy leaves the search state empty (Tune's restore
    then logs an error and restarts the experiment, training the finished trials again), or older
    than the trials' state: it still counts a finished trial as running, and with
    ``max_concurrent_trials`` the resumed sweep then waits for it forever (Tune gives up after
    600 s), or it generates again a trial that the trials' state already holds."""
    import ray.cloudpickle as cloudpickle

    newest = None
    for path in sorted(experiment.glob("basic-variant-state-*.json")):
        try:
            newest = path, cloudpickle.loads(path.read_bytes())
        except (EOFError, ValueError, cloudpickle.pickle.UnpicklingError) as err:
            raise ValueError(
                f"{path} (the sweep's search state) is unreadable ({type(err).__name__}): the sweep was "
                "probably killed while Ray Tune saved it. Resuming would restart the sweep and train its "
                "finished trials again, so nothing was resumed; the trials' own runs under "
                f"{experiment.parent / TRIALS_DIR} are intact. Start the sweep again as a new run.") from None
    trials = sorted(experiment.glob("experiment_state-*.json"))
    if newest is None or not trials:
        return
    path, search = newest
    try:
        states = [json.loads(trial) for trial, _ in json.loads(trials[-1].read_text())["trial_data"]]
    except (ValueError, KeyError) as err:
        raise ValueError(f"{trials[-1]} (the sweep's trials' state) is unreadable ({type(err).__name__}): the "
                         "sweep was probably killed while Ray Tune saved it; nothing was resumed. Start the sweep "
                         "again as a new run.") from None
    expected = {state["trial_id"] for state in states if state["status"] in LIVE_STATUSES}
    counted = set(search.get("_live_trials", ()))
    if counted != expected:
        raise ValueError(
            f"{path} (the sweep's search state) is older than {trials[-1].name} (its trials' state): it counts "
            f"{sorted(counted)} as running, the trials' state {sorted(expected)}. The sweep was probably killed "
            "while Ray Tune copied the two; resuming would wait for a trial that has ended, or run one twice, "
            f"so nothing was resumed; the trials' own runs under {experiment.parent / TRIALS_DIR} are intact. "
            "Start the sweep again as a new run.")


def trial_record(sweep: Sweep, sweep_dir: Path, result) -> TrialRecord:
    """A Tune result + the trial's own train run -> its record (writes the train run's metrics,
    curve and summary, as `recsys train` would)."""
    # Tune names a trial's directory by its id, but renames one that restarts from scratch after
    # a resume (``<id>_ab12``); the id itself is stable.
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
    trial_dir = sweep_dir / TRIALS_DIR / trial_id
    params = {s.key: result.config.get(s.key) for s in sweep.config.specs}
    exp = sweep.trial_experiment(params)
    error = f"{type(result.error).__name__}: {result.error}".splitlines()[0] if result.error else ""
    wall = float((result.metrics or {}).get("trial_s", 0.0))
    record = TrialRecord(trial_id=trial_id, params=params, wall_s=wall, trial_dir=str(trial_dir), error=error)
    log = trial_dir / "train" / EPOCH_LOG
    history = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    if any(f"valid_{sweep.config.metric}" in h for h in history):
        metrics = read_json(finish_train(exp, trial_dir / "train", history, wall) / "metrics.json")
        record.valid, record.best_epoch = metrics["valid"], metrics["best_epoch"]
        record.epochs_run = metrics["epochs_run"]
    record.status = trial_status(record.epochs_run, exp.trainer.optim.last_epoch, record.best_epoch,
                                 exp.trainer.selection.patience, error)
    return record


def finish_sweep(sweep: Sweep, sweep_dir: Path, grid) -> Path:
    """Rank on validation, test the winner once, and write the tables, plots and winner config."""
    cfg = sweep.config
    # Never rank a partial sweep: it would pick a winner among unfinished trials.
    unfinished = cfg.n_trials - grid.num_terminated - grid.num_errors
    if unfinished:
        raise SweepInterrupted(f"the sweep stopped with {unfinished} of {cfg.n_trials} trials unfinished; "
                               f"continue it with: recsys tune --resume {sweep_dir}")
    ranked = rank_trials([trial_record(sweep, sweep_dir, r) for r in grid], cfg.metric)
    winner = ranked[0] if ranked else None
    if winner is None or math.isnan(winner.score(cfg.metric)):
        errors = "; ".join(f"{r.trial_id}: {r.error}" for r in ranked if r.error)[:2000]
        raise RuntimeError(f"no trial of {sweep_dir} reported a validation {cfg.metric}"
                           + (f" ({errors})" if errors else ""))
    winner_dir = Path(winner.trial_dir)
    shutil.rmtree(winner_dir / "evaluate", ignore_errors=True)  # a resumed sweep evaluates again
    _, test = run_evaluate(winner_dir / "train", "test", parent=winner_dir)
    defaults = sweep.base_values()
    base_record, gain_line = gain_over_base(winner, base_point(ranked, cfg, defaults), cfg, defaults)
    write_json(sweep_dir / "winner_test.json", {"trial_id": winner.trial_id, "params": winner.params,
                                                 "best_epoch": winner.best_epoch, "valid": winner.valid, "test": test,
                                                 "train_dir": str(winner_dir / "train"), "base_point": base_record})
    _, _, table = write_results(ranked, cfg, sweep_dir, test)
    grid_plot = plot_metric_grid(ranked, cfg, sweep_dir)
    plots = plot_metric_vs_params(ranked, cfg, sweep_dir) + ([grid_plot] if grid_plot is not None else [])
    winner_yaml = sweep_dir / "winner.yaml"
    shown = ", ".join(f"{k}={v!r}" for k, v in winner.params.items())
    write_winner_config(winner_yaml, sweep.winner_experiment(winner.params), [
        f"Winner of the sweep {sweep_dir} (trial {winner.trial_id}): {shown}",
        f"validation {cfg.metric} {winner.score(cfg.metric):.4f} at epoch {winner.best_epoch}; "
        f"test {cfg.metric} {test[cfg.metric]:.4f} (winner_test.json)",
        f"Run it: recsys pipeline {winner_yaml}"])
    stopped = sum(r.status == ASHA for r in ranked)
    summary = "\n".join([
        f"# sweep: {cfg.name or sweep.source or 'tune'}", "",
        f"- {len(ranked)} trials, {stopped} stopped early by ASHA; ranked on validation {cfg.metric}",
        f"- winner: trial {winner.trial_id} ({shown}), selected epoch {winner.best_epoch}",
        f"- {gain_line}", "",
        results_table({"valid (winner)": winner.valid, "test (winner only)": test}), "",
        "## all trials", "", table, "",
        "- results.csv, results.md; winner.yaml (`recsys pipeline winner.yaml`); winner_test.json",
        "- plots: " + ", ".join(p.name for p in plots),
        f"- resume or re-collect: `recsys tune --resume {sweep_dir}`", ""])
    write_text(sweep_dir / SUMMARY_FILE, summary)
    mark_complete(sweep_dir, "tune")
    print(f"\n{table}\n\nwinner: trial {winner.trial_id} ({shown})\n{gain_line}\n"
          f"{results_table({'valid': winner.valid, 'test': test})}\n\nwinner config: {winner_yaml}\n"
          f"sweep run: {sweep_dir}", flush=True)
    return sweep_dir
