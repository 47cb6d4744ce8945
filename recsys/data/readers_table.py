"""A generic interaction table (CSV or parquet) with an optional item table.

Column names come from ``TableConfig``. Ids are compared as strings. CSV line numbers count
the header as line 1 and assume one record per line (no quoted newlines); parquet has no
lines, so messages name the 0-based row instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from recsys.data.build import build_dataset, parse_int_column, require_file
from recsys.data.config import DataConfig
from recsys.data.schema import DataFormatError, InteractionData

CSV_SUFFIXES = (".csv", ".csv.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")


def read_table(cfg: DataConfig) -> InteractionData:
    """Interactions (user, item, time columns) -> dedupe, k-core, time order; items -> fields."""
    path = require_file(Path(cfg.path))
    columns = cfg.table
    frame, lines = read_any_table(path)
    for column in (columns.user_col, columns.item_col, columns.time_col):
        _require_column(frame, column, path)
    interactions = pd.DataFrame(
        {
            "user": _id_column(frame[columns.user_col], path, columns.user_col, lines),
            "item": _id_column(frame[columns.item_col], path, columns.item_col, lines),
            "time": parse_int_column(frame[columns.time_col], path, columns.time_col, lines),
        }
    )
    item_table, list_fields = None, ()
    if columns.items_path:
        item_table, list_fields = _read_items(require_file(Path(columns.items_path)), columns.items_id_col)
        _check_items_known(interactions["item"], item_table["raw_id"], path, lines)
    return build_dataset(
        interactions,
        item_table,
        source="table",
        where=str(path),
        min_interactions=cfg.min_interactions,
        list_fields=list_fields,
    )


def read_any_table(path: Path) -> tuple[pd.DataFrame, np.ndarray | None]:
    """Read a CSV (all columns as str) or parquet file; also each row's line number (CSV only)."""
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return pd.read_parquet(path), None
    if not name.endswith(CSV_SUFFIXES):
        raise ValueError(f"{path}: a table must be {' or '.join(CSV_SUFFIXES + PARQUET_SUFFIXES)}, judged by its name")
    try:
        # Blank lines are kept as all-missing rows so that row i stays on line i + 2.
        frame = pd.read_csv(path, dtype=str, skip_blank_lines=False)
    except pd.errors.EmptyDataError:
        raise DataFormatError(path, "the file is empty (a header line is required)") from None
    except pd.errors.ParserError as err:
        raise DataFormatError(path, f"not a valid CSV: {err}") from None
    lines = np.arange(len(frame), dtype=np.int64) + 2
    blank = frame.isna().all(axis=1).to_numpy()
    return frame.loc[~blank].reset_index(drop=True), lines[~blank]


def _require_column(frame: pd.DataFrame, column: str, path: Path) -> None:
    if column not in frame.columns:
        raise DataFormatError(path, f"missing column {column!r}; the columns are {list(frame.columns)}")


def _where(row: int, lines: np.ndarray | None) -> tuple[str, int | None]:
    """Message prefix and line for DataFormatError: CSV has lines, parquet only rows."""
    return ("", int(lines[row])) if lines is not None else (f"row {row}: ", None)


def _id_column(values: pd.Series, path: Path, name: str, lines: np.ndarray | None) -> pd.Series:
    """Ids as str; missing ids are an error. Integral floats (parquet with nulls) lose the '.0'."""
    missing = values.isna().to_numpy()
    if missing.any():
        prefix, line = _where(int(missing.argmax()), lines)
        raise DataFormatError(path, f"{prefix}missing value in column {name!r}", line)
    if pd.api.types.is_float_dtype(values.dtype) and (values == np.floor(values)).all():
        values = values.astype(np.int64)
    return values.astype(str).str.strip()


def _read_items(path: Path, id_col: str) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """Item table -> ``raw_id`` + every other column as a field; also the list-valued columns."""
    frame, lines = read_any_table(path)
    _require_column(frame, id_col, path)
    ids = _id_column(frame[id_col], path, id_col, lines)
    duplicated = ids.duplicated().to_numpy()
    if duplicated.any():
        row = int(duplicated.argmax())
        first = int((ids == ids.iat[row]).to_numpy().argmax())
        prefix, line = _where(row, lines)
        first_where = f"line {lines[first]}" if lines is not None else f"row {first}"
        raise DataFormatError(path, f"{prefix}duplicate item id {ids.iat[row]!r} (first at {first_where})", line)
    # The canonical item_id and raw_id come from the id column, so same-named fields would clash.
    fields = frame.drop(columns=[c for c in frame.columns if c in (id_col, "item_id", "raw_id")]).astype(object)
    list_fields = tuple(c for c in fields.columns if fields[c].map(lambda v: isinstance(v, (list, np.ndarray))).any())
    return pd.concat([ids.rename("raw_id").astype(object), fields], axis=1), list_fields


def _check_items_known(items: pd.Series, known: pd.Series, path: Path, lines: np.ndarray | None) -> None:
    unknown = ~items.isin(known).to_numpy()
    if unknown.any():
        row = int(unknown.argmax())
        prefix, line = _where(row, lines)
        raise DataFormatError(
            path, f"{prefix}item id {items.iat[row]!r} is not in the item table (table.items_path)", line
        )
