"""Configs for training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass

from recsys.config import require, require_choice, require_range
from recsys.data.split import SAMPLE_MODES
from recsys.metrics import DEFAULT_KS, metric_names


@dataclass
class TrainerConfig:
    epochs: int = 200  # the schedule's length
    stop_epoch: int = 0  # > 0: stop after this epoch, the learning-rate schedule still sized for ``epochs``
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine | inverse_sqrt (all after linear warmup)
    warmup_steps: int = 0
    grad_clip: float = 1.0  # 0 disables
    ema: float = 0.0  # > 0: validate, select and save an exponential moving average of the weights, this decay per step
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    samples: str = "last"  # how training windows are cut from histories: last | sliding | prefixes
    bucket: int = 0  # > 0: batch histories of similar length (sorted within runs of this many batches)
    patience: int = 20  # epochs without a better validation score before stopping; 0 = never stop early
    select_metric: str = "ndcg@10"  # validation metric that picks the best checkpoint
    eval_every: int = 1
    valid_users: int = 0  # > 0: validate during training on this fixed random sample of users; 0 = all
    valid_seed: int | None = None  # seed of that sample; None = trainer.seed (set it to compare seeds on one sample)
    seed: int = 0
    # true: the test model. Train on training + validation transitions (each user's s[:n-1]), with
    # no validation and no selection: checkpoints/best is the last epoch's. Choose epochs and
    # stop_epoch on a validated run of the same config first.
    refit: bool = False
    use_ray: bool = True  # False runs the same loop in this process (tests, GPU benchmarks)
    num_workers: int = 1  # Ray Train workers; DDP over gloo on CPU, NCCL on GPU
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    threads: int = 0  # torch intra-op threads per worker; 0 = torch's default
    keep_checkpoints: int = 2
    max_failures: int = 1  # Ray Train restarts from the latest checkpoint this many times; -1 = forever

    def __post_init__(self):
        require_range("trainer.epochs", self.epochs, 1, 100000)
        require(0 <= self.stop_epoch <= self.epochs,
                f"trainer.stop_epoch={self.stop_epoch} is out of range; allowed: 0 (run all epochs) "
                f"<= stop_epoch <= trainer.epochs={self.epochs}")
        require_range("trainer.batch_size", self.batch_size, 1, 1 << 20)
        require(self.lr > 0 and self.lr < 10, f"trainer.lr={self.lr} is out of range; allowed: 0 < lr < 10")
        require_range("trainer.weight_decay", self.weight_decay, 0.0, 10.0)
        require_choice("trainer.schedule", self.schedule, ("constant", "cosine", "inverse_sqrt"))
        require_range("trainer.warmup_steps", self.warmup_steps, 0)
        require_range("trainer.grad_clip", self.grad_clip, 0.0)
        require(0.0 <= self.ema < 1.0, f"trainer.ema={self.ema} is out of range; allowed: 0 (off) <= ema < 1")
        require_choice("trainer.precision", self.precision, ("fp32", "bf16"))
        require_choice("trainer.samples", self.samples, SAMPLE_MODES)
        require_range("trainer.patience", self.patience, 0)
        require_choice("trainer.select_metric", self.select_metric, metric_names(DEFAULT_KS))
        require_range("trainer.eval_every", self.eval_every, 1)
        require_range("trainer.valid_users", self.valid_users, 0)
        if self.valid_seed is not None:
            require_range("trainer.valid_seed", self.valid_seed, 0, 2**63 - 1)
        require_range("trainer.bucket", self.bucket, 0, 1 << 20)
        require_range("trainer.num_workers", self.num_workers, 1, 4096)
        require(self.cpus_per_worker > 0, f"trainer.cpus_per_worker={self.cpus_per_worker} is out of range; allowed: > 0")
        require_range("trainer.threads", self.threads, 0, 1024)
        require_range("trainer.keep_checkpoints", self.keep_checkpoints, 1)
        require_range("trainer.max_failures", self.max_failures, -1)


@dataclass
class EvalConfig:
    batch_size: int = 1024
    exclude_history: bool = False  # mask items already in the history from the ranking

    def __post_init__(self):
        require_range("eval.batch_size", self.batch_size, 1, 1 << 20)
