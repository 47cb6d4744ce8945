"""Building blocks shared by the sequence models: causal self-attention and its block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)  # 3 x (B, T, D)
        heads = lambda t: t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(
            heads(q), heads(k), heads(v), attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, D/H)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class CausalBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), mask))
        return x + self.drop(self.mlp(self.ln2(x)))


class CausalEncoder(nn.Module):
    """A stack of causal blocks with a final LayerNorm. (B, T, D) -> (B, T, D)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, n_layers: int, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(CausalBlock(d_model, n_heads, d_ff, dropout) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        mask = causal_mask(valid)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln(x)
