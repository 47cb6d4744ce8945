"""Tiny training windows shared by the generative retrievers' tests (TIGER, EAGER)."""

from typing import Callable, Iterator

import torch

from recsys.models import Batch


def tiny_windows(n_items: int, max_len: int, rows: int, seed: int = 0) -> Batch:
    """``rows`` random windows of ``max_len`` items and the next one; the first 3 rows start with 2
    padding columns. history (rows, max_len), targets (rows, max_len), target (rows,)."""
    seq = torch.randint(1, n_items + 1, (rows, max_len + 1), generator=torch.Generator().manual_seed(seed))
    seq[:3, :2] = 0
    targets = seq[:, 1:].clone()
    targets[seq[:, :-1] == 0] = 0
    return Batch(history=seq[:, :-1], targets=targets, target=seq[:, -1])


def adam_steps(model: torch.nn.Module, batch: Batch, steps: int, lr: float) -> Iterator[tuple[int, torch.Tensor]]:
    """``steps`` Adam steps of ``model.loss(batch)``; yields (step, that step's loss, before its update)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(1, steps + 1):
        loss = model.loss(batch).total
        opt.zero_grad()
        loss.backward()
        opt.step()
        yield step, loss.detach()


def fit(model: torch.nn.Module, batch: Batch, steps: int, lr: float) -> torch.Tensor:
    """``steps`` Adam steps of ``model.loss(batch)``; returns the last step's loss (before its update)."""
    for _, loss in adam_steps(model, batch, steps, lr):
        pass
    return loss


def fit_until(model: torch.nn.Module, batch: Batch, lr: float, done: Callable[[torch.Tensor], bool],
              max_steps: int, every: int = 20) -> int | None:
    """Adam steps of ``model.loss(batch)`` until ``done(loss)`` holds, asked every ``every`` steps
    with the model in eval mode (train mode restored after); the step count at which it held, or
    None after ``max_steps`` steps without. ``loss`` is the last step's, before its update."""
    for step, loss in adam_steps(model, batch, max_steps, lr):
        if step % every == 0:
            model.eval()
            held = done(loss)
            model.train()
            if held:
                return step
    return None
