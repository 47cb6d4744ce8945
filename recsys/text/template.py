"""Item text: render each item's fields into one string for a sentence encoder.

A template is a list of segments such as ``"Brand: {brand}"``. A segment whose fields are
missing for an item is dropped rather than rendered as ``"Brand: None"``, so the encoder never
reads placeholder words that make unrelated items look alike.
"""

from __future__ import annotations

import hashlib
import math
import re
import string
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from recsys.config import require, require_choice

_SPACES = re.compile(r"\s+")
_MAX_LISTED = 10  # offending item ids named in an error message


@dataclass
class ItemTextConfig:
    """How an item's text is built.

    template: segments joined with ``separator``; each names item columns in ``{braces}``.
    on_empty: what to do with an item whose text comes out empty: ``error`` raises,
        ``raw_id`` uses ``"item <raw_id>"``.
    missing_values: strings that count as missing (compared case-insensitively), because
        catalogues write "Unknown" or "None" where they mean no value.
    """

    template: list[str] = field(default_factory=lambda: ["{title}", "Brand: {brand}", "Categories: {categories}"])
    separator: str = ". "
    on_empty: str = "error"
    missing_values: list[str] = field(default_factory=lambda: ["unknown", "none", "null", "nan", "n/a"])

    def __post_init__(self) -> None:
        require(isinstance(self.template, list) and len(self.template) > 0,
                f"embed.text.template must be a non-empty list of segments, got {self.template!r}")
        for segment in self.template:
            require(isinstance(segment, str) and bool(template_fields(segment)),
                    f"embed.text.template segment {segment!r} must be a string naming at least one {{field}}")
        require(isinstance(self.separator, str), f"embed.text.separator must be a string, got {self.separator!r}")
        require_choice("embed.text.on_empty", self.on_empty, ("error", "raw_id"))
        self.missing_values = [str(v).strip().lower() for v in self.missing_values]


def template_fields(segment: str) -> list[str]:
    """The field names of one segment: ``"Brand: {brand}"`` -> ``["brand"]``."""
    try:
        parsed = list(string.Formatter().parse(segment))
    except ValueError as err:
        raise ValueError(f"embed.text.template segment {segment!r} is not a valid format string: {err}") from None
    names = [name for _, name, _, _ in parsed if name is not None]
    for name in names:
        require(name.isidentifier(),
                f"embed.text.template segment {segment!r}: field {name!r} must be a plain column name")
    return names


def build_texts(items: pd.DataFrame, cfg: ItemTextConfig) -> list[str]:
    """One text per row of ``items`` (same order). Raises ValueError on unknown fields or
    (with ``on_empty="error"``) on items whose text is empty."""
    fields = [template_fields(segment) for segment in cfg.template]
    unknown = sorted({name for names in fields for name in names} - set(items.columns))
    if unknown:
        raise ValueError(f"embed.text.template names field(s) {unknown} that the items do not have; "
                         f"available columns: {list(items.columns)}")
    missing = set(cfg.missing_values)
    columns = {name: items[name].tolist() for names in fields for name in names}
    texts = []
    for row in range(len(items)):
        segments = []
        for segment, names in zip(cfg.template, fields):
            values = {name: render_value(columns[name][row], missing) for name in names}
            if all(values.values()):
                segments.append(normalize_space(segment.format(**values)))
        texts.append(cfg.separator.join(s for s in segments if s).strip())
    return _fill_empty(texts, items, cfg)


def render_value(value: Any, missing: set[str] = frozenset()) -> str:
    """A field value as text; ``""`` when missing. Lists (also nested, or numpy arrays from
    parquet) are flattened and joined with ", "."""
    if isinstance(value, (list, tuple, np.ndarray)):
        parts = [render_value(v, missing) for v in value]
        return ", ".join(p for p in parts if p)
    if value is None or value is pd.NA or value is pd.NaT:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    text = normalize_space(str(value))
    return "" if text.lower() in missing else text


def normalize_space(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def text_hash(text: str) -> str:
    """A short stable hash of ``text`` (16 hex chars of blake2b), the key for reusing vectors."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def _fill_empty(texts: list[str], items: pd.DataFrame, cfg: ItemTextConfig) -> list[str]:
    empty = [row for row, text in enumerate(texts) if not text]
    if not empty:
        return texts
    ids = items["item_id"].tolist() if "item_id" in items.columns else list(range(len(items)))
    if cfg.on_empty == "error":
        shown = [ids[row] for row in empty[:_MAX_LISTED]]
        raise ValueError(f"{len(empty)} item(s) have empty text under embed.text.template {cfg.template} "
                         f"(item ids {shown}{' ...' if len(empty) > _MAX_LISTED else ''}); fill their fields "
                         "or set embed.text.on_empty=raw_id")
    raw = items["raw_id"].tolist() if "raw_id" in items.columns else ids
    for row in empty:
        texts[row] = f"item {raw[row]}"
    return texts
