"""The one interface every semantic-ID tokenizer honours, and the checks they share.

Shaped like vector-quantize-pytorch's ``ResidualVQ``: keyword-only constructors,
``fit(embeddings)``, ``encode(embeddings) -> LongTensor (N, L)`` and an exact
``decode(codes) -> (N, D)``. The collision level that makes IDs unique is not part of a
tokenizer; ``SemanticIdIndex`` adds it, so RQ-VAE and hierarchical k-means stay interchangeable.

A saved tokenizer is a directory: ``tokenizer.json`` (kind, config, shapes) plus
``tokenizer.safetensors`` (tensors). Nothing is pickled.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

META_FILE = "tokenizer.json"
TENSOR_FILE = "tokenizer.safetensors"
FORMAT_VERSION = 1

T = TypeVar("T", bound="SemanticIdTokenizer")
_TOKENIZERS: dict[str, type["SemanticIdTokenizer"]] = {}


def _row_list(rows: np.ndarray) -> str:
    return f"{rows[:10].tolist()}{' ...' if len(rows) > 10 else ''}"


def validate_embeddings(embeddings: Any, *, dim: int | None = None, min_items: int = 0,
                        name: str = "embeddings") -> np.ndarray:
    """Check and convert (N, D) embeddings to a C-contiguous float32 array.

    Raises ValueError for a non-2D input, a wrong D, fewer than ``min_items`` rows, or rows
    holding NaN/inf (the message names the count and the first 10 row indices).
    """
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().numpy()
    x = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))  # (N, D)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} have dimension {x.shape[1]}, expected {dim} (the dimension fitted on)")
    if x.shape[0] < min_items:
        raise ValueError(f"{name} hold {x.shape[0]} rows; at least {min_items} are needed")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if len(bad):
        raise ValueError(f"{name}: {len(bad)} row(s) contain NaN or inf, rows {_row_list(bad)}")
    return x


def validate_codes(codes: Any, codebook_sizes: list[int]) -> np.ndarray:
    """Check (N, L) integer codes against per-level codebook sizes; return int64 numpy."""
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    c = np.asarray(codes)
    if c.ndim != 2 or c.shape[1] != len(codebook_sizes):
        raise ValueError(f"codes must have shape (N, {len(codebook_sizes)}), got {tuple(c.shape)}")
    if c.size and not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {c.dtype}")
    c = c.astype(np.int64, copy=False)
    bad = np.flatnonzero(((c < 0) | (c >= np.asarray(codebook_sizes))).any(axis=1))
    if len(bad):
        raise ValueError(f"{len(bad)} code row(s) fall outside codebook sizes {codebook_sizes}, "
                         f"rows {_row_list(bad)}")
    return c


def register_tokenizer(kind: str):
    """Class decorator: name a tokenizer so ``load_tokenizer`` can rebuild it from its directory."""
    def wrap(cls: type[T]) -> type[T]:
        if kind in _TOKENIZERS:
            raise ValueError(f"tokenizer kind {kind!r} is already registered")
        cls.kind = kind
        _TOKENIZERS[kind] = cls
        return cls
    return wrap


def tokenizer_kinds() -> list[str]:
    return sorted(_TOKENIZERS)


class SemanticIdTokenizer(ABC):
    """Maps (N, D) content embeddings to (N, L) codes and back.

    Subclasses implement fit/encode/decode and ``_state``/``_from_state`` (JSON meta + tensors);
    ``save``/``load`` are shared.
    """

    kind: ClassVar[str] = ""

    @abstractmethod
    def fit(self: T, embeddings: np.ndarray) -> T:
        """Learn codebooks from embeddings (N, D) float32; returns self."""

    @abstractmethod
    def encode(self, embeddings: np.ndarray) -> torch.Tensor:
        """(N, D) embeddings -> (N, L) int64 codes, one per content level."""

    @abstractmethod
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, L) codes -> (N, D) float32; a deterministic function of the codes alone."""

    @property
    @abstractmethod
    def n_levels(self) -> int: ...

    @property
    @abstractmethod
    def codebook_sizes(self) -> list[int]: ...

    @property
    @abstractmethod
    def input_dim(self) -> int: ...

    @property
    def is_fitted(self) -> bool:
        return self.input_dim > 0

    def fit_encode(self, embeddings: np.ndarray) -> torch.Tensor:
        """Fit, then return the codes of the fitted items (N, L)."""
        return self.fit(embeddings).encode(embeddings)

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(embeddings) first")

    @abstractmethod
    def _state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """-> (JSON-able meta incl. "config", tensors) describing the fitted tokenizer."""

    @classmethod
    @abstractmethod
    def _from_state(cls: type[T], meta: dict, tensors: dict[str, torch.Tensor]) -> T: ...

    def save(self, directory: str | Path) -> Path:
        self._require_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta, tensors = self._state()
        meta = {"kind": self.kind, "format_version": FORMAT_VERSION, **meta}
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(directory / TENSOR_FILE))
        (directory / META_FILE).write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls: type[T], directory: str | Path) -> T:
        meta, tensors = _read(directory)
        if cls is not SemanticIdTokenizer and meta["kind"] != cls.kind:
            raise ValueError(f"{directory} holds a {meta['kind']!r} tokenizer, not {cls.kind!r}")
        return _TOKENIZERS[meta["kind"]]._from_state(meta, tensors)


def _read(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    directory = Path(directory)
    for name in (META_FILE, TENSOR_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} is missing; not a saved tokenizer directory")
    meta = json.loads((directory / META_FILE).read_text())
    if meta.get("kind") not in _TOKENIZERS:
        raise ValueError(f"{directory}: unknown tokenizer kind {meta.get('kind')!r}; known: {tokenizer_kinds()}")
    return meta, load_file(str(directory / TENSOR_FILE))


def load_tokenizer(directory: str | Path) -> SemanticIdTokenizer:
    """Rebuild whichever tokenizer a directory holds (RQ-VAE or hierarchical k-means)."""
    return SemanticIdTokenizer.load(directory)


C = TypeVar("C")


def make_config(cls: type[C], config: C | None, overrides: dict[str, Any]) -> C:
    """A tokenizer's config from either ``config=`` or keyword fields, never both."""
    if config is not None and overrides:
        raise ValueError(f"pass either config= or keyword fields, not both (got {sorted(overrides)})")
    return config if config is not None else cls(**overrides)
