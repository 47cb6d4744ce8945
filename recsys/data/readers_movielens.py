"""MovieLens ``.dat`` files (ML-1M, ML-10M): ``ratings.dat`` and ``movies.dat``.

Every rating counts as an interaction whatever its value (implicit feedback, as in SASRec and
HSTU). The files are latin-1, ``::``-separated.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from recsys.data.build import build_dataset, parse_int_column, require_file
from recsys.data.config import DataConfig
from recsys.data.schema import DataFormatError, InteractionData

_NO_GENRES = "(no genres listed)"


def read_movielens(cfg: DataConfig) -> InteractionData:
    """ratings.dat -> dedupe, k-core, time order; movies.dat -> title, genres."""
    root = Path(cfg.path)
    ratings_path = require_file(root / "ratings.dat")
    movies_path = require_file(root / "movies.dat")
    frame = _read_ratings(ratings_path)
    movies = _read_movies(movies_path)
    return build_dataset(
        frame,
        movies,
        source="movielens",
        where=str(root),
        min_interactions=cfg.min_interactions,
        list_fields=("genres",),
    )


def _split_lines(path: Path, n_fields: int, what: str) -> tuple[list[list[str]], np.ndarray]:
    """Each non-blank line split on ``::`` into exactly ``n_fields`` fields, plus its line number."""
    rows: list[list[str]] = []
    lines: list[int] = []
    with path.open(encoding="latin-1") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("::")
            if len(parts) != n_fields:
                message = f"expected {what} as {n_fields} '::'-separated fields, got {line!r}"
                raise DataFormatError(path, message, lineno)
            rows.append(parts)
            lines.append(lineno)
    return rows, np.asarray(lines, dtype=np.int64)


def _read_ratings(path: Path) -> pd.DataFrame:
    """Fast C-parser read; on any problem, the line-by-line reader finds and names the bad line."""
    try:
        return _read_ratings_fast(path)
    except (ValueError, pd.errors.ParserError):
        return _read_ratings_checked(path)


def _read_ratings_fast(path: Path) -> pd.DataFrame:
    # The C parser takes one-character separators only; "::" -> tab keeps it ~10x faster.
    text = path.read_bytes().replace(b"::", b"\t")
    table = pd.read_csv(io.BytesIO(text), sep="\t", header=None, dtype=np.int64, encoding="latin-1")
    if table.shape[1] != 4:
        raise ValueError("expected 4 fields")
    return pd.DataFrame({"user": table[0].astype(str), "item": table[1].astype(str), "time": table[3]})


def _read_ratings_checked(path: Path) -> pd.DataFrame:
    rows, lines = _split_lines(path, 4, "ratings")
    table = pd.DataFrame(rows, columns=["user", "item", "rating", "time"], dtype=object)
    for column in ("user", "item"):
        parse_int_column(table[column], path, f"{column} id", lines)  # ids must be integers
    parse_int_column(table["rating"], path, "rating", lines)
    return pd.DataFrame(
        {
            "user": table["user"].str.strip(),
            "item": table["item"].str.strip(),
            "time": parse_int_column(table["time"], path, "timestamp", lines),
        }
    )


def _read_movies(path: Path) -> pd.DataFrame:
    rows, lines = _split_lines(path, 3, "movies")
    table = pd.DataFrame(rows, columns=["raw_id", "title", "genres"], dtype=object)
    parse_int_column(table["raw_id"], path, "movie id", lines)
    table["raw_id"] = table["raw_id"].str.strip()
    duplicated = table["raw_id"].duplicated()
    if duplicated.any():
        row = int(duplicated.to_numpy().argmax())
        first = int(lines[int((table["raw_id"] == table["raw_id"].iat[row]).to_numpy().argmax())])
        message = f"duplicate movie id {table['raw_id'].iat[row]} (first on line {first})"
        raise DataFormatError(path, message, int(lines[row]))
    table["genres"] = [[] if g.strip() in ("", _NO_GENRES) else g.strip().split("|") for g in table["genres"]]
    return table.astype(object)
