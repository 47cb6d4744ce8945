"""Building blocks shared by the sequence models: one attention, its transformer block, and a
relative position/time bias.

``attend`` is the one attention computation. Its score function is pluggable:
- ``"softmax"``: softmax(q kᵀ / √d + bias) (SASRec, TIGER);
- ``"pointwise"``: SiLU(q kᵀ + bias) / n, no √d and no normalisation over keys (HSTU, Zhai et al.
  2024), where n is a constant the caller passes (the official code: the padded length).
Masks are boolean, True = may attend, broadcast to (B, H, T, S): causal, padding, or cross
(queries over an encoder's memory). ``Attention`` projects queries, keys and values around it;
``Block`` is the pre-norm transformer block SASRec and TIGER's encoder and decoder are built of.
``last_item_linears`` and ``decoder_start`` are the generative decoders' first-order path from the
newest history item (TIGER and EAGER). ``Dropout`` (``inverted_dropout``) is every model's
dropout: torch's, with a mask that is cheaper to draw on a CPU.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

SCORES = ("softmax", "pointwise")


@functools.lru_cache(maxsize=64)
def keep_levels(p: float, dtype: torch.dtype) -> int:
    """Of 65,536 16-bit values, how many keep an element: ``1 - p`` rounded so that the kept elements'
    scale, ``65536 / levels``, times the keep rate is 1 as ``dtype`` stores the scale.

    bf16 keeps 8 significant bits, so 1 / 0.9 becomes 1.109375: with the keep rate left at 0.9 every
    activation would shrink by 0.16 % in expectation. Rounding the keep rate to the stored scale's
    inverse instead keeps the expectation (to 1e-5) and moves the drop rate (p = 0.1 drops 0.0986 in
    bf16). In fp32 the levels are round((1 - p) * 65536), as they always were, for every p in
    0.001..0.999. A p so small that the scale rounds to 1 in ``dtype`` (below ~0.002 in bf16) drops
    nothing."""
    if p == 1.0:
        return 0
    scale = torch.tensor(1.0 / (1.0 - p), dtype=dtype).item()  # the scale as dtype stores it
    return min(65536, round(65536 / scale))


def inverted_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout, as ``F.dropout``, with its mask drawn four elements per random 64-bit word.

    On a CPU torch draws one Bernoulli number per element (``bernoulli_``). That was ~40 % of a bf16
    EAGER training step on a 2-core CPU, and on a 5.6M-element bf16 tensor this function takes
    11.7 ms against ``F.dropout``'s 35.0 ms (2 threads). Each 16-bit quarter of a uniform random
    word is compared with a threshold, so the keep probability is a multiple of 1/65536
    (``keep_levels``) and the scale is its inverse in ``x``'s dtype: the expectation is unchanged. The
    random numbers come from torch's generator, so ``torch.manual_seed`` fixes the mask. Elsewhere
    (CUDA) torch's fused kernel is faster and is used."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    levels = keep_levels(p, x.dtype)  # kept 16-bit values out of 65,536
    if levels == 0:
        return torch.zeros_like(x)
    if levels == 65536:
        return x
    n = x.numel()
    words = torch.randint(-(2 ** 63), 2 ** 63 - 1, ((n + 3) // 4,), device=x.device)  # 4 x 16 random bits
    keep = words.view(torch.int16)[:n].view(x.shape) < levels - 32768
    return x * keep.to(x.dtype).mul_(65536 / levels)


class Dropout(nn.Module):
    """``nn.Dropout`` with ``inverted_dropout``'s mask."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return inverted_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """valid: (B, T) bool, True at real items. Returns (B, 1, T, T) bool, True = may attend.

    Query t sees keys <= t that are real items. Every query also sees itself, so that rows of
    left padding never have an all-False mask (softmax of nothing is NaN); their outputs are
    ignored by the losses.
    """
    T = valid.shape[1]
    lower = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()  # (T, T)
    allowed = lower & valid[:, None, :]  # (B, T, T)
    allowed |= torch.eye(T, dtype=torch.bool, device=valid.device)
    return allowed.unsqueeze(1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, score: str = "softmax",
           mask: torch.Tensor | None = None, causal: bool = False, bias: torch.Tensor | None = None,
           dropout: float = 0.0, norm: float | None = None) -> torch.Tensor:
    """q (B, H, T, d), k and v (B, H, S, d) -> (B, H, T, d).

    mask: bool, broadcastable to (B, H, T, S), True = may attend. causal: queries see keys <= their
    own position (T == S). bias: float, broadcastable to (B, H, T, S), added to the scores (a
    relative position/time bias). norm: the pointwise score's divisor (required there)."""
    if score == "softmax":
        if bias is None and not (causal and mask is not None):  # the fused kernels' cases
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout)
        allowed = _combined(mask, causal, q.shape[-2], k.shape[-2], q.device)
        if bias is not None:  # a float mask is added to the scores; -inf where not allowed
            allowed = bias if allowed is None else torch.where(allowed, bias, float("-inf")).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
    if score != "pointwise":
        raise ValueError(f"attention score {score!r} is not allowed; choose one of {list(SCORES)}")
    if norm is None or norm <= 0:
        raise ValueError(f"pointwise attention needs norm > 0 (the padded length), got {norm}")
    # Two (B, H, T, S) tensors per call, both kept for the backward pass (SiLU's input, the
    # weights that multiply v): the bias and the mask are applied in place, and 1/n scales the
    # (T, d) output rather than the (T, S) weights.
    scores = q @ k.transpose(-2, -1)  # (B, H, T, S); its backward needs q and k, not it
    if bias is not None:
        scores += bias
    weights = F.silu(scores)  # (B, H, T, S); SiLU's backward reads its input, not this
    allowed = _combined(mask, causal, q.shape[-2], k.shape[-2], q.device)
    if allowed is not None:
        weights.mul_(allowed)  # 0 where not allowed (SiLU of finite scores is finite)
    if dropout:
        weights = inverted_dropout(weights, dropout)
    return (weights @ v) / norm  # (B, H, T, d)


def _combined(mask: torch.Tensor | None, causal: bool, T: int, S: int, device: torch.device) -> torch.Tensor | None:
    if not causal:
        return mask
    lower = torch.ones(T, S, dtype=torch.bool, device=device).tril()
    return lower if mask is None else mask & lower


class Attention(nn.Module):
    """Multi-head attention of width n_heads * head_dim, independent of d_model (as in T5).
    The same module serves self-attention (keys from x) and cross-attention (keys from a memory,
    computed once with ``keys_values``)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, dropout: float = 0.0,
                 score: str = "softmax"):
        super().__init__()
        if head_dim is None:  # the usual width: heads split d_model
            if d_model % n_heads:
                raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
            head_dim = d_model // n_heads
        if score not in SCORES:
            raise ValueError(f"attention score {score!r} is not allowed; choose one of {list(SCORES)}")
        self.n_heads, self.head_dim, self.dropout, self.score = n_heads, head_dim, dropout, score
        inner = n_heads * head_dim
        self.q = nn.Linear(d_model, inner)
        self.kv = nn.Linear(d_model, 2 * inner)
        self.out = nn.Linear(inner, d_model)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """source (B, S, D) -> keys, values, each (B, H, S, hd)."""
        k, v = self.kv(source).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None, *,
                mask: torch.Tensor | None = None, causal: bool = False, bias: torch.Tensor | None = None,
                norm: float | None = None) -> torch.Tensor:
        """x (B, T, D); kv from ``keys_values`` (default: of x itself) -> (B, T, D)."""
        B, T, _ = x.shape
        k, v = kv if kv is not None else self.keys_values(x)
        y = attend(self._heads(self.q(x)), k, v, score=self.score, mask=mask, causal=causal, bias=bias,
                   dropout=self.dropout if self.training else 0.0, norm=norm)  # (B, H, T, hd)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), [x + cross(ln_cross(x), memory)], x + mlp(ln2(x)).

    With ``cross=True`` (a decoder block) ``forward`` also takes the memory's keys/values (from
    ``cross.keys_values``) and its key mask. The memory has B rows and x may have R = B * G rows
    (G beams per user, batch-major): each user's G rows are folded into the query axis, so the
    memory is never copied per beam."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, *, head_dim: int | None = None,
                 activation: str = "gelu", cross: bool = False):
        super().__init__()
        # The norms first: parameter order fixes the summation order of the gradient norm that
        # clipping computes, and this is the order TIGER's blocks had before they were shared.
        self.ln1 = nn.LayerNorm(d_model)
        self.ln_cross = nn.LayerNorm(d_model) if cross else None
        self.ln2 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, head_dim, dropout)
        self.cross = Attention(d_model, n_heads, head_dim, dropout) if cross else None
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), ACTIVATIONS[activation](), Dropout(dropout),
                                 nn.Linear(d_ff, d_model))
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None, causal: bool = False,
                bias: torch.Tensor | None = None, memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), mask=mask, causal=causal, bias=bias))
        return self._cross_and_mlp(x, memory_kv, memory_mask)

    def step(self, x: torch.Tensor, past: SelfKV | None, *, memory_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
             memory_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, SelfKV]:
        """Incremental causal decoding: x (R, 1, D) the newest position, ``past`` the self-attention
        keys and values of the earlier positions ((R, H, t, hd) each; None at the first) -> its
        output (R, 1, D) and the keys and values with it appended. The same as ``forward`` with
        ``causal=True`` over all t + 1 positions, read at the last one, in O(t) instead of O(t^2)."""
        h = self.ln1(x)
        k, v = self.attn.keys_values(h)
        if past is not None:
            k, v = torch.cat([past.keys, k], 2), torch.cat([past.values, v], 2)
        x = x + self.drop(self.attn(h, (k, v)))  # the newest query may see every position: causal by construction
        return self._cross_and_mlp(x, memory_kv, memory_mask), SelfKV(k, v)

    def _cross_and_mlp(self, x: torch.Tensor, memory_kv: tuple[torch.Tensor, torch.Tensor] | None,
                       memory_mask: torch.Tensor | None) -> torch.Tensor:
        if self.cross is not None:
            R, t, D = x.shape
            B = memory_kv[0].shape[0]
            h = self.ln_cross(x).reshape(B, R // B * t, D)
            x = x + self.drop(self.cross(h, memory_kv, mask=memory_mask).reshape(R, t, D))
        return x + self.drop(self.mlp(self.ln2(x)))


class SelfKV(NamedTuple):
    """One decoder block's self-attention keys and values of the positions decoded so far."""
    keys: torch.Tensor  # (R, H, t, hd)
    values: torch.Tensor


def decode_step(blocks: nn.ModuleList, x: torch.Tensor, cache: list[SelfKV] | None, memory_kv: list,
                memory_mask: torch.Tensor) -> tuple[torch.Tensor, list[SelfKV]]:
    """One position (R, 1, D) through a stack of decoder blocks with their caches (None at the
    first position) -> its output (R, 1, D) and the caches with it. A beam search reorders the
    caches' rows to the surviving beams' parents (``reorder_cache``) before the next call."""
    out = []
    for i, (block, kv) in enumerate(zip(blocks, memory_kv)):
        x, past = block.step(x, None if cache is None else cache[i], memory_kv=kv, memory_mask=memory_mask)
        out.append(past)
    return x, out


class DecoderParts(NamedTuple):
    """What incremental decoding reads of a generative decoder (TIGER's, each EAGER stream's)."""
    token_emb: nn.Embedding
    pos: torch.Tensor  # (positions, D) position embeddings
    drop: nn.Module
    blocks: nn.ModuleList
    ln: nn.LayerNorm


def next_state(parts: DecoderParts, tokens: torch.Tensor, cache: list[SelfKV] | None, memory_kv: list,
               memory_mask: torch.Tensor, start: DecoderStart) -> tuple[torch.Tensor, list[SelfKV]]:
    """tokens (R, t): the prefix's token rows, R = B * G batch-major -> the state that predicts level
    t, (R, D), computed for that position alone (the start token at t = 0, else the newest token)
    from ``cache``, the keys and values of positions < t (None at t = 0; rows already following
    their beams), and the cache with position t. Equals the decoder's full causal pass at position t."""
    R, t = tokens.shape
    G = R // len(start.token)
    x = start.token.repeat_interleave(G, dim=0)[:, None] if t == 0 else parts.token_emb(tokens[:, -1:])
    x = parts.drop(x.to(parts.pos.dtype) + parts.pos[t])  # (R, 1, D)
    x, cache = decode_step(parts.blocks, x, cache, memory_kv, memory_mask)
    x = parts.ln(x)[:, 0]
    if start.output is not None:
        x = x + start.output.repeat_interleave(G, dim=0).to(x.dtype)
    return x, cache


def reorder_cache(cache: list[SelfKV], parents: torch.Tensor) -> list[SelfKV]:
    """Each new beam row takes its parent row's keys and values; parents (R,) index the old rows."""
    return [SelfKV(past.keys[parents], past.values[parents]) for past in cache]


class CausalEncoder(nn.Module):
    """A stack of causal blocks with a final LayerNorm. (B, T, D) -> (B, T, D)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, n_layers: int, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff, dropout) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        mask = causal_mask(valid)
        for block in self.blocks:
            x = block(x, mask=mask, bias=bias)
        return self.ln(x)


def time_bucket(gaps: torch.Tensor, n_buckets: int = 128) -> torch.Tensor:
    """HSTU's bucket of a time gap in seconds: clamp(floor(ln(max(|Δt|, 1)) / 0.301), 0, n_buckets)."""
    return (gaps.abs().clamp(min=1).float().log() / 0.301).floor().long().clamp(0, n_buckets)


class RelativeBias(nn.Module):
    """A learned attention bias, shared across heads: a term per relative position j - i (unless
    ``positions=False``), plus, when timestamps are given, a term per
    ``time_bucket(query_time[i] - ts[j])``. -> (B, 1, T, T), or None when it has no term to add.

    ``query_time`` (B, T) is the time each position's query stands for: in HSTU's official code the
    next event's time (``ts[i + 1]``; the target's time at the last position)."""

    def __init__(self, max_len: int, time_buckets: int = 0, positions: bool = True):
        super().__init__()
        self.max_len = max_len
        # index (j - i) + max_len - 1
        self.position = nn.Parameter(torch.zeros(2 * max_len - 1)) if positions else None
        self.time = nn.Parameter(torch.zeros(time_buckets + 1)) if time_buckets else None
        for p in self.parameters():
            nn.init.normal_(p, std=0.02)

    def buckets(self, timestamps: torch.Tensor, query_time: torch.Tensor) -> torch.Tensor:
        """timestamps, query_time (B, T) -> the time bucket of every (query i, key j), (B, T, T).
        Layers with the same number of buckets can share one result (``forward(buckets=...)``)."""
        if self.time is None:
            raise ValueError("timestamps were given to a RelativeBias built without time buckets")
        gaps = query_time[:, :, None] - timestamps[:, None, :]  # (B, T, T)
        return time_bucket(gaps, len(self.time) - 1)

    def forward(self, T: int, timestamps: torch.Tensor | None = None, query_time: torch.Tensor | None = None,
                *, buckets: torch.Tensor | None = None) -> torch.Tensor | None:
        """-> (1, 1, T, T) from positions alone, or (B, 1, T, T) with the time term, read from
        ``timestamps`` and ``query_time`` or from precomputed ``buckets`` (B, T, T); None when
        built without positions and given no times."""
        if T > self.max_len:
            raise ValueError(f"sequence length {T} exceeds the bias's max_len={self.max_len}")
        bias = None
        if self.position is not None:
            pos = torch.arange(T, device=self.position.device)
            bias = self.position[pos[None, :] - pos[:, None] + self.max_len - 1][None, None]  # (1, 1, T, T)
        if buckets is None and timestamps is None:
            return bias
        if buckets is None:
            buckets = self.buckets(timestamps, query_time)
        elif self.time is None:
            raise ValueError("time buckets were given to a RelativeBias built without them")
        time = self.time[buckets][:, None]  # (B, 1, T, T), a new tensor: the position term is added in place
        return time if bias is None else time.add_(bias)


class TargetAttention(nn.Module):
    """Multi-head target attention (DIN, TWIN): every candidate queries a sequence of behaviours.

    ``logits`` gives (K W_k)(q W_q)ᵀ / √d_h per head, to which callers add their own bias (TWIN's
    cross features, TWIN-V2's ln n) and from which they may select (TWIN's GSU keeps the top k);
    ``pool`` takes softmax-weighted values over what is left. ``forward`` is the plain case, every
    behaviour attended. Rows with no valid behaviour pool to zeros, never NaN.
    """

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def logits(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """query (B, C, D), keys (B, S, D) -> (B, C, S, H)."""
        B, C, _ = query.shape
        q = self.q(query).view(B, C, self.n_heads, self.head_dim)  # (B, C, H, hd)
        k = self.k(keys).view(B, keys.shape[1], self.n_heads, self.head_dim)  # (B, S, H, hd)
        return torch.einsum("bchd,bshd->bcsh", q, k) / self.head_dim ** 0.5

    def values(self, keys: torch.Tensor) -> torch.Tensor:
        """keys (B, S, D) -> values (B, S, H, hd)."""
        return self.v(keys).view(keys.shape[0], keys.shape[1], self.n_heads, self.head_dim)

    def pool(self, logits: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """logits (B, C, S, H); values (B, C, S, H, hd) or (B, S, H, hd) shared by the candidates;
        valid (B, C, S) or (B, S) bool -> (B, C, D)."""
        if valid.dim() == 2:
            valid = valid[:, None, :]
        logits = logits.masked_fill(~valid[..., None], float("-inf"))
        weights = torch.softmax(logits, dim=2).nan_to_num(0.0)  # an all-masked row: zeros, not NaN
        if values.dim() == 4:
            pooled = torch.einsum("bcsh,bshd->bchd", weights, values)
        else:
            pooled = torch.einsum("bcsh,bcshd->bchd", weights, values)
        return self.out(pooled.flatten(2))  # (B, C, D)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, C, D), keys (B, S, D), valid (B, S) bool, bias (B, C, S, H) -> (B, C, D)."""
        logits = self.logits(query, keys)
        return self.pool(logits if bias is None else logits + bias, self.values(keys), valid)


class DecoderStart(NamedTuple):
    """What a generative decoder starts from, per batch row: the start token (B, D), and the vector
    added to every output state (B, D), or None."""
    token: torch.Tensor
    output: torch.Tensor | None


def last_item_linears(d_model: int, start: bool, output: bool) -> tuple[nn.Linear | None, nn.Linear | None]:
    """The two projections of the last-item path (each None when off). The output projection starts
    at zero, so an untrained model scores as without it."""
    first = nn.Linear(d_model, d_model) if start else None  # built in this order: seeded inits stay as they were
    out = nn.Linear(d_model, d_model) if output else None
    if out is not None:
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
    return first, out


def decoder_start(bos: torch.Tensor, item: torch.Tensor, present: torch.Tensor,
                  start: nn.Linear | None, output: nn.Linear | None) -> DecoderStart:
    """A first-order path from the newest history item into a decoder, as FPMC adds a Markov term to
    matrix factorisation (Rendle et al. 2010): ``item`` (B, D) is that item's own embedding,
    ``present`` (B, 1) False where the history is empty. The start token is ``bos`` (D,) plus
    ``start(item)``; the output vector, added to every state after the decoder, is ``output(item)``
    (a bilinear last item x scored code term in every logit). Either projection may be None (off)."""
    token = bos + start(item) * present if start is not None else bos.expand(len(item), -1)
    return DecoderStart(token, output(item) * present if output is not None else None)


def with_child_scores(logits: torch.Tensor, h: torch.Tensor, child: torch.Tensor, nodes: nn.Embedding) -> torch.Tensor:
    """Prefix outputs: logits (R, V_t) of a level's code head, decoder states h (R, D), child (R, V_known)
    the trie node each known token leads to from each row's prefix (0: none, a zero row of ``nodes``) ->
    the logits plus h . e(child node), so every child of a prefix scores by a vector of its own, not
    only by a code vector shared by all parents. Gathered in chunks of at most 2^23 floats."""
    step = max(1, (1 << 23) // (child.shape[1] * h.shape[1]))
    bias = torch.cat([torch.einsum("rvd,rd->rv", nodes(child[i:i + step]).to(h.dtype), h[i:i + step])
                      for i in range(0, len(h), step)])
    return torch.cat([logits[:, :bias.shape[1]] + bias, logits[:, bias.shape[1]:]], 1)
