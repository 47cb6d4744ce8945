"""``load_dataset``: one entry point over every source format, plus the Beauty benchmark reader.

The Beauty files (S3-Rec's ``Beauty.txt`` and an item table) are already filtered, time
ordered and numbered ``1..N``, so they are read exactly as given: no k-core, no renumbering.
The raw-file readers live in ``readers_amazon.py``, ``readers_movielens.py`` and
``readers_table.py``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from recsys.data.build import require_file
from recsys.data.config import FORMATS, DataConfig
from recsys.data.readers_amazon import read_amazon2014
from recsys.data.readers_movielens import read_movielens
from recsys.data.readers_table import read_table
from recsys.data.schema import DataFormatError, InteractionData
from recsys.data.synthetic import generate_synthetic

BEAUTY_SEQUENCES = "sequences.txt"
BEAUTY_ITEMS = "items.jsonl"
_OPTIONAL_TEXT = ("title", "brand")


def read_beauty(cfg: DataConfig) -> InteractionData:
    """Read ``sequences.txt`` + ``items.jsonl`` from the directory ``cfg.path`` unchanged."""
    root = Path(cfg.path)
    items = _read_beauty_items(require_file(root / BEAUTY_ITEMS))
    sequences = _read_beauty_sequences(require_file(root / BEAUTY_SEQUENCES), len(items))
    data = InteractionData(items=items, sequences=sequences, stats={"source": "beauty", "dropped": {}})
    data.validate(str(root))
    return data


def _read_beauty_items(path: Path) -> pd.DataFrame:
    """items.jsonl -> items frame sorted by item_id; ids must be exactly 1..N."""
    rows: list[dict] = []
    first_line: dict[int, int] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = _parse_beauty_item(line, path, lineno)
            if row["item_id"] in first_line:
                raise DataFormatError(
                    path, f"duplicate item_id {row['item_id']} (first on line {first_line[row['item_id']]})", lineno
                )
            first_line[row["item_id"]] = lineno
            rows.append(row)
    ids = set(first_line)
    expected = set(range(1, len(ids) + 1))
    if ids != expected:
        missing, extra = sorted(expected - ids)[:5], sorted(ids - expected)[:5]
        raise DataFormatError(
            path, f"item ids must be exactly 1..{len(ids)}; missing {missing}, unexpected {extra} (first 5 shown)"
        )
    rows.sort(key=lambda r: r["item_id"])
    items = pd.DataFrame(rows, columns=["item_id", "raw_id", "title", "brand", "categories"])
    items["item_id"] = items["item_id"].astype(np.int64)
    for column in _OPTIONAL_TEXT:  # keep None (not NaN) for missing text, as every reader does
        items[column] = pd.Series([r[column] for r in rows], dtype=object)
    return items


def _parse_beauty_item(line: str, path: Path, lineno: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataFormatError(path, f"not valid JSON ({err.msg})", lineno) from None
    if not isinstance(record, dict):
        raise DataFormatError(path, "each line must be a JSON object", lineno)
    for key in ("item_id", "asin"):
        if key not in record:
            raise DataFormatError(path, f"missing {key!r}", lineno)
    item_id = record["item_id"]
    if not isinstance(item_id, int) or isinstance(item_id, bool):
        raise DataFormatError(path, f"item_id must be an integer, got {item_id!r}", lineno)
    for key in _OPTIONAL_TEXT:
        if not isinstance(record.get(key), (str, type(None))):
            raise DataFormatError(path, f"{key} must be a string or null, got {record[key]!r}", lineno)
    categories = record.get("categories") or []
    if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
        raise DataFormatError(path, f"categories must be a list of strings, got {categories!r}", lineno)
    return {
        "item_id": item_id,
        "raw_id": str(record["asin"]),
        "title": record.get("title"),
        "brand": record.get("brand"),
        "categories": categories,
    }


def _read_beauty_sequences(path: Path, n_items: int) -> pd.DataFrame:
    """sequences.txt (``user item item ...`` per line) -> user_id + item_ids arrays."""
    users: list[str] = []
    sequences: list[np.ndarray] = []
    first_line: dict[str, int] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            tokens = line.split()
            if not tokens:
                continue
            user = tokens[0]
            if len(tokens) == 1:
                raise DataFormatError(path, f"user {user!r} has no items", lineno)
            if user in first_line:
                raise DataFormatError(path, f"duplicate user {user!r} (first on line {first_line[user]})", lineno)
            first_line[user] = lineno
            try:
                seq = np.array([int(t) for t in tokens[1:]], dtype=np.int64)
            except ValueError:
                bad = next(t for t in tokens[1:] if not _is_int(t))
                raise DataFormatError(path, f"item id {bad!r} is not an integer", lineno) from None
            if seq.min() < 1 or seq.max() > n_items:
                bad_id = int(seq[(seq < 1) | (seq > n_items)][0])
                raise DataFormatError(path, f"item id {bad_id} is not in {BEAUTY_ITEMS} (ids 1..{n_items})", lineno)
            users.append(user)
            sequences.append(seq)
    return pd.DataFrame({"user_id": users, "item_ids": sequences})


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def _read_synthetic(cfg: DataConfig) -> InteractionData:
    return generate_synthetic(cfg.synthetic)


READERS: dict[str, Callable[[DataConfig], InteractionData]] = {
    "synthetic": _read_synthetic,
    "beauty": read_beauty,
    "amazon2014": read_amazon2014,
    "movielens": read_movielens,
    "table": read_table,
}
assert set(READERS) == set(FORMATS), "every format in DataConfig needs a reader"


def load_dataset(cfg: DataConfig) -> InteractionData:
    """Read the dataset ``cfg`` describes into the canonical, validated form."""
    if cfg.format != "synthetic":
        if not cfg.path:
            raise ValueError(f"data.path is required for format {cfg.format!r} (only 'synthetic' needs none)")
        if not Path(cfg.path).exists():
            raise FileNotFoundError(f"data.path {cfg.path} does not exist")
    return READERS[cfg.format](cfg)
