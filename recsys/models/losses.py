"""Next-item losses as modules, shared by the atomic-ID models (SASRec, HSTU, the two-tower).

Each takes the positions' output vectors ``h`` (P, D), their target items (P,), and the item
table (an ``nn.Embedding`` over ids 0..N, row 0 padding), and returns a ``LossOutput``:
- ``FullSoftmaxLoss``: cross-entropy over the whole catalogue (exact; cheap at ~10^4 items);
- ``SampledBCELoss``: the SASRec paper's binary loss, one positive against uniform negatives;
- ``SampledSoftmaxLoss``: softmax over the positive and sampled negatives, on L2-normalised
  vectors with a temperature, optionally with the logQ correction of Yi et al. (RecSys 2019).

``InBatchSoftmaxLoss`` (the two-tower's) takes the other positions' targets as negatives instead
of sampling; ``ItemFrequency`` estimates the probability p_i of an item being in a batch (for
its logQ correction) and ``seen_in_history`` says which batch items a position's user already has.
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


def normalized_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows ``table[index]`` in fp32, (*index.shape, D). Normalises the whole table
    and gathers when it has fewer rows than the gather (a catalogue of 10^4 items against
    P * (1 + n) ~ 3 * 10^5 sampled rows: 3x faster a step on CPU, forward and backward), else
    the gathered rows; the values are the same either way."""
    if table.shape[0] <= index.numel():
        return F.normalize(table.float(), dim=-1)[index]
    return F.normalize(table[index].float(), dim=-1)


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
        logits = torch.einsum("pd,pcd->pc", user, normalized_rows(items.weight, candidates)) / self.temperature
        # logits (P, 1 + n)
        if self.item_log_q is not None:
            logits = logits - self.item_log_q[candidates]
        logits[:, 1:] = logits[:, 1:].masked_fill(negatives == targets[:, None], float("-inf"))
        loss = F.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.long, device=h.device))
        return LossOutput(loss, {"sampled_softmax": loss.detach()})


class InBatchSoftmaxLoss(nn.Module):
    """Softmax over the batch's targets (Yi et al., RecSys 2019): position p's positive is its own
    target (column p), its negatives the other positions' targets.

    logit[p, j] = cos(h_p, v_j) / temperature - log q_j with ``log_q`` given (the logQ
    correction, not divided by the temperature; the positive's logit is corrected too). Column
    j != p is masked when it is the same item as p's positive, or when ``seen[p, j]`` (the user
    already has it). Duplicate negatives stay: the correction accounts for how often they come.
    """

    def __init__(self, temperature: float = 0.05):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} is out of range; allowed: > 0")
        self.temperature = temperature

    def forward(self, h: torch.Tensor, vectors: torch.Tensor, targets: torch.Tensor,
                log_q: torch.Tensor | None = None, seen: torch.Tensor | None = None) -> LossOutput:
        """h (P, D) user vectors, vectors (P, D) their targets' item vectors, targets (P,) item ids,
        log_q (P,) log-probability of each target being in a batch, seen (P, P) bool."""
        user = F.normalize(h.float(), dim=-1)  # (P, D)
        items = F.normalize(vectors.float(), dim=-1)  # (P, D)
        logits = user @ items.T / self.temperature  # (P, P)
        if log_q is not None:
            logits = logits - log_q.float()[None, :]
        mask = targets[None, :] == targets[:, None]  # (P, P) same item as the row's positive
        if seen is not None:
            mask |= seen
        mask.fill_diagonal_(False)
        logits = logits.masked_fill(mask, float("-inf"))
        loss = F.cross_entropy(logits, torch.arange(len(targets), device=h.device))
        return LossOutput(loss, {"in_batch_softmax": loss.detach()})


def seen_in_history(history: torch.Tensor, keep: torch.Tensor, candidates: torch.Tensor, n_items: int) -> torch.Tensor:
    """history (B, T) left-padded ids, keep (B, T) bool the positions with a target (P of them, in
    ``h[keep]`` order), candidates (P,) item ids -> (P, P) bool: True where candidate j is among
    the items position p's user had up to and including p (history[b, :t + 1])."""
    B, T = history.shape
    positions = torch.arange(T, device=history.device, dtype=torch.int32).expand(B, T)  # (B, T)
    first = torch.full((B, n_items + 1), T, dtype=torch.int32, device=history.device)  # (B, N + 1)
    first.scatter_reduce_(1, history, positions, reduce="amin")  # first position of each item in each row
    rows, cols = keep.nonzero(as_tuple=True)  # (P,), (P,): row-major, as h[keep]
    return first[rows[:, None], candidates[None, :]] <= cols[:, None].int()  # (P, P)


FREQUENCY_MODES = ("streaming", "counts")


class ItemFrequency(nn.Module):
    """How likely each item is to be in a training batch, estimated from the batches as they come.

    ``streaming``: Yi et al. 2019, Algorithm 2, with item ids as the hash: per item the step it was
    last seen (A) and an EMA of the gap between sightings (B), B <- (1 - alpha) B + alpha (t - A);
    p_i = 1 / B_i. Its first sighting sets B to the steps since the start (no EMA yet), so a
    fresh estimate is not dominated by an arbitrary initial value. An item seen several times in
    one step counts once: p_i is the chance of being in a batch, as in the paper.
    ``counts``: p_i = count_i / total over the targets seen so far; after one epoch these are the
    training targets' counts (a constant factor, the epochs, cancels in the softmax).
    The state is buffers, so a checkpoint carries it and a resumed run continues it. Under DDP the
    buffers are broadcast from rank 0 at each forward, so every rank uses rank 0's estimate.
    """

    def __init__(self, n_items: int, mode: str = "streaming", alpha: float = 0.01):
        super().__init__()
        if mode not in FREQUENCY_MODES:
            raise ValueError(f"frequency mode {mode!r} is not allowed; choose one of {list(FREQUENCY_MODES)}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha={alpha} is out of range; allowed: 0 < alpha <= 1")
        self.mode, self.alpha = mode, alpha
        self.register_buffer("step", torch.zeros(1, dtype=torch.long))
        if mode == "streaming":
            self.register_buffer("last_seen", torch.zeros(n_items + 1, dtype=torch.long))  # 0: never
            self.register_buffer("gap", torch.zeros(n_items + 1, dtype=torch.float64))
        else:
            self.register_buffer("counts", torch.zeros(n_items + 1, dtype=torch.long))

    @torch.no_grad()
    def update(self, items: torch.Tensor) -> None:
        """One training step's target items (P,), ids >= 1."""
        self.step += 1
        if self.mode == "counts":
            self.counts.index_add_(0, items, torch.ones_like(items))
            return
        seen = items.unique()
        gap = (self.step - self.last_seen[seen]).double()  # (U,)
        first = self.last_seen[seen] == 0
        self.gap[seen] = torch.where(first, gap, (1 - self.alpha) * self.gap[seen] + self.alpha * gap)
        self.last_seen[seen] = self.step

    def probability(self, items: torch.Tensor) -> torch.Tensor:
        """items (...) -> estimated p_i (...), float64. An item never seen gets the probability of
        one sighting in all steps so far (1 / (step + 1) or 1 / total), so it is finite."""
        if self.mode == "counts":
            return self.counts[items].clamp(min=1).double() / self.counts.sum().clamp(min=1).double()
        gap = torch.where(self.last_seen[items] > 0, self.gap[items], (self.step + 1).double())
        return 1.0 / gap

    def log_prob(self, items: torch.Tensor) -> torch.Tensor:
        return self.probability(items).log()
