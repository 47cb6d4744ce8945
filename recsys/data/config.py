"""Configuration of the data stage: which source to read and how to filter it."""

from __future__ import annotations

from dataclasses import dataclass, field

from recsys.config import require, require_choice, require_range

FORMATS = ("synthetic", "beauty", "amazon2014", "movielens", "table")


@dataclass
class SyntheticConfig:
    """The generated demo dataset (see ``recsys.data.synthetic``)."""

    n_users: int = 2000
    n_items: int = 500
    n_topics: int = 10
    min_length: int = 5
    max_length: int = 30
    stay_probability: float = 0.8  # probability that the next item stays in the current topic
    seed: int = 0
    # Opt-in: the gap before each event says whether the user stays in the topic (short gap) or
    # switches (long gap); see ``recsys.data.synthetic``. Off keeps the data exactly as before.
    time_signal: bool = False
    # Which signal: "gap" (the gap before an event says that step's move: only the target's own
    # time tells the next move) or "pace" (a user's persistent mode, focused or browsing, sets
    # both the gaps and the moves: the gaps between past events predict the next move) or "decay"
    # (the next item returns to an earlier item's subtopic with a pull that fades with its age in
    # time: which past items count depends on the gaps between them, not on their positions) or
    # "session" (a move to another topic after a short gap is a detour the user returns from, after
    # a long gap a new interest that goes on: the gap before the last event says which)
    time_signal_kind: str = "gap"

    def __post_init__(self) -> None:
        require_range("synthetic.n_users", self.n_users, 10)
        require_range("synthetic.n_items", self.n_items, 20)
        require_range("synthetic.n_topics", self.n_topics, 2, self.n_items // 2)
        require_range("synthetic.min_length", self.min_length, 3)
        # A user never repeats an item, so no sequence can be longer than the catalogue.
        require_range("synthetic.max_length", self.max_length, self.min_length, self.n_items)
        require_range("synthetic.stay_probability", self.stay_probability, 0.0, 1.0)
        require(isinstance(self.time_signal, bool),
                f"synthetic.time_signal must be true or false, got {self.time_signal!r}")
        require_choice("synthetic.time_signal_kind", self.time_signal_kind, ("gap", "pace", "decay", "session"))


@dataclass
class TableConfig:
    """Column names of a generic interaction table (CSV or parquet)."""

    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str = "timestamp"
    items_path: str | None = None  # optional item table whose other columns become item fields
    items_id_col: str = "item_id"

    def __post_init__(self) -> None:
        for name in ("user_col", "item_col", "time_col", "items_id_col"):
            value = getattr(self, name)
            ok = isinstance(value, str) and value != ""
            require(ok, f"table.{name} must be a non-empty column name, got {value!r}")
        require(
            self.items_path is None or (isinstance(self.items_path, str) and self.items_path != ""),
            f"table.items_path must be a file path or null, got {self.items_path!r}",
        )


@dataclass
class DataConfig:
    """Which dataset to load. ``path`` is needed by every format except ``synthetic``.

    path: a directory for beauty, amazon2014 and movielens; a CSV or parquet file for table.
    category: amazon2014 reads ``reviews_<category>_5.json.gz`` and ``meta_<category>.json.gz``.
    min_interactions: k-core threshold for users and items (amazon2014, movielens, table);
        1 disables it. The beauty files are already 5-core and are read as they are.
    max_history: history cap used by the split; kept here because it is part of the protocol.
    """

    format: str = "synthetic"
    path: str | None = None
    category: str = "Beauty"
    min_interactions: int = 5
    max_history: int = 20
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    table: TableConfig = field(default_factory=TableConfig)

    def __post_init__(self) -> None:
        require_choice("data.format", self.format, FORMATS)
        require(
            isinstance(self.category, str) and self.category.strip() != "",
            f"data.category must be a non-empty Amazon category such as 'Beauty', got {self.category!r}",
        )
        require_range("data.min_interactions", self.min_interactions, 1)
        require_range("data.max_history", self.max_history, 1)
        for key, value in (("data.path", self.path), ("data.table.items_path", self.table.items_path)):
            require(value is None or "://" not in str(value),
                    f"{key}={value} is a URI; allowed: a filesystem path (on a cluster, a shared filesystem "
                    "mounted at the same path on every node, or copy the files there first); object-store URIs "
                    "are not read")
