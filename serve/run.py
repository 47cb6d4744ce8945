"""What the server loads from ONE train run directory, without Ray.

A train run's ``config.json`` names its data run (``data_dir``: the items table, i.e. the
dataset's item ids and content fields) and, for a generative retriever, its ids run
(``ids_dirs``: per ID space, its tokenizer and index). The model comes from
``checkpoints/best`` through ``load_model``: safetensors weights and a JSON config, no pickle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from recsys.data import InteractionData
from recsys.data.schema import SEQUENCES_FILE
from recsys.experiment import ExperimentConfig, experiment_dict_from_run, experiment_from_dict, ids_runs_of
from recsys.models.base import SequenceModel
from recsys.runs import CONFIG_FILE, read_json, require_complete
from recsys.training.checkpoint import load_model

CHECKPOINT = Path("checkpoints") / "best"


@dataclass
class ServingRun:
    run_dir: Path
    exp: ExperimentConfig
    items: pd.DataFrame  # the data run's items table: item_id (1..N), raw_id, content fields
    ids_dirs: dict[str, Path]  # the ids run (tokenizer/, index/) per ID space; empty for atomic-id models

    def load_model(self) -> SequenceModel:
        model = load_model(self.run_dir / CHECKPOINT)
        if model.n_items != len(self.items):
            raise ValueError(f"{self.run_dir / CHECKPOINT} holds {model.n_items} items but the data run's items "
                             f"table has {len(self.items)}; the run directory is inconsistent")
        return model

    @property
    def content_fields(self) -> list[str]:
        """Columns a registered item may give: the items table's, less the ids."""
        return [c for c in self.items.columns if c not in ("item_id", "raw_id")]


def user_rows(run: ServingRun) -> dict[str, int]:
    """The data run's user ids -> their row in its sequences: the ``user`` index models with user
    tokens read (``LeaveOneOutSplit.train_users`` counts the same rows)."""
    data_dir = read_json(run.run_dir / CONFIG_FILE)["data_dir"]
    ids = pd.read_parquet(Path(data_dir) / SEQUENCES_FILE, columns=["user_id"])["user_id"].astype(str)
    return {u: row for row, u in enumerate(ids)}


def open_run(run_dir: str | Path) -> ServingRun:
    """Read a finished train run directory (``recsys train`` or ``<pipeline run>/train``)."""
    run_dir = Path(run_dir).resolve()
    if (run_dir / "train" / CONFIG_FILE).is_file():
        run_dir = run_dir / "train"  # a pipeline run: serve its train stage
    require_complete(run_dir, "train")
    saved = read_json(run_dir / CONFIG_FILE)
    if "data_dir" not in saved:
        raise ValueError(f"{run_dir / CONFIG_FILE} has no data_dir: not a train run directory")
    if not (run_dir / CHECKPOINT).is_dir():
        raise FileNotFoundError(f"{run_dir / CHECKPOINT} is missing; train the run to completion first")
    exp = experiment_from_dict(experiment_dict_from_run(saved))
    items = InteractionData.load(saved["data_dir"]).items.sort_values("item_id", ignore_index=True)
    ids_dirs = {space: Path(d) for space, d in ids_runs_of(saved).items()}
    return ServingRun(run_dir, exp, items, ids_dirs)
