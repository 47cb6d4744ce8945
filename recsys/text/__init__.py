"""Item content: text built from item fields, a sentence encoder, and the stored vectors."""

from dataclasses import dataclass, field

from recsys.text.encoder import (
    DEFAULT_MODEL,
    EncoderConfig,
    ModelIntegrityError,
    ModelLocation,
    ModelNotAvailable,
    encode,
    load_encoder,
    locate_model,
    resolve_model,
)
from recsys.text.store import EMBEDDINGS_FILE, load_embeddings, write_embeddings
from recsys.text.template import ItemTextConfig, build_texts, text_hash


@dataclass
class EmbedConfig:
    """The ``embed:`` section of an experiment: how item text is built and which encoder reads it."""

    text: ItemTextConfig = field(default_factory=ItemTextConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)


__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDINGS_FILE",
    "EmbedConfig",
    "EncoderConfig",
    "ItemTextConfig",
    "ModelIntegrityError",
    "ModelLocation",
    "ModelNotAvailable",
    "build_texts",
    "encode",
    "load_embeddings",
    "load_encoder",
    "locate_model",
    "resolve_model",
    "text_hash",
    "write_embeddings",
]
