"""The full config of a run, composed from the component configs, and its loader.

``load_experiment("configs/beauty-sasrec.yaml", ["trainer.epochs=5"])`` reads the YAML,
applies dotted overrides and validates every section; an unknown key or an out-of-range value
raises a ValueError that names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from recsys.config import deep_merge, from_dict, load_yaml, parse_overrides, require, to_dict
from recsys.data.config import DataConfig
from recsys.models import model_config_from_dict
from recsys.semantic_ids.build import IdsConfig
from recsys.text import EmbedConfig
from recsys.training.config import EvalConfig, TrainerConfig


DEFAULT_MODEL = {"name": "sasrec"}


@dataclass
class RunSection:
    root: str = "runs"  # where run directories go: runs/<stage>/<run-id>/
    name: str = ""  # appended to the run id; empty = the model name

    def __post_init__(self):
        # Run directories are local paths (recsys.runs, Ray Train's storage_path = the run directory).
        # A URI would silently become a relative directory named "s3:" inside the job's working copy.
        require("://" not in self.root,
                f"run.root={self.root} is a URI; allowed: a filesystem path (on a cluster, a shared "
                "filesystem mounted at the same path on every node); object-store URIs are not supported")


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: dict = field(default_factory=lambda: dict(DEFAULT_MODEL))
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    ids: IdsConfig = field(default_factory=IdsConfig)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self):
        # Resolve once so that a bad model section fails at load time, not mid-pipeline.
        self.model_name, self.model_config = model_config_from_dict(self.model)

    def to_dict(self) -> dict[str, Any]:
        out = to_dict(self)
        out["model"] = {"name": self.model_name, **to_dict(self.model_config)}
        return out


def load_experiment(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """YAML (optional; None = the embedded defaults) + dotted overrides -> ExperimentConfig."""
    raw = load_yaml(path) if path is not None else {}
    raw = deep_merge(raw, parse_overrides(overrides))
    return experiment_from_dict(raw)


def experiment_from_dict(raw: dict) -> ExperimentConfig:
    # Model keys given without a name (e.g. an override model.d_model=32) refine the default model.
    return from_dict(ExperimentConfig, deep_merge({"model": DEFAULT_MODEL}, raw))


RUN_WIRING = ("data_dir", "ids_dir")  # stored beside the config in a train run's config.json


def experiment_dict_from_run(saved: dict) -> dict:
    """A train run's config.json without its run wiring: the experiment as it was configured."""
    return {k: v for k, v in saved.items() if k not in RUN_WIRING}
