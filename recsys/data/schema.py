"""The canonical dataset form every reader produces.

An item table (dense integer ids ``1..N``; 0 is reserved for padding) with the item's text
fields, and one time-ordered interaction sequence per user. Both persist as parquet so that
later stages (embedding, semantic IDs, training) read one format whatever the source was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

ITEMS_FILE = "items.parquet"
SEQUENCES_FILE = "sequences.parquet"
STATS_FILE = "stats.json"


class DataFormatError(ValueError):
    """Bad input data. The message names the file and, where there is one, the line."""

    def __init__(self, path: str | Path, message: str, line: int | None = None):
        where = f"{path}" if line is None else f"{path}, line {line}"
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line


@dataclass
class InteractionData:
    """Items plus per-user sequences, the form every stage reads.

    items: one row per item. ``item_id`` (int64, exactly ``1..N``), ``raw_id`` (str, the id in
        the source data) and any text fields (``title``, ``brand``, ``categories`` ...).
    sequences: one row per user. ``user_id`` (str), ``item_ids`` (list of int item ids in time
        order) and, when the source has them, ``timestamps`` (list of int, same length).
    stats: counts for the summary, including ``dropped`` = {reason: number of rows}.
    """

    items: pd.DataFrame
    sequences: pd.DataFrame
    stats: dict = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    def item_sequences(self) -> list[np.ndarray]:
        """Each user's item ids as an int64 array, in time order."""
        return [np.asarray(s, dtype=np.int64) for s in self.sequences["item_ids"]]

    @property
    def has_timestamps(self) -> bool:
        return "timestamps" in self.sequences.columns

    def time_sequences(self) -> list[np.ndarray] | None:
        """Each user's event times (int64 seconds, aligned with ``item_sequences``), or None
        when the source has none (Beauty's S3-Rec files)."""
        if not self.has_timestamps:
            return None
        return [np.asarray(t, dtype=np.int64) for t in self.sequences["timestamps"]]

    def validate(self, source: str = "dataset") -> None:
        """Raise DataFormatError unless items are ``1..N``, every sequence uses known ids and, when
        there are timestamps, each user's are as many as their items and never decrease (ties are
        allowed: sources record days or seconds)."""
        ids = self.items["item_id"].to_numpy()
        if len(ids) == 0:
            raise DataFormatError(source, "the item table is empty")
        if not np.array_equal(np.sort(ids), np.arange(1, len(ids) + 1)):
            raise DataFormatError(source, "item ids must be exactly 1..N with no gaps or duplicates")
        if len(self.sequences) == 0:
            raise DataFormatError(source, "there are no user sequences")
        for row, seq in enumerate(self.sequences["item_ids"]):
            seq = np.asarray(seq)
            if len(seq) == 0:
                raise DataFormatError(source, f"user {self.sequences['user_id'].iat[row]!r} has an empty sequence")
            if seq.min() < 1 or seq.max() > len(ids):
                raise DataFormatError(source, f"user {self.sequences['user_id'].iat[row]!r} has an item id outside 1..{len(ids)}")
        if self.has_timestamps:
            self._validate_timestamps(source)

    def _validate_timestamps(self, source: str) -> None:
        for row, (seq, times) in enumerate(zip(self.sequences["item_ids"], self.sequences["timestamps"])):
            user = self.sequences["user_id"].iat[row]
            times = np.asarray(times)
            if len(times) != len(seq):
                raise DataFormatError(source, f"user {user!r} has {len(times)} timestamps for {len(seq)} items")
            back = np.flatnonzero(np.diff(times) < 0)
            if len(back):
                pos = int(back[0]) + 1
                raise DataFormatError(source, f"user {user!r}: timestamps decrease at position {pos} "
                                      f"({int(times[pos - 1])} then {int(times[pos])}); events must be in time order")

    def stats_with_counts(self) -> dict:
        lengths = self.sequences["item_ids"].map(len)
        return {
            **self.stats,
            "n_users": int(self.n_users),
            "n_items": int(self.n_items),
            "n_interactions": int(lengths.sum()),
            "mean_length": round(float(lengths.mean()), 3),
        }

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.items.to_parquet(directory / ITEMS_FILE, index=False)
        self.sequences.to_parquet(directory / SEQUENCES_FILE, index=False)
        (directory / STATS_FILE).write_text(json.dumps(self.stats_with_counts(), indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> "InteractionData":
        directory = Path(directory)
        for name in (ITEMS_FILE, SEQUENCES_FILE):
            if not (directory / name).is_file():
                raise DataFormatError(directory / name, "missing; is this a `recsys data` run directory?")
        items = pd.read_parquet(directory / ITEMS_FILE)
        sequences = pd.read_parquet(directory / SEQUENCES_FILE)
        sequences["item_ids"] = sequences["item_ids"].map(lambda s: np.asarray(s, dtype=np.int64))
        stats = json.loads((directory / STATS_FILE).read_text()) if (directory / STATS_FILE).is_file() else {}
        data = cls(items=items, sequences=sequences, stats=stats)
        data.validate(str(directory))
        return data
