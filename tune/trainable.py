"""One Ray Tune trial: IDs per space (semantic from the sweep's shared embeddings, behaviour from
its shared behaviour model's item vectors), then the sequence model,
both in this trial's process, reporting validation after every validated epoch.

Why in-process and not a nested Ray Train ``TorchTrainer``: a trial is already the unit Ray
schedules, with its own CPUs (and GPU); a Train run inside it would add ~12 s of worker-group
start per trial, and when ASHA stops such a trial its placement group can be left behind
(RAY-NOTES.md, Ray Tune), which stalls the next trial. ``recsys.training`` runs the same loop
without Ray, so the trial simply calls it with an epoch hook that reports to Tune.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

import ray.tune

from pipelines.ids_stage import run_ids
from recsys.data import InteractionData
from recsys.data.split import leave_one_out
from recsys.experiment import ExperimentConfig
from recsys.models import get_spec
from recsys.runs import COMPLETE_FILE, CONFIG_FILE, write_json
from recsys.sweep import Sweep
from recsys.training.checkpoint import load_train_state
from recsys.training.session import EPOCH_LOG, model_context, train_in_process

TRIALS_DIR = "trials"  # <sweep run>/trials/<trial id>/{ids,behavior/ids,train,evaluate}/
PARAMS_FILE = "params.json"
TRIAL_LOG = "trial.log"
TRIAL_TIME = "trial_time.json"


def trial_dir_name(trial) -> str:
    """Tune's own directory for a trial is named by its id, like ours under ``trials/``."""
    return trial.trial_id


def run_trial(config: dict, state: dict) -> None:
    """Tune's function trainable. ``config``: the sampled ``{dotted key: value}``; ``state``: the
    sweep's resolved config.json (the sweep, its run directory and the shared data/embed runs)."""
    from recsys.faiss_lib import faiss
    import torch

    started = time.perf_counter()
    sweep = Sweep.from_state(state)
    params = dict(config)
    exp = sweep.trial_experiment(params)
    trial_dir = Path(state["sweep_dir"]) / TRIALS_DIR / ray.tune.get_context().get_trial_id()
    trial_dir.mkdir(parents=True, exist_ok=True)
    write_json(trial_dir / PARAMS_FILE, params)
    torch.set_num_threads(exp.trainer.resources.threads)
    faiss.omp_set_num_threads(exp.trainer.resources.threads)
    device = "cuda" if sweep.config.resources.gpu > 0 and torch.cuda.is_available() else "cpu"
    # The trial's own progress lines go to its log; the driver prints one compact line per result.
    with (trial_dir / TRIAL_LOG).open("a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        ids_dirs = {}  # the trial's own IDs per space, with its ids.* settings
        spaces = get_spec(exp.model_name).model_cls.capabilities.id_spaces
        if "semantic" in spaces:
            ids_dirs["semantic"] = ensure_ids(exp, trial_dir, embed_dir=Path(state["embed_dir"]))
        if "behavior" in spaces:  # from the sweep's one behaviour model (tune.driver.prepare_inputs)
            ids_dirs["behavior"] = ensure_ids(exp, trial_dir / "behavior", train_dir=Path(state["behavior_train_dir"]))
        train_trial(exp, Path(state["data_dir"]), ids_dirs, trial_dir, device, started)


def ensure_ids(exp: ExperimentConfig, home: Path, embed_dir: Path | None = None, train_dir: Path | None = None) -> Path:
    """The trial's IDs of one space (``home/ids``), from the shared embeddings or, with
    ``train_dir``, the shared behaviour model's item vectors: kept when a resumed trial already
    built them (its COMPLETE marker is written last), else fitted in-process."""
    ids_dir = home / "ids"
    if (ids_dir / COMPLETE_FILE).is_file():
        return ids_dir
    shutil.rmtree(ids_dir, ignore_errors=True)
    home.mkdir(parents=True, exist_ok=True)
    return run_ids(exp, embed_dir, parent=home, train_dir=train_dir)


def train_trial(exp: ExperimentConfig, data_dir: Path, ids_dirs: dict[str, Path], trial_dir: Path, device: str,
                started: float) -> None:
    """Train into ``trial_dir/train`` (a train run ``recsys evaluate`` can read), continuing from
    Tune's checkpoint when the trial is resumed; report each validated epoch with a checkpoint.
    ``trial_s`` counts this trial's seconds (IDs included) across resumes, not the time between;
    Tune's own time_total_s is not reliable when actors are reused."""
    train_dir = trial_dir / "train"
    train_dir.mkdir(exist_ok=True)
    write_json(train_dir / CONFIG_FILE, {**exp.to_dict(), "data_dir": str(data_dir),
                                         "ids_dirs": {space: str(d) for space, d in ids_dirs.items()}})
    split = leave_one_out(InteractionData.load(data_dir), exp.data.max_history)
    checkpoints, log = train_dir / "checkpoints", train_dir / EPOCH_LOG
    shutil.rmtree(checkpoints, ignore_errors=True)  # the trial restarts from Tune's checkpoint, or from scratch
    resumed = ray.tune.get_checkpoint()
    done, spent = 0, 0.0
    if resumed is not None:
        with resumed.as_directory() as src:
            shutil.copytree(src, checkpoints)
        done = load_train_state(checkpoints / "last")["loop"]["epoch"]
        spent = json.loads((checkpoints / TRIAL_TIME).read_text())["trial_s"]
    # Epochs logged after the checkpoint (the interrupted ones) are run again, so drop them.
    kept = [line for line in (log.read_text().splitlines() if log.is_file() else [])
            if json.loads(line)["epoch"] <= done]
    log.write_text("".join(line + "\n" for line in kept))
    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is None:
            return  # an epoch without validation: nothing for ASHA to compare
        trial_s = spent + time.perf_counter() - started
        write_json(checkpoint_dir / TRIAL_TIME, {"trial_s": trial_s})  # travels with the checkpoint
        result = {"epoch": metrics["epoch"], "train_loss": metrics["train_loss"],
                  **{k: v for k, v in metrics.items() if k.startswith("valid_")},
                  "best_score": metrics["best_score"], "best_epoch": metrics["best_epoch"], "trial_s": trial_s}
        ray.tune.report(result, checkpoint=ray.tune.Checkpoint.from_directory(str(checkpoint_dir)))

    context = model_context(exp, split.n_items, ids_dirs)
    train_in_process(exp, split, train_dir, resume=resumed is not None, device=device, context=context,
                     after_epoch=report)
