"""TWIN: Two-stage Interest Network for lifelong behaviour modelling (Chang et al., KDD 2023),
arXiv:2302.02352; and TWIN-V2, on hierarchical clusters of the history (Si et al., CIKM 2024),
arXiv:2407.16357. One ranker, three settings of ``model.history``:
- ``behaviours`` (``model.name=twin``): GSU keeps the top-k raw behaviours by α, ESU attends them;
- ``clusters`` (``model.name=twin_v2``): the history is clustered into virtual items
  (``recsys.history.cluster_history``, at most ``gamma`` events each); GSU keeps the top-k by
  α' = α + ln n and ESU attends them with α' as its logits;
- ``none``: no long-term branch, only the target attention over the last ``short_len`` items (the
  baseline the long history must beat).

Relevance, with TWIN's split of features. Inherent features of an item (ID embedding, and its
item vector when the ranker is built with ``item_vectors``) go through one projection, so K_h W_h
is per item and cacheable; a cluster's inherent features are its representative's ID and its
members' mean vector. Cross features of behaviour and candidate enter as a linear bias per head:
α = (K_h W_h)(q W_q)ᵀ / √d + (K_c W_c) β, with K_c = [an embedding of the log2 bucket of the
position gap (events between the behaviour and the target), the cosine similarity of the item
vectors]. Neither shipped dataset has timestamps or repeats, so there is no time-gap or
repeat-count feature.

Departures from the papers and why:
- No engagement features (play time, completion): our data has none. Recency bands stand in
  for TWIN-V2's engagement grouping (``model.bands``; 1 = none, see ``recsys.history.clustering``).
- GSU ranks by α averaged over heads (the papers' GSU uses the same parameters as ESU; they
  do not say how heads combine for selection).
- Clustering needs item vectors. ``recsys rank`` passes the retriever's frozen item embeddings
  where it has a table (SASRec, two-tower: clusters group behaviourally similar items), else the
  content vectors its semantic IDs were built from (TIGER, EAGER), or those of ``--vectors-from``.
- Besides the long-term and short-term interests, the MLP reads the retriever's rank (log2
  bucket) and per-list standardised score of the candidate and log(1 + history length); the same
  two retriever features also reach the logit directly (a learned bias per rank bucket plus a
  weight on the score), so the ranker learns a correction to the retriever's order.
- ``model.id_embeddings=false`` drops the learned ID embedding (items are their item vectors):
  with one example per user, ID embeddings memorise the training targets.

Items registered after training (``register_items``, a served cascade's ``POST /items``): a ranker
whose item vectors are content vectors scores a new item from its content vector, given in the
same space (the embed run's encoder). It has no learned ID row; it takes the mean of the trained
items' rows, the ID embedding an item is expected to have before any behaviour says otherwise.
Nothing trained changes, so the ranker scores every trained item exactly as before.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys.config import require, require_choice, require_range
from recsys.history import cluster_history
from recsys.models.base import Batch, Capabilities, LossOutput, Ranker, item_vector_table
from recsys.models.layers import Dropout, TargetAttention

HISTORIES = ("behaviours", "clusters", "none")
MISSED_TARGETS = ("insert", "skip")
RANK_BUCKETS = 12  # log2 buckets of the retriever's rank, 0..2^11; the last one: not proposed by it


@dataclass
class TwinConfig:
    d_model: int = 32
    n_heads: int = 2
    history: str = "behaviours"  # behaviours (TWIN) | clusters (TWIN-V2) | none (short-term attention only)
    gamma: int = 20  # clusters: at most this many events per cluster
    bands: int = 1  # clusters: recency bands clustered apart (1 = no grouping)
    top_k: int = 50  # GSU: behaviours (or clusters) kept per candidate for ESU
    short_len: int = 20  # the short-term attention's last items
    gap_buckets: int = 16  # log2 buckets of the position gap, a cross feature
    mlp_dim: int = 128
    dropout: float = 0.1
    random_negatives: int = 20  # training: uniform random items per example, redrawn every epoch
    # training lists that miss the target: skip them (train only on lists like those validation and
    # test can score), or insert the target at a random position, taking that candidate's rank and
    # score. On Beauty, inserting taught the ranker that the retriever's rank says little (most
    # positives sat at random ranks): validation NDCG@10 0.0366 against 0.0500 skipping, and the
    # retriever alone 0.0433 (docs/experiments/twin.md, 2026-12-04 evening)
    missed_targets: str = "skip"
    cluster_seed: int = 0
    # false: items are their item vectors alone, no learned ID embedding (a precaution where there is
    # one training example per user, 1,090 on LastFM, against thousands of items)
    id_embeddings: bool = True

    def __post_init__(self):
        require_range("model.d_model", self.d_model, 1, 4096)
        require_range("model.n_heads", self.n_heads, 1, self.d_model)
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
        require_choice("model.history", self.history, HISTORIES)
        require_range("model.gamma", self.gamma, 2, None)
        require_range("model.bands", self.bands, 1, 1000)
        require_range("model.top_k", self.top_k, 1, 100000)
        require_range("model.short_len", self.short_len, 1, 10000)
        require_range("model.gap_buckets", self.gap_buckets, 1, 64)
        require_range("model.mlp_dim", self.mlp_dim, 1, 65536)
        require_range("model.dropout", self.dropout, 0.0, 0.95)
        require_range("model.random_negatives", self.random_negatives, 0, 100000)
        require_choice("model.missed_targets", self.missed_targets, MISSED_TARGETS)
        require_range("model.cluster_seed", self.cluster_seed, 0, 2**31 - 1)
        require(isinstance(self.id_embeddings, bool), f"model.id_embeddings must be true or false, got "
                f"{self.id_embeddings!r}")


@dataclass
class TwinV2Config(TwinConfig):
    history: str = "clusters"


class Twin(Ranker):
    capabilities = Capabilities(registers_items=True)

    def __init__(self, config: TwinConfig, n_items: int, max_len: int, item_vectors: torch.Tensor | None = None):
        super().__init__(n_items, max_len)
        self.config = config
        d = config.d_model
        if item_vectors is not None:
            item_vectors = item_vector_table(item_vectors, n_items, "item_vectors")
            self.register_buffer("item_vectors", item_vectors)
        else:
            self.item_vectors = None
            if config.history == "clusters":
                raise ValueError("model.history=clusters clusters behaviours by their item vectors; build the "
                                 "ranker with item_vectors (a retriever's item embeddings or content vectors)")
        content_dim = 0 if item_vectors is None else item_vectors.shape[1]
        if not config.id_embeddings and not content_dim:
            raise ValueError("model.id_embeddings=false leaves items no features without item_vectors")
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0) if config.id_embeddings else None
        self.inherent = nn.Linear((d if config.id_embeddings else 0) + content_dim, d)  # W_h's front: per item
        self.short_pos = nn.Embedding(config.short_len, d)
        self.short_attn = TargetAttention(d, config.n_heads)
        long_out = 0
        if config.history != "none":
            self.long_attn = TargetAttention(d, config.n_heads)
            self.gap_emb = nn.Embedding(config.gap_buckets + 1, 8)
            # (K_c W_c) β per head, one linear map split by feature so that the behaviour-only part
            # (the gap) is computed per behaviour, not per (candidate, behaviour) pair
            self.cross_gap = nn.Linear(8, config.n_heads)
            self.cross_sim = nn.Linear(1, config.n_heads, bias=False) if content_dim else None
            long_out = d
        self.rank_emb = nn.Embedding(RANK_BUCKETS + 1, 8)
        # The retriever's own ranking as a direct path to the logit, and the MLP's last layer at zero:
        # an untrained ranker orders the candidates exactly as the retriever did, and training
        # learns a correction (with one example per user, a randomly initialised MLP never climbed
        # back to the retriever's order in the LastFM pilot).
        self.rank_prior = nn.Embedding(RANK_BUCKETS + 1, 1)
        self.score_weight = nn.Parameter(torch.ones(1))
        nn.init.zeros_(self.rank_prior.weight)
        self.mlp = nn.Sequential(nn.Linear(3 * d + long_out + 8 + 2, config.mlp_dim), nn.ReLU(),
                                 Dropout(config.dropout), nn.Linear(config.mlp_dim, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        if self.item_emb is not None:
            nn.init.normal_(self.item_emb.weight, std=d ** -0.5)
            with torch.no_grad():
                self.item_emb.weight[0].zero_()

    @classmethod
    def context_from_checkpoint(cls, context: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"item_vectors": weights["item_vectors"]} if "item_vectors" in weights else {}

    @torch.no_grad()
    def register_items(self, item_ids: torch.Tensor, vectors: torch.Tensor) -> None:
        if self.item_vectors is None:
            raise ValueError(f"{type(self).__name__} was trained without item vectors, so it has no features for "
                             "an item it was not trained on")
        new = torch.as_tensor(item_ids, dtype=torch.long).reshape(-1).cpu()
        expected = torch.arange(self.n_items + 1, self.n_items + len(new) + 1)
        if not torch.equal(new, expected):
            raise ValueError(f"new item ids must be exactly {self.n_items + 1}..{self.n_items + len(new)} in order, "
                             f"got {new.tolist()[:10]}")
        vectors = torch.as_tensor(vectors, dtype=self.item_vectors.dtype, device=self.item_vectors.device)
        if vectors.shape != (len(new), self.item_vectors.shape[1]):
            raise ValueError(f"new items' vectors must be ({len(new)}, {self.item_vectors.shape[1]}) like the ranker's "
                             f"item vectors, got {tuple(vectors.shape)}")
        # Build both tables first, then swap each in one assignment: nothing trained changes.
        table = torch.cat([self.item_vectors, vectors])
        emb = None
        if self.item_emb is not None:
            weight = self.item_emb.weight
            # rows 1.. hold the trained items and any registered earlier, each of which is already
            # their mean, so this is the trained items' mean however many were registered
            rows = weight[1:].mean(dim=0, keepdim=True).expand(len(new), -1)
            emb = nn.Embedding.from_pretrained(torch.cat([weight, rows]), freeze=True, padding_idx=0)
        self.item_vectors = table
        if emb is not None:
            self.item_emb = emb
        self.n_items += len(new)

    # --- the long history: raw behaviours or virtual items -------------------------------
    def long_rows(self, histories: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Each history (oldest first, no padding) -> its entries: items, sizes, positions, vectors."""
        rows = []
        vectors = None if self.item_vectors is None else self.item_vectors.detach().cpu().numpy()
        for items in histories:
            items = np.asarray(items, dtype=np.int64)
            vec = None if vectors is None else vectors[items]
            if self.config.history == "clusters":
                v = cluster_history(items, vec, self.config.gamma, bands=self.config.bands,
                                    seed=self.config.cluster_seed)
                rows.append({"items": v.item, "sizes": v.size, "positions": v.position, "vectors": v.vector})
            else:
                rows.append({"items": items, "sizes": np.ones(len(items), dtype=np.int64),
                             "positions": np.arange(len(items), dtype=np.float32), "vectors": vec})
        return rows

    def collate_long(self, rows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor | None]:
        """Entries of B rows -> the Batch's long_* fields, right-padded to the longest row."""
        width = max(1, max(len(r["items"]) for r in rows))
        out = {"long_items": np.zeros((len(rows), width), dtype=np.int64),
               "long_sizes": np.zeros((len(rows), width), dtype=np.int64),
               "long_positions": np.zeros((len(rows), width), dtype=np.float32)}
        vectors = None if self.item_vectors is None else np.zeros((len(rows), width, self.item_vectors.shape[1]),
                                                                  dtype=np.float32)
        for i, r in enumerate(rows):
            n = len(r["items"])
            out["long_items"][i, :n], out["long_sizes"][i, :n], out["long_positions"][i, :n] = \
                r["items"], r["sizes"], r["positions"]
            if vectors is not None:
                vectors[i, :n] = r["vectors"]
        tensors = {k: torch.from_numpy(v) for k, v in out.items()}
        tensors["long_vectors"] = None if vectors is None else torch.from_numpy(vectors)
        return tensors

    @torch.no_grad()
    def prepare(self, batch: Batch) -> Batch:
        if self.config.history == "none" or batch.long_items is not None:
            return batch
        history = batch.history.cpu().numpy()
        rows = self.long_rows([h[h > 0] for h in history])  # only events before the target are in history
        fields = {k: None if v is None else v.to(batch.history.device) for k, v in self.collate_long(rows).items()}
        return dataclasses.replace(batch, **fields)

    # --- scoring --------------------------------------------------------------------------
    def embed(self, items: torch.Tensor, vectors: torch.Tensor | None = None) -> torch.Tensor:
        """Inherent features -> (…, D): the ID embedding and the item vector (the members' mean for
        a cluster, given as ``vectors``), projected once."""
        parts = [] if self.item_emb is None else [self.item_emb(items)]
        if self.item_vectors is not None:
            parts.append(self.item_vectors[items] if vectors is None else vectors)
        return self.inherent(torch.cat(parts, dim=-1))

    def long_interest(self, batch: Batch, query: torch.Tensor) -> torch.Tensor:
        """GSU then ESU over the long history -> (B, C, D)."""
        keys, alpha, top = self.gsu(batch, query)
        return self.esu(batch, keys, alpha, top)

    def gsu(self, batch: Batch, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The general search unit: the relevance α of every entry of the long history to every
        candidate (α' = α + ln n for clusters), and the top-k entries kept per candidate.
        -> keys (B, M, D), alpha (B, C, M, H), top (B, C, k) indices into M, or None when k covers
        all M entries (every entry kept: full target attention)."""
        keys = self.embed(batch.long_items, batch.long_vectors)  # (B, M, D)
        length = batch.long_sizes.sum(1, keepdim=True).float()  # (B, 1) events before the target
        gap = (length - batch.long_positions).clamp(min=1)  # (B, M) newest = 1
        bucket = gap.log2().floor().long().clamp(0, self.config.gap_buckets)
        alpha = self.long_attn.logits(query, keys) + self.cross_gap(self.gap_emb(bucket))[:, None]  # (B, C, M, H)
        if self.cross_sim is not None:  # cosine of the candidate's and the entry's item vectors
            cand_vec = F.normalize(self.item_vectors[batch.candidates], dim=-1)  # (B, C, Dv)
            sim = torch.einsum("bcv,bmv->bcm", cand_vec, F.normalize(batch.long_vectors, dim=-1))
            alpha = alpha + sim[..., None] * self.cross_sim.weight[:, 0]
        if self.config.history == "clusters":  # TWIN-V2: a cluster of n events counts for ln n more
            alpha = alpha + batch.long_sizes.clamp(min=1).float().log()[:, None, :, None]
        if self.config.top_k >= keys.shape[1]:
            return keys, alpha, None
        valid = batch.long_sizes > 0  # (B, M)
        relevance = alpha.mean(-1).masked_fill(~valid[:, None, :], float("-inf"))  # (B, C, M)
        return keys, alpha, relevance.topk(self.config.top_k, dim=2).indices

    def esu(self, batch: Batch, keys: torch.Tensor, alpha: torch.Tensor, top: torch.Tensor | None) -> torch.Tensor:
        """The exact search unit: multi-head target attention over the entries GSU kept, with their
        α as its logits -> (B, C, D). ``top`` None attends every entry in place, without gathering
        a (B, C, M, H, hd) copy of the values."""
        valid = batch.long_sizes > 0  # (B, M)
        if top is None:
            return self.long_attn.pool(alpha, self.long_attn.values(keys), valid)
        B, C, M, H = alpha.shape
        k, D = top.shape[2], keys.shape[-1]
        kept = alpha.gather(2, top[..., None].expand(B, C, k, H))  # (B, C, k, H)
        # the values of the kept entries only: ESU's cost does not grow with the history
        kept_keys = keys[:, None].expand(B, C, M, D).gather(2, top[..., None].expand(B, C, k, D))  # (B, C, k, D)
        values = self.long_attn.values(kept_keys.reshape(B, C * k, D)).view(B, C, k, H, -1)  # (B, C, k, H, hd)
        return self.long_attn.pool(kept, values, valid[:, None].expand(B, C, M).gather(2, top))

    def logits(self, batch: Batch) -> torch.Tensor:
        """-> (B, C) one logit per candidate (padding candidates included; callers mask them)."""
        if batch.candidates is None or batch.candidate_ranks is None or batch.candidate_scores is None:
            raise ValueError("the twin ranker scores Batch.candidates with the retriever's Batch.candidate_ranks "
                             "and Batch.candidate_scores; all three are required")
        batch = self.prepare(batch)
        query = self.embed(batch.candidates)  # (B, C, D)
        recent = batch.history[:, -self.config.short_len:]  # (B, S) left-padded, newest last
        S = recent.shape[1]
        short_keys = self.embed(recent) + self.short_pos(torch.arange(self.config.short_len - S,
                                                                      self.config.short_len, device=recent.device))
        parts = [query, self.short_attn(query, short_keys, recent > 0)]
        if self.config.history != "none":
            parts.append(self.long_interest(batch, query))
        parts.append(query * parts[1])  # candidate x short-term interest
        ranks = batch.candidate_ranks
        proposed = ranks >= 0
        bucket = torch.where(proposed, (ranks.float() + 1).log2().floor().long().clamp(max=RANK_BUCKETS - 1),
                             torch.full_like(ranks, RANK_BUCKETS))
        scores = batch.candidate_scores.float()
        n = proposed.sum(1, keepdim=True).clamp(min=1)
        mean = (scores * proposed).sum(1, keepdim=True) / n
        std = (((scores - mean) * proposed) ** 2).sum(1, keepdim=True).div(n).sqrt().clamp(min=1e-6)
        standard = torch.where(proposed, (scores - mean) / std, torch.zeros_like(scores))
        length = (batch.history > 0).sum(1).float() if batch.long_sizes is None else batch.long_sizes.sum(1).float()
        user = torch.log1p(length)[:, None, None].expand(-1, query.shape[1], 1)
        parts += [self.rank_emb(bucket), standard[..., None], user]
        prior = self.rank_prior(bucket).squeeze(-1) + self.score_weight * standard  # (B, C)
        return self.mlp(torch.cat(parts, dim=-1)).squeeze(-1) + prior  # (B, C)

    def score(self, batch: Batch) -> torch.Tensor:
        return self.logits(batch).masked_fill(batch.candidates == 0, float("-inf"))

    def loss(self, batch: Batch) -> LossOutput:
        """BCE of every real candidate against ``batch.labels``."""
        logits = self.logits(batch)
        keep = batch.candidates > 0
        total = F.binary_cross_entropy_with_logits(logits[keep], batch.labels[keep].float())
        return LossOutput(total, {"bce": total.detach()})

