"""The ANN baseline of retrieval: a model's user embedding searched in a faiss index over its
item embeddings (maximum inner product). It answers ``recommend(batch, k, exclude_history)``
like a sequence model, so evaluation and serving use it unchanged.

Any model that declares ``capabilities.item_vectors`` (``user_embedding(batch) -> (B, D)`` and
``item_embeddings() -> (N, D)``, whose scores are their inner products, e.g. SASRec) can be
wrapped. With ``index="Flat"`` the search is exact and returns what ``model.recommend`` returns;
``HNSW<M>`` is approximate.

HNSW searches inner products poorly: it is not a metric, and SASRec's item vectors differ in
norm (on Beauty, HNSW32 with inner product found 43 % of the exact top-10). So the HNSW index
holds the items in the usual MIPS-to-L2 reduction (Bachrach et al., 2014): each item x gains a
coordinate sqrt(M^2 - |x|^2), M the largest norm, and a query a 0, so that the L2 order is the
inner-product order. The candidates' scores are then their exact inner products.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from recsys.faiss_lib import faiss
from recsys.models.base import Batch, Capabilities, Recommendation, Retriever

_HNSW = re.compile(r"^HNSW(\d+)$")


class AnnRetriever(Retriever):
    """A Retriever over a trained model's vectors (it is not trained itself).
    ``index``: ``"Flat"`` (exact) or ``"HNSW<M>"`` (graph with M links per node).
    ``ef_search``: HNSW's search breadth; each search uses at least k (+ history) of it."""

    def __init__(self, model: Retriever, index: str = "HNSW32", ef_search: int = 128):
        if not model.capabilities.item_vectors:
            raise ValueError(f"{type(model).__name__} does not expose user and item vectors "
                             "(capabilities.item_vectors); the ANN baseline needs a model whose scores are inner "
                             "products of user and item embeddings (e.g. sasrec)")
        if index != "Flat" and not _HNSW.match(index):
            raise ValueError(f"ann index {index!r} is not supported; allowed: 'Flat' or 'HNSW<M>' (e.g. 'HNSW32')")
        if ef_search < 1:
            raise ValueError(f"ef_search={ef_search} is out of range; allowed: >= 1")
        super().__init__(model.n_items, model.max_len)
        self.model, self.index_name, self.ef_search = model.eval(), index, ef_search
        # What the wrapped model reads, so that Serve passes a request's times and user on to it
        # (a time-aware HSTU would otherwise be served without its times).
        self.capabilities = Capabilities(reads_users=model.capabilities.reads_users,
                                         reads_timestamps=model.capabilities.reads_timestamps)
        with torch.no_grad():
            items = model.item_embeddings().detach().float().cpu().numpy()  # (N, D)
        if len(items) != model.n_items:
            raise ValueError(f"item_embeddings() gave {len(items)} rows for {model.n_items} items")
        self.items = torch.from_numpy(items)  # (N, D)
        if index == "Flat":
            self.index = faiss.index_factory(items.shape[1], index, faiss.METRIC_INNER_PRODUCT)
        else:
            norms = np.linalg.norm(items, axis=1, keepdims=True)  # (N, 1)
            items = np.hstack([items, np.sqrt(np.maximum(norms.max() ** 2 - norms ** 2, 0.0))])  # (N, D + 1)
            self.index = faiss.index_factory(items.shape[1], index, faiss.METRIC_L2)
        self.index.add(np.ascontiguousarray(items, dtype=np.float32))  # faiss row i is item i + 1

    @property
    def timestamps_required(self) -> bool:
        return self.model.timestamps_required

    @property
    def users_required(self) -> bool:
        return self.model.users_required

    @torch.no_grad()
    def recommend(self, batch: Batch, k: int, exclude_history: bool = False) -> Recommendation:
        """Top-k items by inner product; scores are the inner products (as the model's own)."""
        self.model.check_k(k)
        history = batch.history  # (B, T)
        users = self.model.user_embedding(batch).float().cpu().numpy()  # (B, D)
        wanted = min(k + (history.shape[1] if exclude_history else 0), self.n_items)
        params, queries = None, users
        if self.index_name != "Flat":
            params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, wanted))
            queries = np.hstack([users, np.zeros((len(users), 1), dtype=np.float32)])  # (B, D + 1)
        _, rows = self.index.search(np.ascontiguousarray(queries), wanted, params=params)  # (B, wanted)
        items = torch.from_numpy(rows).long() + 1  # faiss -1 (nothing found) becomes 0
        scores = torch.einsum("bd,bwd->bw", torch.from_numpy(users), self.items[(items - 1).clamp(min=0)])
        out_items, out_scores = [], []
        for b in range(len(items)):
            keep = items[b] > 0
            if exclude_history:
                keep &= ~torch.isin(items[b], history[b])
            order = scores[b][keep].argsort(descending=True, stable=True)[:k]
            row_items, row_scores = items[b][keep][order], scores[b][keep][order]
            if len(row_items) < k:
                raise RuntimeError(f"the {self.index_name} index found only {len(row_items)} of {k} items; "
                                   f"raise ef_search (now {self.ef_search})")
            out_items.append(row_items)
            out_scores.append(row_scores)
        return Recommendation(items=torch.stack(out_items), scores=torch.stack(out_scores).float())
