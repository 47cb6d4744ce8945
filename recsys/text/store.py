"""The embedding table an ``embed`` run writes, and its reader for later stages.

``embeddings.parquet``: one row per item, sorted by ``item_id``: ``item_id`` int64,
``vector`` list<float32>, ``encoder`` str (the encoder's identity), ``text_hash`` str.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

EMBEDDINGS_FILE = "embeddings.parquet"
SCHEMA = pa.schema([("item_id", pa.int64()), ("vector", pa.list_(pa.float32())),
                    ("encoder", pa.string()), ("text_hash", pa.string())])


def write_embeddings(path: str | Path, item_ids: np.ndarray, vectors: np.ndarray, encoder: str,
                     text_hashes: list[str]) -> None:
    """item_ids (N,), vectors (N, D) -> one parquet file sorted by item_id, written atomically."""
    vectors = np.asarray(vectors, dtype=np.float32)
    order = np.argsort(item_ids, kind="stable")
    n, dim = vectors.shape
    flat = pa.array(vectors[order].reshape(-1), type=pa.float32())
    offsets = pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32))
    table = pa.table({
        "item_id": pa.array(np.asarray(item_ids, dtype=np.int64)[order]),
        "vector": pa.ListArray.from_arrays(offsets, flat),
        "encoder": pa.array([encoder] * n, type=pa.string()),
        "text_hash": pa.array([text_hashes[i] for i in order], type=pa.string()),
    }, schema=SCHEMA)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def vectors_from_column(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A list<float32> column of equal-length lists -> (N, D) float32."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = column.value_lengths().to_numpy(zero_copy_only=False) if len(column) else np.zeros(0, int)
    if len(column) and (lengths != lengths[0]).any():
        raise ValueError(f"vectors have different lengths: {sorted(set(lengths.tolist()))[:5]}")
    dim = int(lengths[0]) if len(column) else 0
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), dim)


def load_embeddings(embed_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """An embed run directory (or its parquet file) -> item ids (N,) int64 = 1..N and vectors
    (N, D) float32 in item-id order. Raises ValueError on gaps, duplicates or non-finite rows."""
    path = Path(embed_dir)
    path = path / EMBEDDINGS_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; is this an `recsys embed` run directory?")
    table = pq.read_table(path, columns=["item_id", "vector"])
    ids = table.column("item_id").to_numpy().astype(np.int64)
    vectors = vectors_from_column(table.column("vector"))
    order = np.argsort(ids, kind="stable")
    ids, vectors = ids[order], vectors[order]
    if not np.array_equal(ids, np.arange(1, len(ids) + 1)):
        raise ValueError(f"{path}: item ids must be exactly 1..N with no gaps or duplicates")
    bad = ids[~np.isfinite(vectors).all(axis=1)]
    if bad.size:
        raise ValueError(f"{path}: {bad.size} vector(s) are not finite, e.g. item ids {bad[:10].tolist()}")
    return ids, vectors
