"""Set up a Trainer for an experiment, restore it from a checkpoint, and train in-process.

``pipelines/train_job.py`` runs the same ``build_trainer`` / ``restore`` inside Ray Train
workers; ``train_in_process`` is the path without Ray (tests, one machine, a GPU box).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from recsys.data.split import LeaveOneOutSplit
from recsys.experiment import ExperimentConfig
from recsys.models import build_model, get_spec
from recsys.runs import CONFIG_FILE, atomic_directory, read_json, recover_directory, write_text
from recsys.training.checkpoint import load_train_state, save_checkpoint
from recsys.training.loop import LoopState, Trainer

EPOCH_LOG = "epochs.jsonl"


def check_id_spaces(model_name: str, ids_dirs: dict[str, Any]) -> None:
    """Raise unless ``ids_dirs`` gives an ids run for exactly the ID spaces the model declares."""
    declared = get_spec(model_name).model_cls.capabilities.id_spaces
    unknown = sorted(set(ids_dirs) - set(declared))
    if unknown:
        raise ValueError(f"--ids {unknown[0]}=...: model.name={model_name!r} has no ID space {unknown[0]!r}; "
                         f"it declares {list(declared) or 'none (it reads atomic item ids)'}")
    missing = [space for space in declared if space not in ids_dirs]
    if missing:
        raise ValueError(f"model.name={model_name!r} decodes IDs in the space(s) {list(declared)}: give an ids run "
                         f"for {missing} (--ids RUN when it has one space, --ids SPACE=RUN per space)")


def model_context(exp: ExperimentConfig, n_items: int, ids_dirs: dict[str, str | Path],
                  embed_dir: str | Path | None = None) -> dict:
    """What ``build_model`` needs beyond the config: for a model with ID spaces, each space's
    table from its ids run (``<run>/index``), with the run's per-level vocabulary sizes, and,
    for a model that declares ``id_vectors``, the vectors those IDs were built from; for a model
    that declares ``content_vectors``, the embed run's item vectors when ``embed_dir`` is given."""
    check_id_spaces(exp.model_name, ids_dirs)
    context: dict = {}
    if embed_dir is not None:
        if not get_spec(exp.model_name).model_cls.capabilities.content_vectors:
            raise ValueError(f"--embed gives content vectors, and model.name={exp.model_name!r} reads none (the "
                             "two-tower does, with model.content=true)")
        context["content_vectors"] = embed_run_vectors(embed_dir, n_items, "--embed")
    if not ids_dirs:
        return context
    from recsys.models import IdTable
    from recsys.semantic_ids import SemanticIdIndex

    tables = {}
    for space, ids_dir in ids_dirs.items():
        index = SemanticIdIndex.load(Path(ids_dir) / "index")
        if len(index) < n_items:
            raise ValueError(f"the {space} ids run {ids_dir} has IDs for {len(index)} items, the data has {n_items}: "
                             "it was built from another dataset")
        tables[space] = IdTable.from_index(index, n_items)
        if get_spec(exp.model_name).model_cls.capabilities.id_vectors:
            tables[space] = tables[space]._replace(vectors=ids_run_vectors(ids_dir, n_items, space))
    return {**context, "ids": tables}


def ids_source_data_run(ids_dir: str | Path) -> Path | None:
    """The data run an ids run's vectors came from: its train run's (behaviour IDs) or embed run's
    (content IDs) ``data_dir``; None when that run does not record one (a hand-made embed run)."""
    saved = read_json(Path(ids_dir) / CONFIG_FILE)
    source = saved.get("train_dir") or saved.get("embed_dir")
    if not source or not (Path(source) / CONFIG_FILE).is_file():
        return None
    data_dir = read_json(Path(source) / CONFIG_FILE).get("data_dir")
    return Path(data_dir) if data_dir else None


def check_ids_catalogue(ids_dirs: dict[str, str | Path], data_dir: str | Path) -> None:
    """Refuse an ids run built from a data run whose item catalogue (raw item id by internal id)
    differs from ``data_dir``'s: its IDs would name other items."""
    for space, ids_dir in ids_dirs.items():
        check_same_catalogue(ids_source_data_run(ids_dir), data_dir, f"the {space} ids run {ids_dir}", "IDs")


def check_embed_catalogue(embed_dir: str | Path, data_dir: str | Path) -> None:
    """Refuse an embed run over a data run whose item catalogue differs from ``data_dir``'s."""
    saved = read_json(Path(embed_dir) / CONFIG_FILE) if (Path(embed_dir) / CONFIG_FILE).is_file() else {}
    source = Path(saved["data_dir"]) if saved.get("data_dir") else None
    check_same_catalogue(source, data_dir, f"the embed run {embed_dir}", "vectors")


def check_same_catalogue(source: Path | None, data_dir: str | Path, what: str, holds: str) -> None:
    """``what`` was built from the data run ``source`` (None: unknown, not checked); raise unless
    its item catalogue begins with ``data_dir``'s."""
    import pandas as pd

    from recsys.data.schema import ITEMS_FILE

    if source is None or source.resolve() == Path(data_dir).resolve():
        return
    if not (source / ITEMS_FILE).is_file():
        raise ValueError(f"{what} was built from the data run {source}, which is gone: its item catalogue cannot be "
                         f"checked against {data_dir}'s")

    def catalogue(directory: Path) -> list[str]:
        return pd.read_parquet(directory / ITEMS_FILE, columns=["raw_id"])["raw_id"].astype(str).tolist()

    ours, theirs = catalogue(Path(data_dir)), catalogue(source)
    if theirs[:len(ours)] != ours:
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise ValueError(f"{what} was built from the data run {source}, whose item catalogue differs from "
                         f"{data_dir}'s (item {first + 1}: {theirs[first] if first < len(theirs) else None!r} there, "
                         f"{ours[first] if first < len(ours) else None!r} here): its {holds} would name other items")


def ids_run_vectors(ids_dir: str | Path, n_items: int, space: str) -> torch.Tensor:
    """The item vectors an ids run's IDs were built from, (n_items + 1, D) with row 0 zeros: its
    embed run's (content IDs), or those it wrote from a train run (``recsys ids --from-train``)."""
    saved = read_json(Path(ids_dir) / CONFIG_FILE)
    return embed_run_vectors(saved["embed_dir"] if saved.get("embed_dir") else ids_dir, n_items,
                             f"the {space} ids run {ids_dir}")


def embed_run_vectors(directory: str | Path, n_items: int, what: str) -> torch.Tensor:
    """The item vectors a run wrote (``embeddings.parquet``, item ids 1..N in order), as
    (n_items + 1, D) with row 0 zeros for padding."""
    from recsys.text import load_embeddings

    _, vectors = load_embeddings(directory)  # item ids 1..N in order, checked there
    if len(vectors) < n_items:
        raise ValueError(f"{what}: {directory} holds vectors of {len(vectors)} items, the data has {n_items}: it was "
                         "built from another dataset")
    table = torch.from_numpy(vectors[:n_items]).float()
    return torch.cat([table.new_zeros(1, table.shape[1]), table])


def build_trainer(exp: ExperimentConfig, split: LeaveOneOutSplit, *, device: torch.device | str = "cpu",
                  wrap: Callable[[nn.Module], nn.Module] | None = None, rank: int = 0, world_size: int = 1,
                  context: dict | None = None) -> Trainer:
    """Seeded model + Trainer. ``wrap`` turns the model into its training form (e.g. DDP);
    ``context`` is ``model_context(...)``."""
    torch.manual_seed(exp.trainer.data.seed)
    if exp.trainer.resources.threads:
        torch.set_num_threads(exp.trainer.resources.threads)
    model = build_model(exp.model_name, exp.model, n_items=split.n_items, max_len=split.max_history,
                        **(context or {})).to(device)
    train_model = wrap(model) if wrap else model
    return Trainer(model, split, exp.trainer, exp.eval, device=device, train_model=train_model,
                   rank=rank, world_size=world_size)


def restore(trainer: Trainer, checkpoint_dir: str | Path) -> None:
    """Load weights and optimizer/loop state written by ``save_trainer_checkpoint``."""
    from safetensors.torch import load_file

    checkpoint_dir = Path(checkpoint_dir)
    trainer.model.load_state_dict(load_file(str(checkpoint_dir / "model.safetensors"), device=str(trainer.device)))
    state = load_train_state(checkpoint_dir)
    if state is None:
        raise FileNotFoundError(f"{checkpoint_dir} holds no train_state.pt; it cannot be resumed from")
    trainer.load_state_dict(state)


def save_trainer_checkpoint(directory: str | Path, trainer: Trainer, model_name: str) -> Path:
    return save_checkpoint(directory, trainer.model, model_name, trainer.state_dict())


def train_in_process(exp: ExperimentConfig, split: LeaveOneOutSplit, run_dir: str | Path,
                     resume: bool = False, device: str = "cpu", context: dict | None = None,
                     after_epoch: Callable[[dict, Path | None], None] | None = None) -> LoopState:
    """Train without Ray into ``run_dir/checkpoints/{last,best}``; ``resume`` continues from last.
    ``run_dir/epochs.jsonl`` is rewritten from the loop's history after every epoch, so after a
    resume it holds the checkpoint's epochs and the new ones, never an epoch twice.
    ``after_epoch(metrics, checkpoints_dir)`` runs once an epoch is logged and checkpointed
    (``checkpoints_dir`` is None for an epoch without validation, unless ``trainer.selection.refit``);
    Ray Tune reports from it."""
    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoints"
    trainer = build_trainer(exp, split, device=device, context=context)
    if resume:
        recover_directory(ckpt / "last")  # a crash between the two renames of the last save
        recover_directory(ckpt / "best")
        if not (ckpt / "last").is_dir():
            raise FileNotFoundError(f"cannot resume: {ckpt / 'last'} does not exist")
        restore(trainer, ckpt / "last")

    def on_epoch_end(metrics: dict, improved: bool, trainer: Trainer) -> None:
        write_text(run_dir / EPOCH_LOG, "".join(json.dumps(h) + "\n" for h in trainer.state.history))
        # a refit saves every epoch: it has no validation, and its latest epoch is the selected one
        saved = exp.trainer.selection.refit or f"valid_{exp.trainer.selection.select_metric}" in metrics
        if saved:
            with atomic_directory(ckpt / "last") as tmp:
                save_trainer_checkpoint(tmp, trainer, exp.model_name)
            if improved:
                with atomic_directory(ckpt / "best") as tmp:
                    shutil.copytree(ckpt / "last", tmp, dirs_exist_ok=True)
        if after_epoch is not None:
            after_epoch(metrics, ckpt if saved else None)

    return trainer.fit(on_epoch_end)
