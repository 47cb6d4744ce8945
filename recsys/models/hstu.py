"""HSTU: Actions Speak Louder than Words: Trillion-Parameter Sequential Transducers for Generative
Recommendations (Zhai et al., ICML 2024), arXiv:2402.17152; as an atomic-ID retriever, following
the official code (generative_recommenders/research/modeling/sequential/hstu.py).

Each block: ``u, v, q, k = split(SiLU(LN(x) W_uvqk))`` (LayerNorm without affine parameters, no bias
in W_uvqk); ``A = SiLU(q kᵀ + rab^{p,t}) / n`` causally masked, with no 1/√d and n the padded length
(``max_len``, a constant, so trimming left padding changes nothing); ``x + W_o Dropout(u ⊙ LN(A v))``,
with LN over all heads at once as in the official code; no FFN. ``rab`` is learned per layer and
shared by the heads: a term per j - i plus a term per ``time_bucket(ts[i + 1] - ts[j])``, the next
event's time (``Batch.target_time`` at the last position) standing for the query time.

``model.query_time: last_event`` makes each position's query time its own event's, ``ts[i]``, so the
target's time is never read (the official code has only the next event's time); the ablation
compares the two. Served, the request's ``time`` (default: now) is the last position's query time
under ``next_event``; under ``last_event`` the newest history timestamp is, and ``time`` is unused. ``model.position_bias: false`` drops the position term (with ``time_bias: off``,
no rab at all).

Departures from the official code:
- Positions are right-aligned (the newest item always has the last position embedding), as in our
  SASRec, so trimming left padding changes nothing; the official code counts from the oldest item.
- Scores are cosines: the user vector is L2-normalised (the official output postprocessor) and so
  are the item vectors (the official code normalises the items it ranks, in its negatives sampler
  and evaluation). The temperature scales training logits only, so rankings do not depend on it,
  and ``score_items`` equals ``user_embedding(batch) @ item_embeddings().T`` (ANN-servable).
- ``loss: ce`` (full softmax over the catalogue, on the same cosines / temperature) besides the
  official sampled softmax; on a catalogue of ~10^4 items it is affordable and exact.
- Padding keys are masked rather than zeroed (the official code is jagged); the effect is the same.
- ``time_bias: auto`` runs position-only on data without timestamps (e.g. Beauty's S3-Rec files),
  warning once; the official code silently drops the whole rab then.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from recsys.config import require, require_choice, require_range
from recsys.models.base import AtomicIdModel, Batch, Capabilities, LossOutput
from recsys.models.layers import Dropout, RelativeBias, attend, causal_mask
from recsys.models.losses import FullSoftmaxLoss, SampledSoftmaxLoss

LOSSES = ("sampled_softmax", "ce")
TIME_BIAS = ("auto", "on", "off")
# The time each position's query stands for: the next event's (the official code; at the last
# position the target's, Batch.target_time) or the position's own event's (reads nothing later).
QUERY_TIME = ("next_event", "last_event")
OUTPUT_EMBEDDINGS = ("shared", "separate")
EPS = 1e-6  # the official LayerNorm epsilon


@dataclass
class HSTUConfig:
    d_model: int = 50
    n_layers: int = 2
    n_heads: int = 1
    head_dim: int = 0  # width of each head's q, k, u and v; 0 = d_model // n_heads
    dropout: float = 0.2  # on u ⊙ LN(A v), before W_o (official linear_dropout_rate)
    emb_dropout: float = 0.2  # on the input embeddings (official: the same rate)
    loss: str = "sampled_softmax"  # sampled_softmax: uniform negatives per position; ce: full softmax
    n_negatives: int = 128  # sampled_softmax only; must be < the catalogue size
    temperature: float = 0.05  # both losses divide cosines by it
    # auto: rab^t when the batch has timestamps; on: require them; off: never read them
    time_bias: str = "auto"
    time_buckets: int = 128  # buckets of ln|Δt| / 0.301
    query_time: str = "next_event"  # next_event: ts[i + 1], the target's time last; last_event: ts[i]
    position_bias: bool = True  # the rab term per j - i; false with time_bias off = no rab
    # shared: one item table reads the history and scores the next item (the official code);
    # separate: a second table scores, so "bought" and "bought next" need not be the same direction
    output_embeddings: str = "shared"

    def __post_init__(self):
        require_range("model.d_model", self.d_model, 1, 4096)
        require_range("model.n_layers", self.n_layers, 1, 48)
        require_range("model.n_heads", self.n_heads, 1, self.d_model)
        require_range("model.head_dim", self.head_dim, 0, 4096)
        if self.head_dim == 0 and self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads} "
                             "when model.head_dim is 0")
        require_range("model.dropout", self.dropout, 0.0, 0.95)
        require_range("model.emb_dropout", self.emb_dropout, 0.0, 0.95)
        require_choice("model.loss", self.loss, LOSSES)
        require_range("model.n_negatives", self.n_negatives, 1, 100000)
        require(self.temperature > 0, f"model.temperature={self.temperature} is out of range; allowed: > 0")
        require_choice("model.time_bias", self.time_bias, TIME_BIAS)
        require_range("model.time_buckets", self.time_buckets, 1, 1024)
        require_choice("model.query_time", self.query_time, QUERY_TIME)
        require(isinstance(self.position_bias, bool),
                f"model.position_bias must be true or false, got {self.position_bias!r}")
        require_choice("model.output_embeddings", self.output_embeddings, OUTPUT_EMBEDDINGS)


class HSTUBlock(nn.Module):
    """One HSTU layer with its own relative bias. (B, T, D) -> (B, T, D)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, dropout: float, max_len: int, time_buckets: int,
                 position_bias: bool = True):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim
        self.uvqk = nn.Linear(d_model, 4 * n_heads * head_dim, bias=False)
        self.out = nn.Linear(n_heads * head_dim, d_model)
        self.rab = RelativeBias(max_len, time_buckets, positions=position_bias)
        self.drop = Dropout(dropout)
        nn.init.normal_(self.uvqk.weight, std=0.02)  # the official initialisation
        nn.init.xavier_uniform_(self.out.weight)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, norm: float, buckets: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, D); mask (B, 1, T, T) True = may attend; norm: the constant n; buckets (B, T, T)
        time buckets or None (position-only)."""
        B, T, D = x.shape
        u, v, q, k = F.silu(self.uvqk(F.layer_norm(x, (D,), eps=EPS))).chunk(4, dim=-1)  # each (B, T, H * hd)
        bias = self.rab(T, buckets=buckets)  # (1 or B, 1, T, T) or None: one per layer, broadcast over heads
        if buckets is None and self.rab.time is not None:  # every parameter gets a gradient, as DDP requires
            bias = 0.0 * self.rab.time.sum() + (0.0 if bias is None else bias)
        heads = [t.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v)]  # (B, H, T, hd)
        a = attend(*heads, score="pointwise", mask=mask, bias=bias, norm=norm)  # (B, H, T, hd)
        a = a.transpose(1, 2).reshape(B, T, -1)  # (B, T, H * hd)
        return x + self.out(self.drop(u * F.layer_norm(a, (a.shape[-1],), eps=EPS)))


class HSTU(AtomicIdModel):
    # The declaration is static: with time_bias=off the model simply never reads the times.
    capabilities = Capabilities(reads_timestamps=True, item_vectors=True)

    @property
    def timestamps_required(self) -> bool:
        return self.config.time_bias == "on"

    def __init__(self, config: HSTUConfig, n_items: int, max_len: int):
        super().__init__(n_items, max_len)
        if config.loss == "sampled_softmax" and config.n_negatives >= n_items:
            raise ValueError(f"model.n_negatives={config.n_negatives} must be smaller than the catalogue size "
                             f"({n_items} items)")
        self.config = config
        d = config.d_model
        head_dim = config.head_dim or d // config.n_heads
        time_buckets = 0 if config.time_bias == "off" else config.time_buckets
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, d)
        self.emb_drop = Dropout(config.emb_dropout)
        self.blocks = nn.ModuleList(HSTUBlock(d, config.n_heads, head_dim, config.dropout, max_len, time_buckets,
                                              config.position_bias) for _ in range(config.n_layers))
        self.loss_fn = (SampledSoftmaxLoss(config.n_negatives, config.temperature) if config.loss == "sampled_softmax"
                        else FullSoftmaxLoss(config.temperature))
        # output_embeddings=separate: a table of its own scores items (else the input table does)
        self.out_emb = nn.Embedding(n_items + 1, d, padding_idx=0) if config.output_embeddings == "separate" else None
        for table in (self.item_emb, self.out_emb):
            if table is not None:
                nn.init.trunc_normal_(table.weight, std=0.02)  # as the official embedding module
                with torch.no_grad():
                    table.weight[0].zero_()
        nn.init.trunc_normal_(self.pos_emb.weight, std=d**-0.5)
        self._warned_no_times = False

    def time_buckets(self, batch: Batch) -> torch.Tensor | None:
        """(B, T, T) time buckets of (query i, key j), or None to run position-only. With
        ``query_time: next_event`` the query time of position i is the next event's time,
        ``timestamps[:, i + 1]``, and at the last position ``batch.target_time`` (the target's time
        in training, the request's time when serving); with ``last_event`` it is position i's own
        time, ``timestamps[:, i]``, and ``target_time`` is never read."""
        mode = self.config.time_bias
        if mode == "off":
            return None
        if batch.timestamps is None:
            if mode == "on":
                raise ValueError("model.time_bias=on, but the batch carries no timestamps (the data has none); "
                                 "use data with timestamps, or model.time_bias=auto or off")
            if not self._warned_no_times:
                warnings.warn("HSTU (model.time_bias=auto): the batches carry no timestamps, so the relative "
                              "time bias is off and HSTU runs position-only", RuntimeWarning, stacklevel=3)
                self._warned_no_times = True
            return None
        if self.config.query_time == "last_event":
            return self.blocks[0].rab.buckets(batch.timestamps, batch.timestamps)  # shared by every layer
        if batch.target_time is None:
            raise ValueError(f"HSTU (model.time_bias={mode}, model.query_time=next_event) reads Batch.target_time, "
                             "the query time of the last position, whenever the batch has timestamps; it is missing "
                             "(model.query_time=last_event does not read it)")
        query = torch.cat([batch.timestamps[:, 1:], batch.target_time[:, None].to(batch.timestamps)], 1)  # (B, T)
        return self.blocks[0].rab.buckets(batch.timestamps, query)  # shared by every layer

    def encode(self, batch: Batch) -> torch.Tensor:
        """batch.history (B, T) (and its times) -> hidden states (B, T, D), not normalised;
        position t summarises items <= t and the query time that follows them."""
        history = batch.history
        T = history.shape[1]
        if T > self.max_len:
            raise ValueError(f"history length {T} exceeds max_len={self.max_len}")
        valid = history > 0  # (B, T)
        positions = torch.arange(self.max_len - T, self.max_len, device=history.device)  # right-aligned
        x = self.item_emb(history) * self.config.d_model**0.5 + self.pos_emb(positions)  # (B, T, D)
        x = self.emb_drop(x) * valid[..., None]
        mask, buckets = causal_mask(valid), self.time_buckets(batch)  # (B, 1, T, T), (B, T, T) or None
        for block in self.blocks:
            x = block(x, mask, float(self.max_len), buckets)
        return x

    @property
    def output_table(self) -> nn.Embedding:
        """The table whose rows score items (``model.output_embeddings``)."""
        return self.item_emb if self.out_emb is None else self.out_emb

    def user_embedding(self, batch: Batch) -> torch.Tensor:
        """-> (B, D): the newest position's state, L2-normalised. Scores are its inner products with
        ``item_embeddings()``, so a maximum-inner-product index ranks the same."""
        return F.normalize(self.encode(batch)[:, -1], dim=-1)

    def item_embeddings(self) -> torch.Tensor:
        """(N, D): L2-normalised; row i - 1 is item i (the padding row 0 is left out)."""
        return F.normalize(self.output_table.weight[1:], dim=-1)

    def score_items(self, batch: Batch) -> torch.Tensor:
        return self.user_embedding(batch) @ F.normalize(self.output_table.weight, dim=-1).T  # (B, N + 1); column 0 is 0

    def loss(self, batch: Batch) -> LossOutput:
        """The configured loss at every position that has a target (autoregressive training)."""
        h = self.encode(batch)  # (B, T, D)
        keep = batch.targets > 0  # (B, T)
        return self.loss_fn(h[keep], batch.targets[keep], self.output_table)  # (P, D), (P,)
