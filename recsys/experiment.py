"""The full config of a run, composed from the component configs, and its loader.

``load_experiment("configs/beauty-sasrec.yaml", ["trainer.optim.epochs=5"])`` reads the YAML (and
the chain of ``base_config:`` files it refines), applies dotted overrides and validates every
section; an unknown key or an out-of-range value raises a ValueError that names it. Keys renamed
since (``RENAMED_KEYS``) are still read, with a FutureWarning naming the new key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from recsys.config import (
    deep_merge, from_dict, load_yaml_chain, parse_overrides, rename_key, rename_keys, require, to_dict,
)
from recsys.data.config import DataConfig
from recsys.history.build import HistoryConfig
from recsys.history.store import StoreConfig
from recsys.models import get_spec, model_config_from_dict, model_names
from recsys.semantic_ids.build import IdsConfig
from recsys.text import EmbedConfig
from recsys.training.config import RENAMED_TRAINER_KEYS, EvalConfig, TrainerConfig


DEFAULT_MODEL = {"name": "sasrec"}
RENAMED_KEYS = RENAMED_TRAINER_KEYS  # old dotted key -> new, over every section


@dataclass
class RunSection:
    root: str = "runs"  # where run directories go: runs/<stage>/<run-id>/
    name: str = ""  # appended to the run id; empty = the model name (data and ids runs: after the format / method)

    def __post_init__(self):
        # Run directories are local paths (recsys.runs, Ray Train's storage_path = the run directory).
        # A URI would silently become a relative directory named "s3:" inside the job's working copy.
        require("://" not in self.root,
                f"run.root={self.root} is a URI; allowed: a filesystem path (on a cluster, a shared "
                "filesystem mounted at the same path on every node); object-store URIs are not supported")


def model_section(value: Any, where: str = "model") -> Any:
    """``{"name": "tiger", ...}`` -> the registered model's own config (TigerConfig); unknown keys
    fail naming ``model.<key>`` and the keys that model allows."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value
    require(isinstance(value, dict), f"{where} must be a mapping with a name, got {value!r}")
    return model_config_from_dict(value)[1]


def model_name_of(config: Any) -> str:
    """The registered name of a model config (each model has its own config class)."""
    names = [n for n in model_names() if get_spec(n).config_cls is type(config)]
    require(len(names) == 1, f"model config {type(config).__name__} is registered as {names}; "
            "expected exactly one model.name")
    return names[0]


@dataclass
class BehaviorSection:
    """Where a ``behavior`` ID space's item vectors come from in ``recsys pipeline`` (EAGER): the
    model of this experiment config (e.g. configs/beauty-two-tower.yaml or configs/beauty-sasrec.yaml),
    trained on the pipeline's data run, training transitions only, whose item table is clustered
    with the ``ids`` settings. Outside the pipeline, ``recsys ids --from-train RUN`` names the run."""

    config: str = ""  # path to that model's experiment YAML; empty = none (the pipeline refuses a behavior space)
    overrides: list[str] = field(default_factory=list)  # dotted overrides applied to it


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    # The chosen model's own config (SASRecConfig, TigerConfig, ...), tagged by model.name in YAML.
    model: Any = field(default_factory=lambda: model_section(DEFAULT_MODEL),
                       metadata={"from_dict": model_section})
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    ids: IdsConfig = field(default_factory=IdsConfig)
    behavior: BehaviorSection = field(default_factory=BehaviorSection)
    history: HistoryConfig = field(default_factory=HistoryConfig)  # recsys history: the clusters of whole histories
    store: StoreConfig = field(default_factory=StoreConfig)  # where recsys history writes the serving state
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self):
        name = model_name_of(self.model)  # fails now, not mid-pipeline, if model is not a registered config
        least = get_spec(name).model_cls.capabilities.min_batch_size
        require(self.trainer.optim.batch_size >= least,
                f"trainer.optim.batch_size={self.trainer.optim.batch_size} is too small for model.name={name!r}: "
                f"its loss needs at least {least} examples per batch (in-batch negatives are the other rows' "
                "targets)")

    @property
    def model_name(self) -> str:
        return model_name_of(self.model)

    def to_dict(self) -> dict[str, Any]:
        out = to_dict(self)
        out["model"] = {"name": self.model_name, **to_dict(self.model)}
        return out


def rename_experiment_keys(raw: dict, source: str = "") -> dict:
    """``raw`` with old keys (``trainer.optim.lr``) moved to their new places (``trainer.optim.lr``)."""
    return rename_keys(raw, RENAMED_KEYS, source)


def experiment_key(key: str, source: str = "") -> str:
    """The current name of one dotted experiment key, e.g. a swept ``trainer.optim.lr``."""
    return rename_key(key, RENAMED_KEYS, source)


def load_experiment_yaml(path: str | Path) -> dict:
    """An experiment YAML and the chain of ``base_config:`` files it refines, as one dict with
    current key names (each file's old keys renamed before merging)."""
    return load_yaml_chain(path, rename_experiment_keys)


def parse_experiment_overrides(overrides: Sequence[str]) -> dict:
    return rename_experiment_keys(parse_overrides(overrides), "overrides")


def load_experiment(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """YAML (optional; None = the embedded defaults) + dotted overrides -> ExperimentConfig."""
    raw = load_experiment_yaml(path) if path is not None else {}
    raw = deep_merge(raw, parse_experiment_overrides(overrides))
    return experiment_from_dict(raw)


def experiment_from_dict(raw: dict) -> ExperimentConfig:
    # Model keys given without a name (e.g. an override model.d_model=32) refine the default model.
    return from_dict(ExperimentConfig, deep_merge({"model": DEFAULT_MODEL}, rename_experiment_keys(raw)))


def behavior_experiment(exp: ExperimentConfig) -> ExperimentConfig:
    """The experiment that trains the behaviour vectors of ``exp``'s behavior ID space
    (``behavior.config`` + ``behavior.overrides``, under ``exp``'s run root); refuses a model
    without item vectors and a refit (its vectors would have seen the validation targets)."""
    where = f"behavior.config={exp.behavior.config}"
    require(bool(exp.behavior.config),
            f"model.name={exp.model_name!r} decodes a behavior ID space: set behavior.config to the experiment config "
            "of the model whose item vectors it clusters (e.g. configs/beauty-two-tower.yaml or "
            "configs/beauty-sasrec.yaml)")
    source = load_experiment(exp.behavior.config, [f"run.root={exp.run.root}", *exp.behavior.overrides])
    require(get_spec(source.model_name).model_cls.capabilities.item_vectors,
            f"{where} trains model.name={source.model_name!r}, which exposes no item vectors "
            "(capabilities.item_vectors); use a two_tower or sasrec config")
    require(not source.trainer.selection.refit,
            f"{where} is a refit (trainer.selection.refit=true): its item vectors would be trained on the validation "
            "targets and the behaviour IDs would leak them; train on training transitions only")
    return source


# stored beside the config in a train run's config.json ("ids_dir": one semantic space, before 2026-12-03)
RUN_WIRING = ("data_dir", "ids_dirs", "ids_dir", "candidates_dir", "retriever_dir", "embed_dir",
              "item_vectors_dir")  # a ranker names its candidates, retriever and item vectors


def ids_runs_of(saved: dict) -> dict[str, str]:
    """A train run's ids runs by ID space, from its config.json (also one written before spaces
    were named, whose single ``ids_dir`` was the semantic space)."""
    if saved.get("ids_dirs") is not None:
        return dict(saved["ids_dirs"])
    return {"semantic": saved["ids_dir"]} if saved.get("ids_dir") else {}


def experiment_dict_from_run(saved: dict) -> dict:
    """A train run's config.json without its run wiring: the experiment as it was configured (a
    run saved before keys were renamed reads with the current names)."""
    return rename_experiment_keys({k: v for k, v in saved.items() if k not in RUN_WIRING}, "a run's config.json")


def resumed_experiment(saved: dict, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """A train run's saved config.json refined by dotted overrides (``recsys train --resume``)."""
    return experiment_from_dict(deep_merge(experiment_dict_from_run(saved), parse_experiment_overrides(overrides)))
