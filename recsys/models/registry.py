"""Name -> (config class, model class), after peft's ``register_peft_method``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from recsys.config import from_dict
from recsys.models.base import SequenceModel


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_cls: type
    model_cls: type[SequenceModel]


_MODELS: dict[str, ModelSpec] = {}


def register_model(name: str, config_cls: type, model_cls: type[SequenceModel]) -> None:
    if name in _MODELS:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = ModelSpec(name, config_cls, model_cls)


def model_names() -> list[str]:
    return sorted(_MODELS)


def get_spec(name: str) -> ModelSpec:
    if name not in _MODELS:
        raise ValueError(f"model.name={name!r} is not allowed; choose one of {model_names()}")
    return _MODELS[name]


def model_config_from_dict(section: dict[str, Any]) -> tuple[str, Any]:
    """``{"name": "sasrec", "d_model": 64}`` -> ("sasrec", SASRecConfig(d_model=64))."""
    section = dict(section or {})
    if "name" not in section:
        raise ValueError(f"model.name is required; choose one of {model_names()}")
    name = section.pop("name")
    return name, from_dict(get_spec(name).config_cls, section, "model")


def with_inference_settings(section: dict[str, Any], settings: dict[str, Any] | None,
                            where: str = "inference") -> tuple[str, Any]:
    """A trained model's config section with some of its inference settings changed (the keys its
    class names in ``capabilities.inference_settings``), validated as any config is. Any other key
    would change what the weights mean, so it is refused, naming ``where``."""
    section = dict(section)
    name = section.get("name")
    allowed = get_spec(name).model_cls.capabilities.inference_settings if name in _MODELS else ()
    settings = dict(settings or {})
    wrong = sorted(set(settings) - set(allowed))
    if wrong:
        raise ValueError(f"{where}: {wrong} cannot change once model.name={name!r} is trained; its inference settings "
                         f"are {list(allowed) or 'none'}")
    return model_config_from_dict({**section, **settings})


def build_model(name: str, config: Any, n_items: int, max_len: int, **context: Any) -> SequenceModel:
    """``context``: data a model needs besides its config, passed as keyword arguments, e.g.
    TIGER's ``semantic_ids`` table. Atomic-ID models take none."""
    return get_spec(name).model_cls(config, n_items=n_items, max_len=max_len, **context)
