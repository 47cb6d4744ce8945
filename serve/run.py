"""What the server loads from run directories, without Ray: one retriever train run, and for a
cascade the ranker trained on its candidates.

A train run's ``config.json`` names its data run (``data_dir``: the items table, i.e. the
dataset's item ids and content fields) and, for a generative retriever, its ids run
(``ids_dirs``: per ID space, its tokenizer and index). The model comes from
``checkpoints/best`` through ``load_model``: safetensors weights and a JSON config, no pickle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from recsys.data import InteractionData
from recsys.data.schema import SEQUENCES_FILE
from recsys.experiment import ExperimentConfig, experiment_dict_from_run, experiment_from_dict, ids_runs_of
from recsys.config import to_dict
from recsys.models import get_spec, with_inference_settings
from recsys.models.base import Ranker, SequenceModel
from recsys.runs import COMPLETE_FILE, CONFIG_FILE, read_json, require_complete
from recsys.training.checkpoint import load_model

CHECKPOINT = Path("checkpoints") / "best"


@dataclass
class ServingRun:
    run_dir: Path
    exp: ExperimentConfig
    items: pd.DataFrame  # the data run's items table: item_id (1..N), raw_id, content fields
    ids_dirs: dict[str, Path]  # the ids run (tokenizer/, index/) per ID space; empty for atomic-id models
    # inference settings changed from the checkpoint's (``Capabilities.inference_settings``)
    inference: dict = field(default_factory=dict)

    def load_model(self) -> SequenceModel:
        model = load_model(self.run_dir / CHECKPOINT, inference=self.inference)
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


def open_run(run_dir: str | Path, inference: dict | None = None) -> ServingRun:
    """Read a finished train run directory (``recsys train`` or ``<pipeline run>/train``).
    ``inference``: some of its model's inference settings changed (e.g. EAGER's ``fusion``), checked
    here against what that model allows."""
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
    inference = dict(inference or {})
    with_inference_settings({"name": exp.model_name, **to_dict(exp.model)}, inference, "inference")
    return ServingRun(run_dir, exp, items, ids_dirs, inference)


@dataclass
class Cascade:
    """The ranking step of a served cascade: the ranker's train run and how many of the retriever's
    top items it re-ranks (``top_n``)."""

    ranker_dir: Path
    top_n: int

    def load_ranker(self, retriever: ServingRun) -> Ranker:
        """The ranker, checked against the retriever's catalogue (a ranker trained on another
        catalogue would score other items under the same ids)."""
        model = load_model(self.ranker_dir / CHECKPOINT)
        if not isinstance(model, Ranker):
            raise ValueError(f"{self.ranker_dir} holds a {type(model).__name__}, not a ranker")
        if model.n_items != len(retriever.items):
            raise ValueError(f"the ranker {self.ranker_dir} was trained on a catalogue of {model.n_items} items but the "
                             f"retriever {retriever.run_dir} on one of {len(retriever.items)}; train the ranker on "
                             "this retriever's candidates (`recsys rank --retriever`)")
        return model

    def registration_refusal(self, retriever: ServingRun) -> str | None:
        """Why this cascade cannot take items registered after training, or None when it can. The
        Registry gives a new item a content vector from the encoder behind the retriever's semantic
        IDs; the ranker scores it by that vector, so its item vectors must be that same embed run's
        (a TIGER or EAGER cascade by default, ``recsys rank``'s ``item_vectors_run``)."""
        saved = read_json(self.ranker_dir / CONFIG_FILE)
        name = saved.get("model", {}).get("name", "?")
        if not get_spec(name).model_cls.capabilities.registers_items:
            return f"its ranker ({name}, {self.ranker_dir}) cannot score an item it was not trained on"
        vectors_dir = saved.get("item_vectors_dir")
        if vectors_dir is None:
            return (f"its ranker ({self.ranker_dir}) records no item vectors (item_vectors_dir), so it has no features "
                    "for an item it was not trained on")
        ids_dir = retriever.ids_dirs.get("semantic")
        embed_dir = None if ids_dir is None else read_json(ids_dir / CONFIG_FILE).get("embed_dir")
        if embed_dir is None or Path(vectors_dir).resolve() != Path(embed_dir).resolve():
            return (f"its ranker's item vectors come from {vectors_dir}, not from the content vectors a registered item "
                    f"gets (the embed run behind the retriever's semantic IDs: {embed_dir}); train the ranker with "
                    "`recsys rank --vectors-from` that embed run")
        return None


def ranker_catalogue_check(ranker_dir: Path, retriever: ServingRun) -> None:
    """Both runs must read the same items table: the same dataset ids in the same internal order."""
    saved = read_json(ranker_dir / CONFIG_FILE)
    if "data_dir" not in saved:
        raise ValueError(f"{ranker_dir / CONFIG_FILE} has no data_dir: not a ranker train run directory")
    items = InteractionData.load(saved["data_dir"]).items.sort_values("item_id", ignore_index=True)
    if items["raw_id"].astype(str).tolist() != retriever.items["raw_id"].astype(str).tolist():
        raise ValueError(f"the ranker {ranker_dir} and the retriever {retriever.run_dir} were trained on different "
                         f"catalogues ({saved['data_dir']} against the retriever's data run): their item ids differ")


def open_serving(run_dir: str | Path, ranker_dir: str | Path | None = None, top_n: int | None = None,
                 inference: dict | None = None) -> tuple[ServingRun, Cascade | None]:
    """What a ``run_dir`` serves: a train run (a retriever alone, or with the ranker of
    ``ranker_dir``), or a ``recsys rank`` run, which names its retriever, its ranker and the top-N
    it was evaluated with. ``top_n`` overrides that N (default 100 with an explicit ranker)."""
    run_dir = Path(run_dir).resolve()
    marker = run_dir / COMPLETE_FILE
    if not marker.is_file() or read_json(marker).get("stage") != "rank":
        retriever_dir, rank_n = run_dir, None
    else:  # a `recsys rank` run
        saved = read_json(run_dir / CONFIG_FILE)
        if ranker_dir is not None:
            raise ValueError(f"{run_dir} is a rank run, which names its ranker ({saved['train_dir']}); give either the "
                             "rank run or a retriever run with ranker_dir, not both")
        retriever_dir, ranker_dir, rank_n = Path(saved["retriever_dir"]), Path(saved["train_dir"]), saved["top_n"]
    retriever = open_run(retriever_dir, inference)
    if ranker_dir is None:
        if top_n is not None:
            raise ValueError(f"cascade_top_n={top_n} but there is no ranker: give a rank run or ranker_dir")
        return retriever, None
    ranker_dir = require_complete(ranker_dir, "train")
    if not (ranker_dir / CHECKPOINT).is_dir():
        raise FileNotFoundError(f"{ranker_dir / CHECKPOINT} is missing; train the ranker to completion first")
    ranker_catalogue_check(ranker_dir, retriever)
    cascade = Cascade(ranker_dir, top_n or rank_n or 100)
    cascade.load_ranker(retriever)  # fails here, once, rather than in every replica
    return retriever, cascade
