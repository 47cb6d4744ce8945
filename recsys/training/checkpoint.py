"""Checkpoints that carry their config and load without unpickling arbitrary objects.

A checkpoint directory holds ``model.safetensors`` (weights), ``model.json`` (model name,
model config, catalogue size, history length) and, for resuming, ``train_state.pt`` (optimizer,
scheduler and loop counters, loaded with ``weights_only=True``).

Models built with context (``build_model(..., **context)``, e.g. TIGER's semantic-ID table)
keep that data in their weights and describe it through the contract's two hooks:
``model.checkpoint_context() -> dict`` is written to model.json under ``context``, and
``ModelClass.context_from_checkpoint(context, weights) -> dict`` turns it back into the
keyword arguments of ``build_model`` (both empty for SASRec). Weights saved in an earlier
layout of a model class are mapped by ``ModelClass.upgrade_state`` on load.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from recsys.models import SequenceModel, build_model, get_spec, with_inference_settings

WEIGHTS = "model.safetensors"
MODEL_META = "model.json"
TRAIN_STATE = "train_state.pt"


def save_checkpoint(directory: str | Path, model: SequenceModel, model_name: str, train_state: dict | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS))
    meta = {
        "name": model_name,
        "config": dataclasses.asdict(model.config),
        "n_items": model.n_items,
        "max_len": model.max_len,
    }
    context = model.checkpoint_context()
    if context:
        meta["context"] = context
    (directory / MODEL_META).write_text(json.dumps(meta, indent=2))
    if train_state is not None:
        torch.save(train_state, directory / TRAIN_STATE)
    return directory


def load_model(directory: str | Path, device: str | torch.device = "cpu",
               inference: dict[str, Any] | None = None) -> SequenceModel:
    """Rebuild a model from its checkpoint directory alone. ``inference``: some of the model's
    inference settings (``Capabilities.inference_settings``, e.g. ``{"fusion": "behavior"}``)
    changed from the checkpoint's; any other key is refused."""
    directory = Path(directory)
    for name in (WEIGHTS, MODEL_META):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} is missing; not a model checkpoint directory")
    meta = json.loads((directory / MODEL_META).read_text())
    name, config = with_inference_settings({"name": meta["name"], **meta["config"]}, inference)
    try:  # safetensors holds tensors only: nothing in it is ever executed on load (no pickle)
        weights = load_file(str(directory / WEIGHTS), device=str(device))
    except Exception as err:  # SafetensorError is not exported under a stable name
        raise ValueError(f"{directory / WEIGHTS} is not a valid safetensors file ({err}); checkpoints are "
                         "loaded weights-only and are never unpickled") from err
    model_cls = get_spec(name).model_cls
    weights = model_cls.upgrade_state(weights)
    context = model_cls.context_from_checkpoint(meta.get("context", {}), weights)
    model = build_model(name, config, n_items=meta["n_items"], max_len=meta["max_len"], **context)
    model.load_state_dict(weights)
    return model.to(device).eval()


def upgrade_state(model_name: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state_dict of model ``model_name`` in any earlier weight layout -> today's layout."""
    return get_spec(model_name).model_cls.upgrade_state(weights)


def load_train_state(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / TRAIN_STATE
    return torch.load(path, weights_only=True) if path.is_file() else None
