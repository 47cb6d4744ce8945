"""Hyperparameter sweeps without Ray: the sweep config, its search space over dotted experiment
keys, and the experiment each trial runs.

A sweep file has a base experiment and a ``sweep:`` section::

    base_config: beauty-tiger.yaml      # optional, relative to this file; ``base:`` refines it
    base: {trainer: {epochs: 12}}       # an experiment config (the same keys as `recsys pipeline`)
    sweep:
      params:                           # dotted experiment keys -> one search domain each
        ids.rqvae.codebook_size: {grid: [64, 128, 256]}
        trainer.optim.lr: {loguniform: [3.0e-4, 3.0e-3]}
      num_samples: 2                    # samples of the random domains per grid point
      metric: recall@10                 # validation metric, higher is better
      scheduler: {name: asha, grace_period: 2, reduction_factor: 2}   # max_t = the trials' last epoch
      resources: {cpu: 1, gpu: 0}       # per trial
      max_concurrent_trials: 2

Every swept key must be a real key of the experiment: ``load_sweep`` builds and validates the
experiment of every grid point and of each random domain's bounds before any work starts, so
a typo or an out-of-range value fails at load with the key's name. Any key works, so model loss
weights (EAGER's ``model.lambda1`` / ``model.lambda2`` once that model exists) are swept the
same way as the codebook size. The Ray Tune driver lives in ``tune/``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

from recsys.config import deep_merge, from_dict, load_yaml, parse_overrides, require, require_choice, require_range
from recsys.experiment import (
    ExperimentConfig, experiment_from_dict, experiment_key, load_experiment_yaml, rename_experiment_keys,
)
from recsys.metrics import DEFAULT_KS, metric_names

DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "fifo")
# Prepared once, before the trials, or owned by the sweep itself: not sweepable.
FIXED_PREFIXES = ("data.", "embed.", "run.", "behavior.")
FIXED_KEYS = ("model.name", "trainer.optim.epochs", "trainer.resources.use_ray", "ids.use_ray",
              "trainer.selection.select_metric", "trainer.resources.threads", "trainer.selection.refit",
              "trainer.optim.stop_epoch")
MAX_VALIDATED_POINTS = 4096  # grid points built one by one at load; beyond that, each value alone


@dataclass(frozen=True)
class ParamSpec:
    """One swept key: ``grid``/``choice`` list values; ``uniform``/``loguniform`` [low, high];
    ``randint`` [low, high) integers."""

    key: str
    kind: str
    values: tuple

    @classmethod
    def parse(cls, key: str, raw: Any) -> "ParamSpec":
        where = f"sweep.params.{key}"
        require(isinstance(raw, dict) and len(raw) == 1,
                f"{where} must be a mapping with one of {list(DOMAINS)}, e.g. {{grid: [64, 128]}}; got {raw!r}")
        ((kind, values),) = raw.items()
        require_choice(f"{where} domain", kind, DOMAINS)
        require(isinstance(values, list) and len(values) > 0,
                f"{where}.{kind} must be a non-empty list, got {values!r}")
        if kind in ("grid", "choice"):
            require(len({repr(v) for v in values}) == len(values), f"{where}.{kind} repeats a value: {values!r}")
        else:
            require(len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values),
                    f"{where}.{kind} must be [low, high] numbers, got {values!r}")
            low, high = values
            require(low < high, f"{where}.{kind}: low must be < high, got {values!r}")
            if kind == "loguniform":
                require(low > 0, f"{where}.loguniform: low must be > 0, got {low!r}")
            if kind == "randint":
                require(all(float(v).is_integer() for v in values), f"{where}.randint needs integers, got {values!r}")
        return cls(key, kind, tuple(values))

    def probes(self) -> list:
        """Values that stand for the domain when the experiment is validated at load."""
        if self.kind in ("grid", "choice"):
            return list(self.values)
        low, high = self.values
        return [int(low), int(high) - 1] if self.kind == "randint" else [low, high]


@dataclass
class SchedulerConfig:
    name: str = "asha"  # asha: stop weak trials at rungs; fifo: run every trial to the end
    grace_period: int = 1  # epochs a trial always gets before ASHA may stop it
    reduction_factor: float = 2.0  # ASHA keeps the top 1/reduction_factor at each rung

    def __post_init__(self):
        require_choice("sweep.scheduler.name", self.name, SCHEDULERS)
        require_range("sweep.scheduler.grace_period", self.grace_period, 1)
        require(self.reduction_factor > 1, f"sweep.scheduler.reduction_factor={self.reduction_factor} "
                "is out of range; allowed: > 1")


@dataclass
class ResourcesConfig:
    cpu: float = 1.0  # per trial; also the trial's torch threads (at least 1)
    gpu: float = 0.0  # per trial; > 0 trains on the GPU

    def __post_init__(self):
        # Ray Tune rejects {"cpu": 0}; a fraction shares a core between trials.
        require(self.cpu >= 0.01, f"sweep.resources.cpu={self.cpu} is out of range; allowed: >= 0.01")
        require_range("sweep.resources.gpu", self.gpu, 0.0, 64)

    @property
    def threads(self) -> int:
        return max(1, int(self.cpu))


@dataclass
class SweepConfig:
    params: dict = field(default_factory=dict)  # dotted experiment key -> {grid|choice|...: values}
    num_samples: int = 1  # samples of the random domains per grid point
    metric: str = "recall@10"  # validation metric to rank trials on (higher is better)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    # 2 trials of 1 CPU fill a 2-CPU machine; on a cluster raise it (0 = as many as resources allow).
    max_concurrent_trials: int = 2
    seed: int = 0  # for the random domains
    name: str = ""  # appended to the run id

    def __post_init__(self):
        require(isinstance(self.params, dict) and len(self.params) > 0,
                "sweep.params must map at least one dotted experiment key to a domain, "
                "e.g. {ids.rqvae.codebook_size: {grid: [64, 128]}}")
        self.params = flatten_params(self.params)
        self.specs = [ParamSpec.parse(k, v) for k, v in self.params.items()]
        # A swept key keeps the name it was given (an old sweep run resumes with its trials' keys);
        # its current name is used to build the experiment.
        current: dict[str, str] = {}
        for spec in self.specs:
            key = experiment_key(spec.key, "sweep.params")
            require(key not in current, f"sweep.params.{current.get(key)} and sweep.params.{spec.key} are the same "
                    f"key ({key}); give it once, as {key}")
            current[key] = spec.key
        for spec in self.specs:
            key = experiment_key(spec.key)
            require(not key.startswith(FIXED_PREFIXES) and key not in FIXED_KEYS,
                    f"sweep.params.{spec.key} cannot be swept: data, embeddings, the behaviour model, run and "
                    f"{list(FIXED_KEYS)} are fixed by the sweep (the data is embedded and the behaviour model "
                    "trained once; ASHA budgets epochs up to trainer.optim.epochs)")
        require_range("sweep.num_samples", self.num_samples, 1, 100000)
        require(self.num_samples == 1 or any(s.kind != "grid" for s in self.specs),
                f"sweep.num_samples={self.num_samples} with only grid params repeats identical trials; "
                "sweep trainer.data.seed instead, or add a random domain")
        require_choice("sweep.metric", self.metric, metric_names(DEFAULT_KS))
        require_range("sweep.max_concurrent_trials", self.max_concurrent_trials, 0, 100000)
        require_range("sweep.seed", self.seed, 0, 2**31 - 1)

    @property
    def n_trials(self) -> int:
        return math.prod(len(s.values) for s in self.specs if s.kind == "grid") * self.num_samples


def flatten_params(params: dict, prefix: str = "") -> dict:
    """``{"trainer": {"lr": {"grid": [...]}}}`` (how a command-line override nests) and
    ``{"trainer.optim.lr": {"grid": [...]}}`` (how a YAML file writes it) -> the flat form; later wins."""
    flat: dict = {}
    for key, value in params.items():
        key = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            flat.update(flatten_params(value, f"{key}."))
        else:
            flat[key] = value
    return flat


@dataclass
class Sweep:
    """A loaded sweep: the config, the base experiment (as a dict) and the file it came from."""

    config: SweepConfig
    base: dict
    source: str = ""

    def __post_init__(self):
        self.base = rename_experiment_keys(self.base, "the sweep's base")  # a sweep run saved before a rename

    def to_dict(self) -> dict:
        from recsys.config import to_dict

        return {"source": self.source, "base": self.base, "sweep": to_dict(self.config)}

    @classmethod
    def from_state(cls, state: dict) -> "Sweep":
        """Back from ``to_dict()`` (a sweep run's config.json)."""
        return cls(config=from_dict(SweepConfig, state["sweep"], "sweep"), base=state["base"],
                   source=state.get("source", ""))

    def base_experiment(self) -> ExperimentConfig:
        return experiment_from_dict(self.base)

    def base_values(self) -> dict[str, Any]:
        """The base experiment's own value of every swept key (defaults filled in): the point
        the sweep is meant to beat."""
        return dotted_values(self.base_experiment().to_dict(), [s.key for s in self.config.specs])

    def trial_experiment(self, params: dict[str, Any]) -> ExperimentConfig:
        return trial_experiment(self, params)

    def winner_experiment(self, params: dict[str, Any]) -> ExperimentConfig:
        return winner_experiment(self, params)


EXPERIMENT_SECTIONS = tuple(f.name for f in fields(ExperimentConfig))


def route_overrides(overrides: Sequence[str]) -> dict:
    """``sweep.num_samples=4`` and ``base.trainer.optim.lr=1e-3`` go where they say; an override of an
    experiment section (``data.path=...``, ``trainer.optim.epochs=3``) refines ``base``."""
    tree = parse_overrides(overrides)
    routed: dict = {}
    for key, value in tree.items():
        if key in EXPERIMENT_SECTIONS:
            routed = deep_merge(routed, {"base": rename_experiment_keys({key: value}, "overrides")})
        elif key == "base":
            routed = deep_merge(routed, {"base": rename_experiment_keys(value, "overrides")})
        elif key in ("sweep", "base_config"):
            routed = deep_merge(routed, {key: value})
        else:
            raise ValueError(f"override key {key!r} is not allowed; use sweep.*, base.* or an experiment "
                             f"section {list(EXPERIMENT_SECTIONS)}")
    return routed


def load_sweep(path: str | Path | None, overrides: Sequence[str] = ()) -> Sweep:
    """Sweep YAML + dotted overrides -> a validated ``Sweep``: every trial's experiment is checked."""
    raw = load_yaml(path) if path is not None else {}
    if isinstance(raw.get("base"), dict):  # old key names renamed before the overrides merge in
        raw["base"] = rename_experiment_keys(raw["base"], f"{path}: base")
    raw = deep_merge(raw, route_overrides(overrides))
    unknown = sorted(set(raw) - {"base", "base_config", "sweep"})
    require(not unknown, f"unknown sweep file key(s) {unknown}; allowed: ['base', 'base_config', 'sweep']")
    base = raw.get("base") or {}
    require(isinstance(base, dict), f"base must be a mapping (an experiment config), got {base!r}")
    if raw.get("base_config"):
        ref = Path(str(raw["base_config"]))
        if not ref.is_absolute() and path is not None:
            ref = Path(path).parent / ref  # relative to the sweep file
        base = deep_merge(load_experiment_yaml(ref), base)
    require("sweep" in raw, "the sweep file needs a sweep: section with params")
    config = from_dict(SweepConfig, raw["sweep"], "sweep")
    sweep = Sweep(config=config, base=base, source=str(path or ""))
    check_points(sweep)
    return sweep


def dotted_values(tree: dict, keys: list[str]) -> dict[str, Any]:
    """``{"a.b": tree["a"]["b"], ...}``; a key missing from ``tree`` maps to None."""
    out = {}
    for key in keys:
        node: Any = tree
        for part in experiment_key(key).split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    return out


def with_params(base: dict, params: dict[str, Any]) -> dict:
    """The base experiment dict with ``{"a.b.c": value}`` set."""
    tree: dict = {}
    for key, value in params.items():
        node = tree
        *parents, leaf = experiment_key(key).split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return deep_merge(base, tree)


def trial_experiment(sweep: Sweep, params: dict[str, Any]) -> ExperimentConfig:
    """What one trial runs: base + params, in-process (the trial is the unit Ray schedules),
    selected on the sweep's metric, with as many torch threads as the trial has CPUs."""
    forced = {"trainer.resources.use_ray": False, "ids.use_ray": False,
              "trainer.selection.select_metric": sweep.config.metric,
              "trainer.resources.threads": sweep.config.resources.threads}
    return experiment_from_dict(with_params(sweep.base, {**params, **forced}))


def winner_experiment(sweep: Sweep, params: dict[str, Any]) -> ExperimentConfig:
    """The winning point as a pipeline config: base + params, selected on the sweep's metric; the
    in-process settings a trial needs are left as the base has them."""
    selected = {"trainer.selection.select_metric": sweep.config.metric}
    return experiment_from_dict(with_params(sweep.base, {**params, **selected}))


def check_points(sweep: Sweep) -> None:
    """Build every grid point (and each random domain at its bounds) now, so that a bad key or
    value fails before any work; raises ValueError naming the swept key and the value."""
    specs = sweep.config.specs
    grid = [s for s in specs if s.kind == "grid"]
    sizes = [len(s.values) for s in grid]
    if math.prod(sizes) <= MAX_VALIDATED_POINTS:
        points = [dict(zip([s.key for s in grid], combo)) for combo in itertools.product(*[s.values for s in grid])]
    else:  # too many to build one by one: each value alone, the rest at their first value
        first = {s.key: s.values[0] for s in grid}
        points = [{**first, s.key: v} for s in grid for v in s.values]
    first_random = {s.key: s.probes()[0] for s in specs if s.kind != "grid"}
    probes = [{**first_random, s.key: v} for s in specs if s.kind != "grid" for v in s.probes()] or [{}]
    base_trainer = sweep.base_experiment().trainer
    last = base_trainer.optim.last_epoch  # ASHA's max_t: a base stop_epoch stops every trial there
    require(not base_trainer.selection.refit, "base trainer.selection.refit=true: a refit trains on the "
            "validation targets and "
            "never validates, so a sweep has nothing to rank trials on; sweep without it, then refit the winner")
    for point in points:
        for probe in probes:
            values = {**point, **probe}
            try:
                trial_experiment(sweep, values)
            except ValueError as err:
                shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
                raise ValueError(f"sweep point {{{shown}}} is not a valid experiment: {err}") from None
    if sweep.config.scheduler.name == "asha":
        require(sweep.config.scheduler.grace_period <= last,
                f"sweep.scheduler.grace_period={sweep.config.scheduler.grace_period} exceeds the trials' last epoch "
                f"{last} (trainer.optim.stop_epoch, else trainer.optim.epochs)")
