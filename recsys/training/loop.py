"""The training loop, independent of Ray: build_* helpers, train_step, evaluate, fit.

Ray Train (``pipelines/train_job.py``) runs ``Trainer.fit`` inside each worker and reports
through the ``on_epoch_end`` hook; tests and GPU benchmarks run the same code in-process.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from recsys import hardware
from recsys.data.split import LeaveOneOutSplit, training_windows, user_folds
from recsys.models import Batch, SequenceModel
from recsys.training.config import EvalConfig, TrainerConfig
from recsys.training.batching import epoch_batches
from recsys.training.evaluate import evaluate


@dataclass
class LoopState:
    epoch: int = 0  # epochs completed
    step: int = 0
    best_score: float = -1.0
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)

    @property
    def epochs_since_best(self) -> int:
        return self.epoch - self.best_epoch


# on_epoch_end(metrics, improved, trainer): persist or report; called on every rank
EpochHook = Callable[[dict, bool, "Trainer"], None]


def build_optimizer(model: nn.Module, cfg: TrainerConfig) -> torch.optim.Optimizer:
    """AdamW, fused: one kernel per parameter instead of about ten ops. On a CPU torch's default is the
    per-tensor Python loop, which was ~7 % of a bf16 EAGER step on 2 cores; fused takes a third
    to a tenth of its time (docs/experiments/precision.md)."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                             betas=(0.9, 0.98), fused=True)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainerConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < cfg.optim.warmup_steps:
            return (step + 1) / cfg.optim.warmup_steps
        if cfg.optim.schedule == "constant":
            return 1.0
        if cfg.optim.schedule == "inverse_sqrt":  # T5 / the TIGER paper: lr * sqrt(warmup / step) after warmup
            return math.sqrt(max(1, cfg.optim.warmup_steps) / (step + 1))
        progress = min(1.0, (step - cfg.optim.warmup_steps) / max(1, total_steps - cfg.optim.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def format_epoch(metrics: dict, cfg: TrainerConfig) -> str:
    """One progress line per epoch, e.g. ``epoch 3/200  loss 8.91  valid ndcg@10 0.0312 (best 0.0312 @ 3)``."""
    line = f"epoch {metrics['epoch']}/{cfg.optim.epochs}  loss {metrics['train_loss']:.4f}  {metrics['epoch_s']:.1f}s"
    key = f"valid_{cfg.selection.select_metric}"
    if key in metrics:
        line += (f"  valid {cfg.selection.select_metric} {metrics[key]:.4f}"
                 f" (best {metrics['best_score']:.4f} @ {metrics['best_epoch']})")
    return line


class WeightAverage:
    """An exponential moving average of a model's floating-point parameters.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so early
    averages are not dominated by the random initialisation. ``swapped_in`` puts the average
    into the model (for validation and checkpoints) and the training weights back afterwards.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.params = {n: p for n, p in model.named_parameters() if p.dtype.is_floating_point}
        self.average = {n: p.detach().clone() for n, p in self.params.items()}
        self.training_weights: dict[str, torch.Tensor] | None = None  # set while the average is swapped in

    @torch.no_grad()
    def update(self) -> None:
        if self.training_weights is not None:
            raise RuntimeError("WeightAverage.update while the average is swapped in")
        weight = 1.0 - min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for name, param in self.params.items():
            self.average[name].lerp_(param.detach(), weight)

    @contextmanager
    def swapped_in(self):
        with torch.no_grad():
            self.training_weights = {n: p.detach().clone() for n, p in self.params.items()}
            for name, param in self.params.items():
                param.copy_(self.average[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(self.training_weights[name])
            self.training_weights = None

    def state_dict(self) -> dict:
        current = self.training_weights or {n: p.detach() for n, p in self.params.items()}
        return {"updates": self.updates, "average": {n: t.clone() for n, t in self.average.items()},
                "training_weights": {n: t.clone() for n, t in current.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore the average and the weights training continues from (a checkpoint's model file
        holds the average, so the training weights come from here)."""
        missing = set(self.params) - set(state["average"])
        if missing:
            raise ValueError(f"the checkpoint's weight average lacks {sorted(missing)[:3]}")
        self.updates = int(state["updates"])
        for name, param in self.params.items():
            self.average[name].copy_(state["average"][name])
            param.copy_(state["training_weights"][name])


class Trainer:
    """Owns model, optimizer and loop state. ``train_model`` may be a DDP wrapper of ``model``.

    With ``cfg.optim.ema`` > 0, validation, selection and checkpoints use the weight average;
    training continues from the training weights."""

    def __init__(self, model: SequenceModel, split: LeaveOneOutSplit, cfg: TrainerConfig, eval_cfg: EvalConfig, *,
                 device: torch.device | str = "cpu", train_model: nn.Module | None = None,
                 rank: int = 0, world_size: int = 1):
        self.model, self.split, self.cfg, self.eval_cfg = model, split, cfg, eval_cfg
        self.train_model = train_model or model
        self.device, self.rank, self.world_size = torch.device(device), rank, world_size
        self.precision = hardware.resolve_precision(cfg.data.precision, self.device.type)  # auto -> fp32 | bf16
        if self.precision == "bf16" and self.device.type == "cpu" and hardware.cpu_supports_bf16() is False \
                and rank == 0:
            warnings.warn(hardware.emulated_bf16_warning("trainer.data.precision"), RuntimeWarning, stacklevel=2)
        train = split.training_with_validation() if cfg.selection.refit else split.train
        times = None  # the event times, for models that read them (and data that has them)
        if model.capabilities.reads_timestamps:
            times = split.training_with_validation_times() if cfg.selection.refit else split.train_times
        train_users = split.train_users
        # each user's last training transitions that a ranker trains on are never targets here: the
        # holdout's one (s[n-3]), or drop_last_transitions of them (the two exclude each other)
        cut = 1 if cfg.data.ranker_holdout else cfg.data.drop_last_transitions
        if cut:
            train = [s[:max(0, len(s) - cut)] for s in train]
            times = None if times is None else [t[:max(0, len(t) - cut)] for t in times]
        if cfg.data.folds:  # one fold's users are left out: their transitions are a ranker's examples
            kept = np.flatnonzero(user_folds(train_users, cfg.data.folds) != cfg.data.fold)
            train, train_users = [train[i] for i in kept], train_users[kept]
            times = None if times is None else [times[i] for i in kept]
        if model.timestamps_required and times is None:  # before any step, not at the first batch
            raise ValueError(f"{type(model).__name__} is configured to require event times (e.g. HSTU's "
                             "model.time_bias=on), but the data has no timestamps (Beauty's S3-Rec files carry "
                             "none); use data with timestamps, or a setting that does not read them "
                             "(model.time_bias=auto or off)")
        windows = training_windows(train, model.max_len, cfg.data.samples, times=times)
        self.inputs, self.targets, self.users = windows.inputs, windows.targets, train_users[windows.rows]
        self.times, self.target_times = windows.times, windows.target_times  # None without timestamps
        if len(self.inputs) < world_size:
            raise ValueError(f"only {len(self.inputs)} training windows for {world_size} workers")
        self.steps_per_epoch = math.ceil(len(self.inputs) // world_size / cfg.optim.batch_size)
        self.optimizer = build_optimizer(self.train_model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps_per_epoch * cfg.optim.epochs)
        self.state = LoopState()
        self.average = WeightAverage(model, cfg.optim.ema) if cfg.optim.ema > 0 else None
        self.resumed_from: int | None = None  # the checkpoint's epoch, set by load_state_dict
        seed = cfg.data.seed if cfg.selection.valid_seed is None else cfg.selection.valid_seed
        self.valid_set = split.valid.sample(cfg.selection.valid_users, seed)  # the same users every epoch

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One optimiser step; returns the loss and its named parts, e.g. {"loss": .., "ce": ..}."""
        batch = batch.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.train_model(batch)
        self.optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        if self.cfg.optim.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.train_model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.average is not None:
            self.average.update()
        self.state.step += 1
        return {"loss": out.total.item(), **{name: float(part) for name, part in out.parts.items()}}

    def train_epoch(self, epoch: int) -> dict:
        """Trains one epoch. Returns ``train_loss``, ``train_<part>`` for each named loss part
        (means over the epoch's steps), ``epoch_s`` and ``samples_per_s``."""
        self.train_model.train()
        start, losses, rows = time.perf_counter(), [], 0
        batches = epoch_batches(self.inputs, self.targets, self.cfg.optim.batch_size, self.cfg.data.seed, epoch,
                                self.rank, self.world_size, bucket=self.cfg.data.bucket, users=self.users,
                                timestamps=self.times, target_times=self.target_times)
        bar = tqdm(batches, total=self.steps_per_epoch, desc=f"epoch {epoch + 1}", leave=False,
                   disable=None if self.rank == 0 else True)
        for batch in bar:
            losses.append(self.train_step(batch))
            rows += len(batch.history)
            bar.set_postfix(loss=f"{losses[-1]['loss']:.4f}", refresh=False)
        seconds = time.perf_counter() - start
        means = {f"train_{name}": float(np.mean([step[name] for step in losses])) for name in losses[0]}
        return {**means, "epoch_s": seconds, "samples_per_s": rows * self.world_size / seconds}

    def validate(self) -> dict[str, float]:
        return evaluate(self.model, self.valid_set, batch_size=self.eval_cfg.batch_size,
                        exclude_history=self.eval_cfg.exclude_history, device=self.device,
                        rank=self.rank, world_size=self.world_size)

    @property
    def last_epoch(self) -> int:
        return self.cfg.optim.last_epoch

    def fit(self, on_epoch_end: EpochHook) -> LoopState:
        """Train from ``state.epoch`` until ``cfg.optim.stop_epoch`` (or ``cfg.optim.epochs``) or early stopping
        on validation. A refit (``cfg.selection.refit``) never validates; each epoch counts as the selected one."""
        cfg = self.cfg
        while self.state.epoch < self.last_epoch:
            metrics = {"epoch": self.state.epoch + 1, **self.train_epoch(self.state.epoch)}
            if self.resumed_from is not None:  # the first epoch after a restore says where it came from
                metrics["resumed_from_epoch"], self.resumed_from = self.resumed_from, None
            self.state.epoch += 1
            improved = False
            # the weights validated and saved: the average when cfg.optim.ema > 0
            with self.average.swapped_in() if self.average is not None else nullcontext():
                if cfg.selection.refit:  # the validation targets are training targets here: nothing to select on
                    improved, self.state.best_epoch = True, self.state.epoch
                elif self.state.epoch % cfg.selection.eval_every == 0 or self.state.epoch == self.last_epoch:
                    valid = self.validate()
                    metrics.update({f"valid_{k}": v for k, v in valid.items()}, validated_users=len(self.valid_set))
                    score = valid[cfg.selection.select_metric]
                    improved = score > self.state.best_score
                    if improved:
                        self.state.best_score, self.state.best_epoch = score, self.state.epoch
                metrics.update(best_epoch=self.state.best_epoch, best_score=self.state.best_score,
                               finished_at=time.time())
                self.state.history.append(metrics)
                on_epoch_end(metrics, improved, self)
            if self.rank == 0:
                print(format_epoch(metrics, cfg), flush=True)
            # Stop only after a validated epoch, so the last checkpoint always holds the full history.
            if "best_score" in metrics and f"valid_{cfg.selection.select_metric}" in metrics \
                    and cfg.selection.patience and self.state.epochs_since_best >= cfg.selection.patience:
                break
        return self.state

    def state_dict(self) -> dict:
        # The torch RNG (dropout) too, so a resumed run draws what an uninterrupted one would; the
        # batch order needs nothing saved: it is seeded by (seed, epoch).
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "loop": asdict(self.state), "rng": torch.get_rng_state()}
        if self.average is not None:
            state["weight_average"] = self.average.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.state = LoopState(**state["loop"])
        if "rng" in state:  # absent in checkpoints written before it was saved
            torch.set_rng_state(state["rng"])
        if (self.average is None) != ("weight_average" not in state):
            raise ValueError(f"trainer.optim.ema={self.cfg.optim.ema}, but the checkpoint was written "
                             f"{'with' if 'weight_average' in state else 'without'} a weight average; "
                             "resume with the ema setting it was trained with")
        if self.average is not None:
            self.average.load_state_dict(state["weight_average"])
        self.resumed_from = self.state.epoch
