"""The ANN baseline of retrieval: a model's user embedding searched in a faiss index over its
item embeddings (maximum inner product). It answers ``recommend(batch, k, exclude_history)``
like a sequence model, so evaluation and serving use it unchanged.

Any model with ``user_embedding(history) -> (B, D)`` and ``item_embeddings() -> (N, D)``, whose
scores are their inner products (SASRec), can be wrapped. With ``index="Flat"`` the search is
exact and returns what ``model.recommend`` returns; ``HNSW<M>`` is approximate.
"""

from __future__ import annotations

import re

import faiss
import numpy as np
import torch

from recsys.models.base import Batch, Recommendation, SequenceModel

_HNSW = re.compile(r"^HNSW(\d+)$")


class AnnRetriever:
    """``index``: ``"Flat"`` (exact) or ``"HNSW<M>"`` (graph with M links per node).
    ``ef_search``: HNSW's search breadth; each search uses at least k (+ history) of it."""

    def __init__(self, model: SequenceModel, index: str = "HNSW32", ef_search: int = 128):
        for method in ("user_embedding", "item_embeddings"):
            if not callable(getattr(model, method, None)):
                raise ValueError(f"{type(model).__name__} has no {method}(); the ANN baseline needs a model whose "
                                 "scores are inner products of user and item embeddings (e.g. sasrec)")
        if index != "Flat" and not _HNSW.match(index):
            raise ValueError(f"ann index {index!r} is not supported; allowed: 'Flat' or 'HNSW<M>' (e.g. 'HNSW32')")
        if ef_search < 1:
            raise ValueError(f"ef_search={ef_search} is out of range; allowed: >= 1")
        self.model, self.index_name, self.ef_search = model.eval(), index, ef_search
        self.n_items, self.max_len = model.n_items, model.max_len
        with torch.no_grad():
            items = model.item_embeddings().detach().float().cpu().numpy()  # (N, D)
        if len(items) != model.n_items:
            raise ValueError(f"item_embeddings() gave {len(items)} rows for {model.n_items} items")
        self.index = faiss.index_factory(items.shape[1], index, faiss.METRIC_INNER_PRODUCT)
        self.index.add(np.ascontiguousarray(items))  # faiss row i is item i + 1

    @torch.no_grad()
    def recommend(self, batch: Batch, k: int, exclude_history: bool = False) -> Recommendation:
        """Top-k items by inner product; scores are the inner products (as the model's own)."""
        if not 1 <= k <= self.n_items:
            raise ValueError(f"k={k} is out of range; allowed: 1 <= k <= {self.n_items} (the catalogue size)")
        history = batch.history  # (B, T)
        users = self.model.user_embedding(history).float().cpu().numpy()  # (B, D)
        wanted = min(k + (history.shape[1] if exclude_history else 0), self.n_items)
        params = None
        if self.index_name != "Flat":
            params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, wanted))
        scores, rows = self.index.search(np.ascontiguousarray(users), wanted, params=params)  # (B, wanted)
        items = torch.from_numpy(rows).long() + 1  # faiss -1 (nothing found) becomes 0
        out_items, out_scores = [], []
        for b in range(len(items)):
            keep = items[b] > 0
            if exclude_history:
                keep &= ~torch.isin(items[b], history[b])
            row_items, row_scores = items[b][keep][:k], torch.from_numpy(scores[b])[keep][:k]
            if len(row_items) < k:
                raise RuntimeError(f"the {self.index_name} index found only {len(row_items)} of {k} items; "
                                   f"raise ef_search (now {self.ef_search})")
            out_items.append(row_items)
            out_scores.append(row_scores)
        return Recommendation(items=torch.stack(out_items), scores=torch.stack(out_scores).float())
