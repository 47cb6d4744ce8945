"""Readers: each format from small files in tmp_path, its error messages and its dropped counts."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.data import DataConfig, DataFormatError, TableConfig, load_dataset
from recsys.data.build import filter_interactions
from recsys.data.config import FORMATS
from recsys.data.readers import READERS


def _seqs(data) -> dict[str, list[int]]:
    return {u: list(map(int, s)) for u, s in zip(data.sequences["user_id"], data.sequences["item_ids"])}


def _times(data) -> dict[str, list[int]]:
    return {u: list(map(int, s)) for u, s in zip(data.sequences["user_id"], data.sequences["timestamps"])}


def _raises(cfg: DataConfig, *fragments: str) -> None:
    with pytest.raises(DataFormatError) as info:
        load_dataset(cfg)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


# ---------------------------------------------------------------- load_dataset and config


def test_every_format_has_a_reader():
    assert set(READERS) == set(FORMATS)


def test_path_required_and_must_exist(tmp_path):
    with pytest.raises(ValueError, match="data.path is required"):
        load_dataset(DataConfig(format="beauty"))
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset(DataConfig(format="movielens", path=str(missing)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"format": "csv"}, "data.format"),
        ({"min_interactions": 0}, "data.min_interactions"),
        ({"max_history": 0}, "data.max_history"),
        ({"category": ""}, "data.category"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**kwargs)
    with pytest.raises(ValueError, match="table.user_col"):
        TableConfig(user_col="")


# ---------------------------------------------------------------- beauty

ITEMS = [
    {"item_id": 1, "asin": "A1", "title": "Nail polish", "brand": "OPI", "categories": ["Makeup", "Nails"]},
    {"item_id": 2, "asin": "A2", "title": None, "brand": None, "categories": []},
    {"item_id": 3, "asin": "A3", "title": "Cream", "brand": None, "categories": ["Skin Care"]},
]


def _beauty(tmp_path: Path, items: list[str] | None = None, sequences: str = "7 1 2 3\n9 3 1\n") -> DataConfig:
    lines = items if items is not None else [json.dumps(r) for r in ITEMS]
    (tmp_path / "items.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "sequences.txt").write_text(sequences)
    return DataConfig(format="beauty", path=str(tmp_path))


def test_beauty_reads_files_as_given(tmp_path):
    data = load_dataset(_beauty(tmp_path, items=[json.dumps(r) for r in reversed(ITEMS)]))
    assert data.items["item_id"].tolist() == [1, 2, 3]
    assert data.items["raw_id"].tolist() == ["A1", "A2", "A3"]
    assert data.items["title"].tolist() == ["Nail polish", None, "Cream"]
    assert data.items["brand"].tolist() == ["OPI", None, None]
    assert data.items["categories"].tolist() == [["Makeup", "Nails"], [], ["Skin Care"]]
    assert _seqs(data) == {"7": [1, 2, 3], "9": [3, 1]}
    assert data.stats == {"source": "beauty", "dropped": {}}


ITEM_1, ITEM_2, ITEM_3 = (json.dumps(r) for r in ITEMS)


@pytest.mark.parametrize(
    "items, sequences, fragments",
    [
        ([ITEM_1, '{"item_id": 2, "asin": ', ITEM_3], None, ["items.jsonl, line 2", "JSON"]),
        ([ITEM_1, '{"asin": "A2"}', ITEM_3], None, ["items.jsonl, line 2", "'item_id'"]),
        ([ITEM_1, ITEM_2, ITEM_2], None, ["items.jsonl, line 3", "duplicate item_id 2", "first on line 2"]),
        ([ITEM_1, ITEM_2, '{"item_id": 4, "asin": "A4"}'], None, ["items.jsonl", "exactly 1..3", "[3]", "[4]"]),
        (None, "7 1 2\n9 3 x 1\n", ["sequences.txt, line 2", "'x'"]),
        (None, "7 1 2\n9\n", ["sequences.txt, line 2", "no items"]),
        (None, "7 1 2\n9 3 9 1\n", ["sequences.txt, line 2", "item id 9", "items.jsonl"]),
        (None, "7 1 2\n9 3\n7 2\n", ["sequences.txt, line 3", "duplicate user '7'", "first on line 1"]),
    ],
)
def test_beauty_errors_name_file_and_line(tmp_path, items, sequences, fragments):
    cfg = _beauty(tmp_path, items=items, sequences=sequences or "7 1 2 3\n")
    _raises(cfg, *fragments)


def test_beauty_missing_file(tmp_path):
    (tmp_path / "items.jsonl").write_text(json.dumps(ITEMS[0]) + "\n")
    with pytest.raises(FileNotFoundError, match="sequences.txt"):
        load_dataset(DataConfig(format="beauty", path=str(tmp_path)))


# ---------------------------------------------------------------- amazon2014

# (user, asin, time) in file order. With k=2: (A, i2) repeats -> the earlier one (t=50) stays;
# round 1 drops D (1 item) and C-i3 (i3 has 1 user); then i4 has only E, so round 2 drops E-i4,
# and round 3 drops E-i1. A single pass would have kept E.
REVIEWS = [
    ("A", "i2", 300), ("A", "i1", 100), ("B", "i1", 200), ("A", "i2", 50), ("B", "i2", 200),
    ("C", "i3", 10), ("C", "i1", 20), ("D", "i4", 5), ("C", "i2", 30), ("E", "i4", 7), ("E", "i1", 8),
]
META = [
    {
        "asin": "i1",
        "title": "Nail's Polish",
        "brand": "OPI",
        "categories": [["Beauty", "Makeup", "Nails"], ["Beauty", "Tools"]],
    },
    {"asin": "i3", "title": "unused", "categories": [["Beauty"]]},
    {"asin": "i1", "title": "repeated row"},
    {"asin": "i9", "title": "not reviewed"},
]


def _gz(path: Path, lines: list[str]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")


def _review(user: str, asin: str, time: int) -> str:
    return json.dumps({"reviewerID": user, "asin": asin, "overall": 5.0, "unixReviewTime": time})


def _amazon(tmp_path: Path, reviews: list[str] | None = None, meta: list[str] | None = None) -> DataConfig:
    # str(dict) gives the single-quoted lines of the real meta files.
    _gz(tmp_path / "reviews_Beauty_5.json.gz", reviews if reviews is not None else [_review(*r) for r in REVIEWS])
    _gz(tmp_path / "meta_Beauty.json.gz", meta if meta is not None else [str(m) for m in META])
    return DataConfig(format="amazon2014", path=str(tmp_path), category="Beauty", min_interactions=2)


def test_amazon_kcore_order_ids_and_dropped(tmp_path):
    data = load_dataset(_amazon(tmp_path))
    # Dense ids follow first appearance in (user first seen, time) order: A's first item is i2.
    assert data.items["raw_id"].tolist() == ["i2", "i1"]
    assert _seqs(data) == {"A": [1, 2], "B": [2, 1], "C": [2, 1]}  # B's tie at t=200 keeps file order
    assert _times(data) == {"A": [50, 100], "B": [200, 200], "C": [20, 30]}
    assert data.items["title"].tolist() == [None, "Nail's Polish"]
    assert data.items["brand"].tolist() == [None, "OPI"]
    assert data.items["categories"].tolist() == [[], ["Makeup", "Nails"]]
    assert data.stats["dropped"] == {
        "duplicate_user_item": 1,
        "k_core_interactions": 4,
        "item_rows_without_interactions": 2,
        "duplicate_item_metadata": 1,
    }
    assert data.stats["items_without_metadata"] == 1
    assert data.stats["k_core"] == {"min_interactions": 2, "users_removed": 2, "items_removed": 2}
    assert data.stats["source"] == "amazon2014"
    kept = sum(len(s) for s in data.sequences["item_ids"])
    assert kept + sum(data.stats["dropped"][k] for k in ("duplicate_user_item", "k_core_interactions")) == len(REVIEWS)


def test_amazon_min_interactions_one_disables_kcore(tmp_path):
    cfg = _amazon(tmp_path)
    cfg.min_interactions = 1
    data = load_dataset(cfg)
    assert data.n_users == 5 and data.n_items == 4
    assert data.stats["dropped"]["k_core_interactions"] == 0


@pytest.mark.parametrize(
    "which, line, fragments",
    [
        ("reviews", '{"reviewerID": "A", "asin": ', ["reviews_Beauty_5.json.gz, line 3", "neither JSON"]),
        ("reviews", '{"reviewerID": "A", "unixReviewTime": 3}', ["reviews_Beauty_5.json.gz, line 3", "'asin'"]),
        ("reviews", '{"reviewerID": "A", "asin": "i1", "unixReviewTime": "soon"}', ["line 3", "unixReviewTime"]),
        ("meta", "{'asin': 'i1', 'title': 'cut off", ["meta_Beauty.json.gz, line 3", "neither JSON"]),
        ("meta", "{'asin': 'i2', 'categories': 'Beauty'}", ["meta_Beauty.json.gz, line 3", "list of lists"]),
    ],
)
def test_amazon_malformed_lines(tmp_path, which, line, fragments):
    reviews = [_review(*r) for r in REVIEWS]
    meta = [str(m) for m in META]
    (reviews if which == "reviews" else meta).insert(2, line)
    _raises(_amazon(tmp_path, reviews, meta), *fragments)


# ---------------------------------------------------------------- movielens


def _movielens(tmp_path: Path, ratings: list[str], movies: list[str], k: int = 2) -> DataConfig:
    (tmp_path / "ratings.dat").write_text("\n".join(ratings) + "\n", encoding="latin-1")
    (tmp_path / "movies.dat").write_text("\n".join(movies) + "\n", encoding="latin-1")
    return DataConfig(format="movielens", path=str(tmp_path), min_interactions=k)


RATINGS = ["1::10::5::300", "1::20::1::100", "2::20::3::50", "2::10::4::60", "2::30::2::70", "3::30::5::10"]
MOVIES = [
    "10::Amélie (2001)::Comedy|Romance",
    "20::Heat (1995)::Action|Crime|Thriller",
    "99::Unrated::(no genres listed)",
]


def test_movielens_implicit_kcore_and_fields(tmp_path):
    data = load_dataset(_movielens(tmp_path, RATINGS, MOVIES))
    # k=2: user 3 and movie 30 go (2 rows); every rating counts, even a 1.
    assert _seqs(data) == {"1": [1, 2], "2": [1, 2]}
    assert data.items["raw_id"].tolist() == ["20", "10"]
    assert data.items["title"].tolist() == ["Heat (1995)", "Amélie (2001)"]
    assert data.items["genres"].tolist() == [["Action", "Crime", "Thriller"], ["Comedy", "Romance"]]
    assert data.stats["dropped"] == {
        "duplicate_user_item": 0,
        "k_core_interactions": 2,
        "item_rows_without_interactions": 1,
    }
    assert data.stats["items_without_metadata"] == 0


def test_movielens_movie_without_metadata_is_kept(tmp_path):
    data = load_dataset(_movielens(tmp_path, RATINGS, MOVIES[:1], k=1))
    assert data.stats["items_without_metadata"] == 2
    missing = data.items[data.items["raw_id"] == "30"].iloc[0]
    assert missing["title"] is None and missing["genres"] == []


@pytest.mark.parametrize(
    "ratings, movies, fragments",
    [
        (["1::10::5::300", "1::20::1"], MOVIES, ["ratings.dat, line 2", "4 '::'-separated"]),
        (["1::10::5::300", "", "1::20::1::noon"], MOVIES, ["ratings.dat, line 3", "timestamp", "'noon'"]),
        (RATINGS, ["10::Amélie::Comedy", "x::Heat::Action"], ["movies.dat, line 2", "movie id"]),
        (RATINGS, ["10::Amélie::Comedy", "10::Again::Drama"], ["movies.dat, line 2", "duplicate movie id 10", "line 1"]),
    ],
)
def test_movielens_malformed_lines(tmp_path, ratings, movies, fragments):
    _raises(_movielens(tmp_path, ratings, movies), *fragments)


# ---------------------------------------------------------------- table

INTERACTIONS = pd.DataFrame(
    {
        "uid": ["u1", "u1", "u2", "u2", "u1", "u3", "u2"],
        "iid": [5, 7, 7, 5, 5, 9, 7],
        "ts": [20, 10, 30, 40, 50, 60, 70],
    }
)
ITEM_TABLE = pd.DataFrame(
    {"iid": [9, 7, 5, 8], "title": ["nine", "seven", "five", "eight"], "brand": ["b", None, "c", "d"]}
)


def _table_cfg(path: Path, items: Path | None = None, k: int = 2) -> DataConfig:
    items_path = str(items) if items else None
    table = TableConfig(user_col="uid", item_col="iid", time_col="ts", items_path=items_path, items_id_col="iid")
    return DataConfig(format="table", path=str(path), min_interactions=k, table=table)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_dedupe_kcore_and_item_fields(tmp_path, suffix):
    path, items = tmp_path / f"log{suffix}", tmp_path / f"items{suffix}"
    for frame, target in ((INTERACTIONS, path), (ITEM_TABLE, items)):
        if suffix == ".csv":
            frame.to_csv(target, index=False)
        else:
            frame.to_parquet(target, index=False)
    data = load_dataset(_table_cfg(path, items))
    assert _seqs(data) == {"u1": [1, 2], "u2": [1, 2]}  # u1: 7@10, 5@20 (5@50 is a repeat)
    assert _times(data) == {"u1": [10, 20], "u2": [30, 40]}
    assert data.items["raw_id"].tolist() == ["7", "5"]
    assert data.items["title"].tolist() == ["seven", "five"]
    assert data.items["brand"].tolist() == [None, "c"]
    assert data.stats["dropped"] == {
        "duplicate_user_item": 2,
        "k_core_interactions": 1,
        "item_rows_without_interactions": 2,
    }


def test_table_everything_filtered_out(tmp_path):
    path = tmp_path / "log.csv"
    INTERACTIONS.to_csv(path, index=False)
    _raises(_table_cfg(path, k=5), "log.csv", "no interactions are left")


def test_table_without_item_table(tmp_path):
    path = tmp_path / "log.csv"
    INTERACTIONS.to_csv(path, index=False)
    data = load_dataset(_table_cfg(path, k=1))
    assert list(data.items.columns) == ["item_id", "raw_id"]
    assert data.n_users == 3 and data.n_items == 3


def test_table_errors(tmp_path):
    csv = tmp_path / "log.csv"
    INTERACTIONS.rename(columns={"ts": "time"}).to_csv(csv, index=False)
    _raises(_table_cfg(csv), "log.csv", "missing column 'ts'")

    bad = INTERACTIONS.astype({"ts": object})
    bad.loc[2, "ts"] = "yesterday"
    bad.to_csv(csv, index=False)
    _raises(_table_cfg(csv), "log.csv, line 4", "'yesterday'")  # header is line 1, row 2 is line 4

    INTERACTIONS.to_csv(csv, index=False)
    items = tmp_path / "items.csv"
    ITEM_TABLE[ITEM_TABLE["iid"] != 7].to_csv(items, index=False)
    _raises(_table_cfg(csv, items), "log.csv, line 3", "item id '7'")

    pd.concat([ITEM_TABLE, ITEM_TABLE.iloc[[1]]]).to_csv(items, index=False)
    _raises(_table_cfg(csv, items), "items.csv, line 6", "duplicate item id '7'", "first at line 3")

    ITEM_TABLE.rename(columns={"iid": "id"}).to_csv(items, index=False)
    _raises(_table_cfg(csv, items), "items.csv", "missing column 'iid'")

    other = tmp_path / "log.json"
    other.write_text("{}")
    with pytest.raises(ValueError, match=r"\.csv"):
        load_dataset(_table_cfg(other))


# ---------------------------------------------------------------- build.py against a slow reference


def _reference(rows: list[tuple[str, str, int]], k: int) -> dict[str, list[str]]:
    """Plain-Python dedupe (earliest, then file order) + iterative k-core + stable time sort."""
    order = sorted(range(len(rows)), key=lambda j: rows[j][2])
    first: dict[tuple[str, str], int] = {}
    for j in order:
        first.setdefault(rows[j][:2], j)
    kept = sorted(first.values())
    while True:
        users = pd.Series([rows[j][0] for j in kept]).value_counts()
        items = pd.Series([rows[j][1] for j in kept]).value_counts()
        new = [j for j in kept if users[rows[j][0]] >= k and items[rows[j][1]] >= k]
        if len(new) == len(kept):
            break
        kept = new
    out: dict[str, list[str]] = {}
    for j in sorted(kept, key=lambda j: rows[j][2]):
        out.setdefault(rows[j][0], []).append(rows[j][1])
    return out


@pytest.mark.parametrize("seed", range(5))
def test_filter_matches_reference(seed):
    rng = np.random.default_rng(seed)
    n = 600
    rows = [(f"u{rng.integers(40)}", f"i{rng.integers(60)}", int(rng.integers(0, 50))) for _ in range(n)]
    frame = pd.DataFrame(rows, columns=["user", "item", "time"])
    got = filter_interactions(frame, 3)
    expected = _reference(rows, 3)
    raw = got.item_raw_ids
    sequences = {}
    for user_index, item in zip(got.user_index, got.item_ids):
        sequences.setdefault(str(got.users[user_index]), []).append(str(raw[item - 1]))
    assert sequences == expected
    # Users come in order of first appearance in the file.
    first_seen = list(dict.fromkeys(r[0] for r in rows))
    assert list(got.users) == [u for u in first_seen if u in expected]
    assert got.dropped["k_core_interactions"] + got.dropped["duplicate_user_item"] + len(got.item_ids) == n


def test_movielens_fast_and_checked_parsers_agree(tmp_path):
    from recsys.data.readers_movielens import _read_ratings_checked, _read_ratings_fast

    path = tmp_path / "ratings.dat"
    path.write_text("\n".join(RATINGS) + "\n")
    fast, checked = _read_ratings_fast(path), _read_ratings_checked(path)
    for column in ("user", "item", "time"):
        assert fast[column].tolist() == checked[column].tolist()
