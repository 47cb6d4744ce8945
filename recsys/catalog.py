"""The item catalogue with semantic IDs, and cold start: a new item's content -> text ->
embedding -> content codes -> a fresh full ID, without retraining anything.

Existing items keep their IDs (the index only appends a collision index), so a model trained
on the old IDs can decode the new item as soon as it is registered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from recsys.semantic_ids import SemanticIdIndex, SemanticIdTokenizer, load_tokenizer
from recsys.text import ItemTextConfig, build_texts

EmbedFn = Callable[[list[str]], np.ndarray]  # texts -> (n, D) float32


class ItemCatalog:
    def __init__(self, tokenizer: SemanticIdTokenizer, index: SemanticIdIndex, text: ItemTextConfig,
                 embed: EmbedFn):
        self.tokenizer, self.index, self.text, self.embed = tokenizer, index, text, embed

    @classmethod
    def from_ids_run(cls, ids_dir: str | Path, text: ItemTextConfig, embed: EmbedFn) -> "ItemCatalog":
        """Load the tokenizer and index an ``ids`` run wrote (``tokenizer/``, ``index/``)."""
        ids_dir = Path(ids_dir)
        return cls(load_tokenizer(ids_dir / "tokenizer"), SemanticIdIndex.load(ids_dir / "index"), text, embed)

    def register(self, items: pd.DataFrame) -> torch.Tensor:
        """Add new items (an ``item_id`` column plus text fields) -> their full IDs (n, L + 1).

        Raises ValueError for an id that is already registered (nothing is added then).
        """
        if "item_id" not in items.columns:
            raise ValueError(f"new items need an item_id column; got columns {list(items.columns)}")
        ids = items["item_id"].to_numpy(dtype=np.int64)
        known = [int(i) for i in ids if self.index.has_item(int(i))]
        if known or len(set(ids.tolist())) != len(ids):
            raise ValueError(f"item ids already registered or repeated: {known[:10] or 'repeated in the request'}")
        vectors = np.asarray(self.embed(build_texts(items, self.text)), dtype=np.float32)  # (n, D)
        codes = self.tokenizer.encode(vectors)  # (n, L)
        return self.index.add_many(ids, codes)
