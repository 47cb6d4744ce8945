"""Configs for training and evaluation.

``trainer`` has four sections: ``optim`` (what the optimiser does), ``data`` (how training
windows are cut and batched), ``selection`` (validation and checkpoint selection) and
``resources`` (where it runs). The flat keys of the earlier single section (``trainer.lr``) are
still read, mapped by ``RENAMED_TRAINER_KEYS``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from recsys.config import require, require_choice, require_range
from recsys.data.split import SAMPLE_MODES
from recsys.metrics import DEFAULT_KS, metric_names


@dataclass
class OptimConfig:
    epochs: int = 200  # the schedule's length
    stop_epoch: int = 0  # > 0: stop after this epoch, the learning-rate schedule still sized for ``epochs``
    # Per worker. Here, not under resources: it sets the steps per epoch, hence the schedule's length
    # and the gradient noise that lr and warmup are tuned for; changing it changes the optimisation.
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine | inverse_sqrt (all after linear warmup)
    warmup_steps: int = 0
    grad_clip: float = 1.0  # 0 disables
    ema: float = 0.0  # > 0: validate, select and save an exponential moving average of the weights, this decay per step

    def __post_init__(self):
        require_range("trainer.optim.epochs", self.epochs, 1, 100000)
        require(0 <= self.stop_epoch <= self.epochs,
                f"trainer.optim.stop_epoch={self.stop_epoch} is out of range; allowed: 0 (run all epochs) "
                f"<= stop_epoch <= trainer.optim.epochs={self.epochs}")
        require_range("trainer.optim.batch_size", self.batch_size, 1, 1 << 20)
        require(0 < self.lr < 10, f"trainer.optim.lr={self.lr} is out of range; allowed: 0 < lr < 10")
        require_range("trainer.optim.weight_decay", self.weight_decay, 0.0, 10.0)
        require_choice("trainer.optim.schedule", self.schedule, ("constant", "cosine", "inverse_sqrt"))
        require_range("trainer.optim.warmup_steps", self.warmup_steps, 0)
        require_range("trainer.optim.grad_clip", self.grad_clip, 0.0)
        require(0.0 <= self.ema < 1.0, f"trainer.optim.ema={self.ema} is out of range; allowed: 0 (off) <= ema < 1")

    @property
    def last_epoch(self) -> int:
        """The epoch training stops after: ``stop_epoch``, or the schedule's end."""
        return self.stop_epoch or self.epochs


@dataclass
class TrainDataConfig:
    samples: str = "last"  # how training windows are cut from histories: last | sliding | prefixes
    bucket: int = 0  # > 0: batch histories of similar length (sorted within runs of this many batches)
    seed: int = 0  # batch order, initialisation and dropout
    # fp32 | bf16 (autocast) | auto = bf16 where the device runs it natively (AVX-512 BF16 or AMX,
    # a GPU with bf16), else fp32; resolved where the run starts and recorded resolved
    precision: str = "auto"
    # true: leave each user's last training transition s[:n-3] -> s[n-3] out of training, so a ranker
    # can train on the retriever's candidates for it without the retriever having memorised its
    # target (`recsys rank` requires a retriever trained so)
    ranker_holdout: bool = False
    # folds > 0: leave fold ``fold`` of ``folds`` user folds (recsys.data.split.user_folds) out of
    # training; `recsys rank --folds` trains one retriever per fold, and each fold's users' training
    # transitions become ranker examples scored by the retriever that never saw those users
    folds: int = 0
    fold: int = 0
    # m > 0: leave each user's last m training transitions out of training (for a history s of n items,
    # none of s[n-2-m] .. s[n-3] is a target), so the run's item table never saw a ranker's examples:
    # `recsys rank --vectors-from` takes the ranker's frozen item vectors from such a run
    drop_last_transitions: int = 0

    def __post_init__(self):
        require_choice("trainer.data.samples", self.samples, SAMPLE_MODES)
        require(isinstance(self.ranker_holdout, bool),
                f"trainer.data.ranker_holdout must be true or false, got {self.ranker_holdout!r}")
        require(self.folds == 0 or 2 <= self.folds <= 100,
                f"trainer.data.folds={self.folds} is out of range; allowed: 0 (no folds) or 2 <= folds <= 100")
        require(self.folds == 0 or 0 <= self.fold < self.folds,
                f"trainer.data.fold={self.fold} is out of range; allowed: 0 <= fold < trainer.data.folds ({self.folds})")
        require(not (self.folds and self.ranker_holdout),
                "trainer.data.folds and trainer.data.ranker_holdout exclude each other: folds leave users out, "
                "the holdout leaves each user's last training transition out")
        require_range("trainer.data.drop_last_transitions", self.drop_last_transitions, 0, 1 << 20)
        require(not (self.drop_last_transitions and (self.folds or self.ranker_holdout)),
                "trainer.data.drop_last_transitions excludes trainer.data.folds and trainer.data.ranker_holdout: it "
                "is for a run that gives a ranker item vectors, not candidates")
        require_range("trainer.data.bucket", self.bucket, 0, 1 << 20)
        require_choice("trainer.data.precision", self.precision, ("auto", "fp32", "bf16"))


@dataclass
class SelectionConfig:
    select_metric: str = "ndcg@10"  # validation metric that picks the best checkpoint
    patience: int = 20  # epochs without a better validation score before stopping; 0 = never stop early
    eval_every: int = 1
    valid_users: int = 0  # > 0: validate during training on this fixed random sample of users; 0 = all
    # seed of that sample; None = trainer.data.seed (set it to compare seeds on one sample)
    valid_seed: int | None = None
    # true: the test model. Train on training + validation transitions (each user's s[:n-1]), with
    # no validation and no selection: checkpoints/best is the last epoch's. Choose epochs and
    # stop_epoch on a validated run of the same config first.
    refit: bool = False

    def __post_init__(self):
        require_choice("trainer.selection.select_metric", self.select_metric, metric_names(DEFAULT_KS))
        require_range("trainer.selection.patience", self.patience, 0)
        require_range("trainer.selection.eval_every", self.eval_every, 1)
        require_range("trainer.selection.valid_users", self.valid_users, 0)
        if self.valid_seed is not None:
            require_range("trainer.selection.valid_seed", self.valid_seed, 0, 2**63 - 1)


@dataclass
class TrainResourcesConfig:
    use_ray: bool = True  # False runs the same loop in this process (tests, GPU benchmarks)
    num_workers: int = 1  # Ray Train workers; DDP over gloo on CPU, NCCL on GPU
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    threads: int = 0  # torch intra-op threads per worker; 0 = torch's default
    keep_checkpoints: int = 2
    max_failures: int = 1  # Ray Train restarts from the latest checkpoint this many times; -1 = forever

    def __post_init__(self):
        require_range("trainer.resources.num_workers", self.num_workers, 1, 4096)
        require(self.cpus_per_worker > 0,
                f"trainer.resources.cpus_per_worker={self.cpus_per_worker} is out of range; allowed: > 0")
        require_range("trainer.resources.threads", self.threads, 0, 1024)
        require_range("trainer.resources.keep_checkpoints", self.keep_checkpoints, 1)
        require_range("trainer.resources.max_failures", self.max_failures, -1)


@dataclass
class TrainerConfig:
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    resources: TrainResourcesConfig = field(default_factory=TrainResourcesConfig)

    def __post_init__(self):
        require(not (self.data.ranker_holdout and self.selection.refit),
                "trainer.data.ranker_holdout and trainer.selection.refit exclude each other: a refit trains on "
                "every transition up to validation, a ranker holdout leaves the last training one out")
        require(not (self.data.folds and self.selection.refit),
                "trainer.data.folds and trainer.selection.refit exclude each other: a fold retriever trains on "
                "training transitions only")
        require(not (self.data.drop_last_transitions and self.selection.refit),
                "trainer.data.drop_last_transitions and trainer.selection.refit exclude each other: a refit trains "
                "on every transition up to validation")


# The one table of renamed keys: the flat trainer keys (before the sections) -> where they live
# now. Read by recsys.experiment when it loads a YAML, an override, a saved run's config.json or
# a swept key; an old key is accepted with a FutureWarning naming its new key.
RENAMED_TRAINER_KEYS: dict[str, str] = {
    "trainer.epochs": "trainer.optim.epochs",
    "trainer.stop_epoch": "trainer.optim.stop_epoch",
    "trainer.batch_size": "trainer.optim.batch_size",
    "trainer.lr": "trainer.optim.lr",
    "trainer.weight_decay": "trainer.optim.weight_decay",
    "trainer.schedule": "trainer.optim.schedule",
    "trainer.warmup_steps": "trainer.optim.warmup_steps",
    "trainer.grad_clip": "trainer.optim.grad_clip",
    "trainer.ema": "trainer.optim.ema",
    "trainer.samples": "trainer.data.samples",
    "trainer.bucket": "trainer.data.bucket",
    "trainer.seed": "trainer.data.seed",
    "trainer.precision": "trainer.data.precision",
    "trainer.select_metric": "trainer.selection.select_metric",
    "trainer.patience": "trainer.selection.patience",
    "trainer.eval_every": "trainer.selection.eval_every",
    "trainer.valid_users": "trainer.selection.valid_users",
    "trainer.valid_seed": "trainer.selection.valid_seed",
    "trainer.refit": "trainer.selection.refit",
    "trainer.use_ray": "trainer.resources.use_ray",
    "trainer.num_workers": "trainer.resources.num_workers",
    "trainer.use_gpu": "trainer.resources.use_gpu",
    "trainer.cpus_per_worker": "trainer.resources.cpus_per_worker",
    "trainer.threads": "trainer.resources.threads",
    "trainer.keep_checkpoints": "trainer.resources.keep_checkpoints",
    "trainer.max_failures": "trainer.resources.max_failures",
}


def with_resolved_precision(cfg: TrainerConfig) -> TrainerConfig:
    """``cfg`` with ``trainer.data.precision=auto`` made concrete for the device the run trains on
    (a GPU with ``trainer.resources.use_gpu``, else this machine's CPU), so the run's config.json
    says what it used and a resume uses the same."""
    from dataclasses import replace

    from recsys.hardware import resolve_precision

    device = "cuda" if cfg.resources.use_gpu else "cpu"
    return replace(cfg, data=replace(cfg.data, precision=resolve_precision(cfg.data.precision, device)))


@dataclass
class EvalConfig:
    batch_size: int = 1024
    exclude_history: bool = False  # mask items already in the history from the ranking

    def __post_init__(self):
        require_range("eval.batch_size", self.batch_size, 1, 1 << 20)
