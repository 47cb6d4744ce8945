"""Amazon reviews 2014 (McAuley): ``reviews_<Category>_5.json.gz`` + ``meta_<Category>.json.gz``.

Review lines are JSON. Meta lines are Python dict literals (single quotes) in the real files,
so each is tried as JSON first and then with ``ast.literal_eval``. The meta file covers the
whole category (hundreds of thousands of items) while the 5-core reviews use a few thousand, so
meta lines whose asin is not needed are skipped before the slow literal parse, and counted in
``dropped["item_rows_without_interactions"]``. A malformed line among the skipped ones goes
unnoticed; that is the price of reading Beauty's meta file in seconds instead of minutes.
"""

from __future__ import annotations

import ast
import gzip
import json
import re
from pathlib import Path

import pandas as pd

from recsys.data.build import assemble, filter_interactions, require_file
from recsys.data.config import DataConfig
from recsys.data.schema import DataFormatError, InteractionData

_ASIN = re.compile(r"""['"]asin['"]\s*:\s*['"]([^'"]+)['"]""")


def read_amazon2014(cfg: DataConfig) -> InteractionData:
    """Reviews -> dedupe, k-core, time order; meta -> title, brand, categories."""
    root = Path(cfg.path)
    reviews_path = require_file(root / f"reviews_{cfg.category}_5.json.gz")
    meta_path = require_file(root / f"meta_{cfg.category}.json.gz")
    filtered = filter_interactions(_read_reviews(reviews_path), cfg.min_interactions)
    items, meta_dropped = _read_meta(meta_path, set(filtered.item_raw_ids), cfg.category)
    data = assemble(filtered, items, source="amazon2014", where=str(root), list_fields=("categories",))
    for reason, count in meta_dropped.items():
        data.stats["dropped"][reason] = data.stats["dropped"].get(reason, 0) + count
    data.stats["category"] = cfg.category
    return data


def _read_reviews(path: Path) -> pd.DataFrame:
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            record = _parse_record(line, path, lineno)
            for key in ("reviewerID", "asin", "unixReviewTime"):
                if key not in record:
                    raise DataFormatError(path, f"missing {key!r}", lineno)
            time = record["unixReviewTime"]
            if not isinstance(time, int) or isinstance(time, bool):
                raise DataFormatError(path, f"unixReviewTime must be an integer, got {time!r}", lineno)
            users.append(str(record["reviewerID"]))
            items.append(str(record["asin"]))
            times.append(time)
    return pd.DataFrame({"user": users, "item": items, "time": pd.Series(times, dtype="int64")})


def _read_meta(path: Path, wanted: set[str], category: str) -> tuple[pd.DataFrame, dict[str, int]]:
    """Meta rows for ``wanted`` asins (the first row per asin) and counts of the rows skipped."""
    rows: list[dict] = []
    seen: set[str] = set()
    unused = repeated = 0
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            match = _ASIN.search(line)
            if match is not None and match.group(1) not in wanted:
                unused += 1
                continue
            record = _parse_record(line, path, lineno)
            if "asin" not in record:
                raise DataFormatError(path, "missing 'asin'", lineno)
            asin = str(record["asin"])
            if asin not in wanted:
                unused += 1
                continue
            if asin in seen:  # a repeated asin keeps its first row
                repeated += 1
                continue
            seen.add(asin)
            rows.append(_meta_fields(record, asin, category, path, lineno))
    items = pd.DataFrame(rows, columns=["raw_id", "title", "brand", "categories"]).astype(object)
    return items, {"item_rows_without_interactions": unused, "duplicate_item_metadata": repeated}


def _meta_fields(record: dict, asin: str, category: str, path: Path, lineno: int) -> dict:
    categories = record.get("categories") or [[]]
    if not isinstance(categories, list) or not all(isinstance(p, list) for p in categories):
        raise DataFormatError(path, f"categories must be a list of lists, got {categories!r}", lineno)
    first_path = [str(c) for c in categories[0]] if categories else []
    if first_path and _norm(first_path[0]) == _norm(category):
        first_path = first_path[1:]
    return {
        "raw_id": asin,
        "title": _text(record.get("title")),
        "brand": _text(record.get("brand")),
        "categories": first_path,
    }


def _text(value: object) -> str | None:
    """Non-empty text or None."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _norm(name: str) -> str:
    """Compare category names across spellings: 'Clothing, Shoes & Jewelry' ~ 'Clothing_Shoes_and_Jewelry'."""
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("&", "and"))


def _parse_record(line: str, path: Path, lineno: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        try:
            record = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError) as err:
            message = f"neither JSON nor a Python dict literal ({type(err).__name__})"
            raise DataFormatError(path, message, lineno) from None
    if not isinstance(record, dict):
        raise DataFormatError(path, "each line must be one object", lineno)
    return record
