"""Ray Train job: fit a sequence model with TorchTrainer (DDP across workers).

Each worker runs ``recsys.training`` unchanged; this file adds only the distribution:
the data split travels through the object store, ``prepare_model`` wraps DDP, and every
validated epoch is reported with a checkpoint that rank 0 writes. When a worker dies, Ray Train
(``FailureConfig``) restarts the worker group up to ``trainer.resources.max_failures`` times and the loop
continues from the latest checkpoint; a small actor counts those starts for the run's metrics.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import ray.train.torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2.api.config import LoggingConfig

from pipelines.interrupts import ctrl_c_ends_ray_training
from recsys.experiment import ExperimentConfig, experiment_from_dict
from recsys.runs import atomic_directory
from recsys.training.checkpoint import load_train_state
from recsys.training.loop import Trainer
from recsys.training.session import build_trainer, restore, save_trainer_checkpoint

RAY_RUN_NAME = "ray-train"


@ray.remote(num_cpus=0)
class StartLog:
    """Rank 0 records each start of the worker group: the epoch it restored, or None (from scratch)."""

    def __init__(self):
        self.starts: list[int | None] = []

    def add(self, restored_epoch: int | None) -> None:
        self.starts.append(restored_epoch)

    def get(self) -> list[int | None]:
        return self.starts


@dataclass
class RayFit:
    history: list[dict]  # per epoch, from the final checkpoint
    starts: list[int | None]  # per worker-group start in this fit: the epoch restored, or None

    @property
    def worker_restarts(self) -> int:
        """Restarts after a failure; the first start is the fit itself (from scratch or a resume)."""
        return len(self.starts) - 1


def train_loop_per_worker(config: dict) -> None:
    # Some Ray Train internals log each report at INFO through loggers outside ``ray.train``.
    logging.getLogger().setLevel(logging.WARNING)
    exp = experiment_from_dict(config["experiment"])
    split = ray.get(config["split"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    trainer = build_trainer(exp, split, device=ray.train.torch.get_device(), context=ray.get(config["context"]),
                            wrap=ray.train.torch.prepare_model, rank=rank, world_size=world)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            restore(trainer, directory)
    if rank == 0:
        ray.get(config["start_log"].add.remote(trainer.resumed_from))

    def on_epoch_end(metrics: dict, improved: bool, trainer: Trainer) -> None:
        if not exp.trainer.selection.refit and f"valid_{exp.trainer.selection.select_metric}" not in metrics:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_trainer_checkpoint(tmp, trainer, exp.model_name)
                ckpt = Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)

    trainer.fit(on_epoch_end)


def fit_with_ray(exp: ExperimentConfig, split, run_dir: Path, context: dict | None = None) -> RayFit:
    """Run TorchTrainer; copy the best checkpoint (on validation) to ``run_dir/checkpoints/best``,
    or a refit's (``trainer.selection.refit``) last one.

    Re-running with the same ``run_dir`` resumes from the latest checkpoint (Ray Train V2
    restores a run whose name and storage path match). Returns the per-epoch history and the
    worker-group starts (restarts after failures included).
    """
    cfg = exp.trainer
    # a refit keeps its latest checkpoints
    score = None if cfg.selection.refit else f"valid_{cfg.selection.select_metric}"
    start_log = StartLog.remote()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": exp.to_dict(), "split": ray.put(split), "context": ray.put(context or {}),
                           "start_log": start_log},
        scaling_config=ScalingConfig(num_workers=cfg.resources.num_workers, use_gpu=cfg.resources.use_gpu,
                                     resources_per_worker={"CPU": cfg.resources.cpus_per_worker}),
        run_config=RunConfig(
            name=RAY_RUN_NAME,
            storage_path=str(run_dir.resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.resources.keep_checkpoints,
                                               checkpoint_score_attribute=score, checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.resources.max_failures),
            # Ray Train logs every report and checkpoint at INFO; our loop prints one line per epoch.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    with ctrl_c_ends_ray_training():  # Ctrl-C: `recsys train: interrupted` and the resume hint, status 130
        result = trainer.fit()
    if result.error:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    best = result.checkpoint if cfg.selection.refit else result.get_best_checkpoint(metric=score, mode="max")
    with best.as_directory() as directory, atomic_directory(run_dir / "checkpoints" / "best") as tmp:
        shutil.copytree(directory, tmp, dirs_exist_ok=True)
    with result.checkpoint.as_directory() as directory:
        history = load_train_state(directory)["loop"]["history"]
    return RayFit(history, ray.get(start_log.get.remote()))
