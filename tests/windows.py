"""Tiny training windows shared by the generative retrievers' tests (TIGER, EAGER)."""

from typing import Callable

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


def fit(model: torch.nn.Module, batch: Batch, steps: int, lr: float) -> torch.Tensor:
    """``steps`` Adam steps of ``model.loss(batch)``; returns the last step's loss (before its update)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model.loss(batch).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.detach()


def fit_until(model: torch.nn.Module, batch: Batch, lr: float, done: Callable[[torch.Tensor], bool],
              max_steps: int, every: int = 20) -> int | None:
    """Adam steps of ``model.loss(batch)`` until ``done(loss)`` holds, asked every ``every`` steps
    with the model in eval mode (train mode restored after); the step count at which it held, or
    None after ``max_steps`` steps without. ``loss`` is the last step's, before its update."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(1, max_steps + 1):
        loss = model.loss(batch).total
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            model.eval()
            held = done(loss.detach())
            model.train()
            if held:
                return step
    return None
