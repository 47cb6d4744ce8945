"""Next-item losses as modules, shared by the atomic-ID models (SASRec, HSTU, the two-tower).

Each takes the positions' output vectors ``h`` (P, D), their target items (P,), and the item
table (an ``nn.Embedding`` over ids 0..N, row 0 padding), and returns a ``LossOutput``:
- ``FullSoftmaxLoss``: cross-entropy over the whole catalogue (exact; cheap at ~10^4 items);
- ``SampledBCELoss``: the SASRec paper's binary loss, one positive against uniform negatives;
- ``SampledSoftmaxLoss``: softmax over the positive and sampled negatives, on L2-normalised
  vectors with a temperature, optionally with the logQ correction of Yi et al. (RecSys 2019).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recsys.models.base import LossOutput


class FullSoftmaxLoss(nn.Module):
    """Cross-entropy over every item. Logits are inner products, or, with a ``temperature``, the
    cosines of L2-normalised vectors divided by it (for models that score by cosine, e.g. HSTU)."""

    def __init__(self, temperature: float | None = None):
        super().__init__()
        if temperature is not None and temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        self.temperature = temperature

    def forward(self, h: torch.Tensor, targets: torch.Tensor, items: nn.Embedding) -> LossOutput:
        if self.temperature is None:
            logits = h @ items.weight.T  # (P, N + 1)
        else:
            logits = F.normalize(h, dim=-1) @ F.normalize(items.weight, dim=-1).T / self.temperature  # (P, N + 1)
        logits[:, 0] = float("-inf")
        loss = F.cross_entropy(logits.float(), targets)
        return LossOutput(loss, {"ce": loss.detach()})


class SampledBCELoss(nn.Module):
    """``n_negatives`` uniform negatives per position (a negative may equal the positive, as in
    the paper's sampler at this catalogue size; the chance is n_negatives / N)."""

    def __init__(self, n_negatives: int):
        super().__init__()
        self.n_negatives = n_negatives

    def forward(self, h: torch.Tensor, targets: torch.Tensor, items: nn.Embedding) -> LossOutput:
        n_items = items.num_embeddings - 1
        negatives = torch.randint(1, n_items + 1, (len(targets), self.n_negatives), device=h.device)
        pos = (h * items(targets)).sum(-1)  # (P,)
        neg = torch.einsum("pd,pnd->pn", h, items(negatives))  # (P, n_neg)
        pos_loss = F.binary_cross_entropy_with_logits(pos.float(), torch.ones_like(pos, dtype=torch.float))
        neg_loss = F.binary_cross_entropy_with_logits(neg.float(), torch.zeros_like(neg, dtype=torch.float))
        return LossOutput(pos_loss + neg_loss, {"bce_pos": pos_loss.detach(), "bce_neg": neg_loss.detach()})


class SampledSoftmaxLoss(nn.Module):
    """Softmax over [positive, negatives] of cos(h, item) / temperature, per position.

    Negatives are drawn per position: uniformly over items 1..N, or, with ``item_log_q`` (N + 1,)
    the log-probability of sampling each item (row 0 ignored), from that distribution. Then every
    logit, the positive's included, becomes s / temperature - log q(item) (the logQ correction;
    not divided by the temperature), so the loss estimates the full softmax rather than one
    biased towards what the sampler favours. A negative equal to the positive is masked.
    """

    def __init__(self, n_negatives: int = 128, temperature: float = 0.05, item_log_q: torch.Tensor | None = None):
        super().__init__()
        if n_negatives < 1 or temperature <= 0:
            raise ValueError(f"n_negatives={n_negatives} must be >= 1 and temperature={temperature} > 0")
        self.n_negatives, self.temperature = n_negatives, temperature
        self.register_buffer("item_log_q", None if item_log_q is None else item_log_q.float(), persistent=False)

    def sample(self, n: int, n_items: int, device: torch.device) -> torch.Tensor:
        """(n, n_negatives) item ids in 1..n_items."""
        if self.item_log_q is None:
            return torch.randint(1, n_items + 1, (n, self.n_negatives), device=device)
        probs = self.item_log_q[1:].exp()
        return torch.multinomial(probs, n * self.n_negatives, replacement=True).view(n, self.n_negatives) + 1

    def forward(self, h: torch.Tensor, targets: torch.Tensor, items: nn.Embedding) -> LossOutput:
        n_items = items.num_embeddings - 1
        negatives = self.sample(len(targets), n_items, h.device)  # (P, n)
        candidates = torch.cat([targets[:, None], negatives], 1)  # (P, 1 + n): the positive first
        user = F.normalize(h.float(), dim=-1)  # (P, D)
        vectors = F.normalize(items(candidates).float(), dim=-1)  # (P, 1 + n, D)
        logits = torch.einsum("pd,pcd->pc", user, vectors) / self.temperature  # (P, 1 + n)
        if self.item_log_q is not None:
            logits = logits - self.item_log_q[candidates]
        logits[:, 1:] = logits[:, 1:].masked_fill(negatives == targets[:, None], float("-inf"))
        loss = F.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.long, device=h.device))
        return LossOutput(loss, {"sampled_softmax": loss.detach()})
