"""Raw interactions + an item table -> ``InteractionData``; shared by every raw-file reader.

Readers only parse their files into one frame with columns ``user``, ``item`` (the raw ids, as
str) and ``time`` (int64), one row per interaction in file order. This module does the rest,
vectorised, once:

1. drop repeated (user, item) pairs, keeping the earliest (ties: the first in the file);
2. iterative k-core: drop users and items with fewer than ``k`` interactions until none is left;
3. order each user's items by time, stably (ties keep file order);
4. number items ``1..N`` by first appearance when users are walked in order of their first
   appearance in the file and each user's items in time order. This is the rule of S3-Rec's
   ``data_process.py``, which produced the Beauty benchmark files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recsys.data.schema import DataFormatError, InteractionData


@dataclass
class Filtered:
    """Interactions after dedupe and k-core, sorted by (user, time).

    users: raw user ids, one per kept user, in order. item_raw_ids: raw id of item ``i + 1``.
    user_index / item_ids / times: per interaction (item_ids are the dense ids ``1..N``).
    """

    users: np.ndarray
    item_raw_ids: np.ndarray
    user_index: np.ndarray
    item_ids: np.ndarray
    times: np.ndarray
    dropped: dict[str, int]
    stats: dict


def filter_interactions(frame: pd.DataFrame, min_interactions: int) -> Filtered:
    """Dedupe, k-core filter, time-sort and densely number ``frame`` (columns user, item, time)."""
    n = len(frame)
    user_code, user_names = pd.factorize(frame["user"], sort=False)
    item_code, item_names = pd.factorize(frame["item"], sort=False)
    times = frame["time"].to_numpy(dtype=np.int64)
    # lexsort's last key is the primary one: user (first appearance), then time, then file order.
    order = np.lexsort((np.arange(n), times, user_code))
    u, i, t = user_code[order], item_code[order], times[order]

    pair = u.astype(np.int64) * max(len(item_names), 1) + i
    first = ~pd.Series(pair).duplicated(keep="first").to_numpy()
    u, i, t = u[first], i[first], t[first]
    n_duplicates = int(n - first.sum())

    keep = _k_core(u, i, len(user_names), len(item_names), min_interactions)
    u, i, t = u[keep], i[keep], t[keep]

    dense_user, user_rank = pd.factorize(u, sort=False)
    dense_item, item_rank = pd.factorize(i, sort=False)
    return Filtered(
        users=np.asarray(user_names)[user_rank].astype(str),
        item_raw_ids=np.asarray(item_names)[item_rank].astype(str),
        user_index=dense_user.astype(np.int64),
        item_ids=dense_item.astype(np.int64) + 1,
        times=t,
        dropped={"duplicate_user_item": n_duplicates, "k_core_interactions": int(len(keep) - keep.sum())},
        stats={
            "raw_interactions": int(n),
            "k_core": {
                "min_interactions": int(min_interactions),
                # dedupe never removes a user's last row, so every raw user reaches the k-core.
                "users_removed": len(user_names) - len(user_rank),
                "items_removed": len(item_names) - len(item_rank),
            },
        },
    )


def _k_core(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, k: int) -> np.ndarray:
    """Mask of interactions that survive iterative ``k``-core filtering on users and items."""
    keep = np.ones(len(users), dtype=bool)
    if k <= 1:
        return keep
    while True:
        user_count = np.bincount(users[keep], minlength=n_users)
        item_count = np.bincount(items[keep], minlength=n_items)
        new_keep = keep & (user_count[users] >= k) & (item_count[items] >= k)
        if new_keep.sum() == keep.sum():
            return keep
        keep = new_keep


def assemble(
    filtered: Filtered,
    item_table: pd.DataFrame | None,
    *,
    source: str,
    where: str,
    list_fields: Sequence[str] = (),
) -> InteractionData:
    """Join the item table onto the dense ids and cut per-user sequences.

    item_table: ``raw_id`` (unique str) plus text fields; items it lacks get None, or ``[]`` for
        ``list_fields``, and are counted in ``stats["items_without_metadata"]``. Its rows for
        items without interactions are counted in ``dropped["item_rows_without_interactions"]``.
    """
    if len(filtered.item_ids) == 0:
        k = filtered.stats["k_core"]["min_interactions"]
        raise DataFormatError(where, f"no interactions are left after filtering (dropped: {filtered.dropped}, k-core {k})")
    dropped = dict(filtered.dropped)
    stats = {"source": source, **filtered.stats}
    items = pd.DataFrame(
        {"item_id": np.arange(1, len(filtered.item_raw_ids) + 1, dtype=np.int64), "raw_id": filtered.item_raw_ids}
    )
    if item_table is not None:
        table = item_table.set_index("raw_id")
        matched = table.index.isin(items["raw_id"])
        dropped["item_rows_without_interactions"] = int((~matched).sum())
        present = items["raw_id"].isin(table.index).to_numpy()
        stats["items_without_metadata"] = int((~present).sum())
        joined = table.reindex(items["raw_id"])
        for column in table.columns:
            # An explicit object Series: pandas 3 would turn None into NaN in an inferred str column.
            values = _fill_missing(joined[column].to_numpy(dtype=object), column in list_fields)
            items[column] = pd.Series(values, dtype=object)
    stats["dropped"] = dropped
    data = InteractionData(items=items, sequences=_sequences(filtered), stats=stats)
    data.validate(where)
    return data


def build_dataset(
    frame: pd.DataFrame,
    item_table: pd.DataFrame | None,
    *,
    source: str,
    where: str,
    min_interactions: int,
    list_fields: Sequence[str] = (),
) -> InteractionData:
    """``filter_interactions`` then ``assemble``; the whole path for readers with small item tables."""
    filtered = filter_interactions(frame, min_interactions)
    return assemble(filtered, item_table, source=source, where=where, list_fields=list_fields)


def _fill_missing(values: np.ndarray, is_list: bool) -> np.ndarray:
    """Object array where missing values are None, or ``[]`` for list fields (arrays -> lists)."""
    out = np.empty(len(values), dtype=object)
    for row, value in enumerate(values):
        if isinstance(value, (list, tuple, np.ndarray)):
            out[row] = list(value)
        elif pd.isna(value):
            out[row] = [] if is_list else None
        else:
            out[row] = value
    return out


def _sequences(filtered: Filtered) -> pd.DataFrame:
    counts = np.bincount(filtered.user_index, minlength=len(filtered.users))
    cuts = np.cumsum(counts)[:-1]
    return pd.DataFrame(
        {
            "user_id": filtered.users,
            "item_ids": np.split(filtered.item_ids, cuts),
            "timestamps": np.split(filtered.times, cuts),
        }
    )


def require_file(path: Path) -> Path:
    """``path`` if it is a file, else FileNotFoundError naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    return path


def parse_int_column(values: pd.Series, path: str | Path, name: str, lines: np.ndarray | None) -> np.ndarray:
    """Parse ``values`` as int64, or raise naming the first bad value and its line.

    lines: the file line number of each row; None for files without lines (parquet), where
        the message names the 0-based row instead.
    """
    if pd.api.types.is_integer_dtype(values.dtype) and not values.isna().any():
        return values.to_numpy(dtype=np.int64)
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(numbers) | (numbers != np.floor(numbers))
    if bad.any():
        row = int(bad.argmax())
        message = f"{name} must be an integer, got {values.iloc[row]!r}"
        if lines is None:
            raise DataFormatError(path, f"row {row}: {message}")
        raise DataFormatError(path, message, int(lines[row]))
    return numbers.astype(np.int64)
