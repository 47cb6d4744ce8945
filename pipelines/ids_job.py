"""Ray jobs for semantic IDs.

- RQ-VAE: Ray Train ``TorchTrainer`` (DDP) fed by a Ray Data dataset read from the embedding
  run's parquet; every rank runs ``recsys.semantic_ids.rqvae_epoch`` on its shard and the
  dead-code re-seeding is synchronised across ranks.
- Hierarchical k-means: the top split runs in the driver (faiss); the independent subtrees
  below it fan out as Ray tasks, each running faiss. Subtree seeds depend only on the path,
  so the tree equals the single-process recursion.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from ray.data import ExecutionOptions
from ray.train import Checkpoint, CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2.api.config import LoggingConfig
from tqdm.auto import tqdm

from pipelines.interrupts import ctrl_c_ends_ray_training
from recsys.config import from_dict
from recsys.semantic_ids import (
    RQVAEConfig, RQVAETokenizer, load_tokenizer, reseed_dead_codes_synced, rqvae_epoch, shuffled_batches,
)
from recsys.semantic_ids.rqvae import build_optimizer as build_rqvae_optimizer
from recsys.semantic_ids.rqvae import training_generators
from recsys.semantic_ids.build import IdsConfig

EPOCH_FILE = "epoch.json"


def ray_map(num_cpus: float) -> Callable:
    """A ``map(fn, tasks)`` that runs each task as a Ray task and keeps the input order."""

    def _map(fn: Callable, tasks: Iterable) -> list:
        remote = ray.remote(num_cpus=num_cpus)(fn)
        refs = [remote.remote(task) for task in tasks]
        pending = list(refs)
        with tqdm(total=len(refs), desc="subtrees", disable=None) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                bar.update(len(done))
        return ray.get(refs)

    return _map


def _stack_vectors(batch: dict) -> dict:
    return {"item_id": batch["item_id"], "x": np.stack(batch["vector"]).astype(np.float32)}  # list<float> -> (B, D)


def local_rows(shard) -> torch.Tensor:
    """This worker's whole shard as (n, D) float32 in item-id order. Read once: an RQ-VAE's
    input (one vector per item) fits a worker, and a Ray Data pass per epoch cost more than the
    epoch's training at catalogue scale. The order makes a one-worker run equal the in-process one."""
    ids, xs = [], []
    for batch in shard.iter_batches(batch_size=8192, batch_format="numpy"):
        ids.append(batch["item_id"])
        xs.append(batch["x"])
    order = np.argsort(np.concatenate(ids), kind="stable")
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(xs)[order], dtype=np.float32))


def quiet_epochs(dataset: ray.data.Dataset) -> None:
    """Every epoch streams the shard again, through a split coordinator actor. By default that actor
    draws a Ray tqdm bar per epoch, forwarded to the driver (hundreds of lines for an RQ-VAE). Set
    on the dataset's own context, which the coordinator runs with: without Ray tqdm it logs its
    progress at INFO, below RAY_DATA_LOG_LEVEL=WARNING. (Turning progress bars off instead makes
    Ray Data warn that they are off.)"""
    dataset.context.use_ray_tqdm = False


def rqvae_loop_per_worker(config: dict) -> None:
    logging.getLogger().setLevel(logging.WARNING)
    cfg = from_dict(RQVAEConfig, config["rqvae"])
    rank = ray.train.get_context().get_world_rank()
    tokenizer, start = RQVAETokenizer(config=cfg), 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            tokenizer = load_tokenizer(directory)
            start = json.loads((Path(directory) / EPOCH_FILE).read_text())["epoch"]
        model = tokenizer.model
    else:  # the driver's initialised network (seeded weights, k-means codebooks), as in-process
        model = tokenizer.build_model(config["input_dim"])
        model.load_state_dict(ray.get(config["initial_state"]))
    ddp = ray.train.torch.prepare_model(model)  # DDP broadcasts rank 0's weights
    optimizer = build_rqvae_optimizer(ddp, cfg)
    shuffle, reseed = training_generators(cfg.seed, start, rank)  # reseed: the same on every rank
    x = local_rows(ray.train.get_dataset_shard("train"))  # (n, D)
    for epoch in range(start, cfg.epochs):
        stats = rqvae_epoch(ddp, optimizer, shuffled_batches(x, cfg.batch_size, shuffle), dead_code_threshold=0)
        reseeded = reseed_dead_codes_synced(ddp, optimizer, stats, cfg.dead_code_threshold, reseed)
        metrics = {"epoch": epoch + 1, "loss": stats.loss, "reconstruction_loss": stats.reconstruction_loss,
                   "quantize_loss": stats.quantize_loss, "reseeded": int(reseeded.sum())}
        if (epoch + 1) % config["checkpoint_every"] and epoch + 1 != cfg.epochs:
            ray.train.report(metrics)
            continue
        if rank == 0:
            print(f"rqvae epoch {epoch + 1}/{cfg.epochs}  loss {stats.loss:.4f}  "
                  f"reconstruction {stats.reconstruction_loss:.4f}  reseeded {int(reseeded.sum())}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                tokenizer.save(tmp)
                (Path(tmp) / EPOCH_FILE).write_text(json.dumps({"epoch": epoch + 1}))
                ckpt = Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)


def fit_rqvae_with_ray(cfg: IdsConfig, embeddings_path: Path, embeddings: np.ndarray, run_dir: Path) -> RQVAETokenizer:
    """Train the RQ-VAE with Ray Train over the Ray Data embeddings; return the final tokenizer."""
    rq = cfg.rqvae
    initial = RQVAETokenizer(config=rq).initialise(embeddings)  # as RQVAETokenizer.fit starts
    # Materialised before fit(): once the Train workers hold every CPU (2 workers x 1 CPU on a
    # 2-CPU node) Ray Data's read/map tasks could never be scheduled and the run would hang.
    dataset = ray.data.read_parquet(str(embeddings_path)).map_batches(_stack_vectors, batch_format="numpy")
    dataset = dataset.materialize()
    quiet_epochs(dataset)  # each worker reads its shard once (local_rows)
    trainer = TorchTrainer(
        rqvae_loop_per_worker,
        train_loop_config={"rqvae": dataclasses.asdict(rq), "input_dim": embeddings.shape[1],
                           "initial_state": ray.put(initial.state_dict()), "checkpoint_every": cfg.checkpoint_every},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, resources_per_worker={"CPU": cfg.cpus_per_task}),
        run_config=RunConfig(name="ray-train", storage_path=str(run_dir.resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             logging_config=LoggingConfig(log_level="WARNING")),
        datasets={"train": dataset},
        # Our own options, not Ray Train's default ingest options: those copy the deprecated
        # ``exclude_resources`` into new ExecutionOptions, and Ray Data warns about it in every fit.
        dataset_config=DataConfig(execution_options=ExecutionOptions(verbose_progress=False)),
    )
    with ctrl_c_ends_ray_training():  # Ctrl-C: `recsys ids: interrupted`, status 130
        result = trainer.fit()
    if result.error:
        raise RuntimeError(f"RQ-VAE training failed: {result.error}") from result.error
    with result.checkpoint.as_directory() as directory:
        return load_tokenizer(directory)
