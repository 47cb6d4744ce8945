"""Paired comparisons of two models on the same users: the mean per-user difference of a metric
and its standard error.

Both models rank the same users' targets, so the per-user difference d_u = m_B(u) - m_A(u) cancels
what makes a user easy or hard; its standard error, sd(d) / sqrt(U), is far smaller than that of
two independent means. With several training seeds each user's figure is first averaged over the
seeds (the seeds are paired by the same users), so the error reflects users, not seeds; the spread
between seeds is reported beside it (``seed_differences``).
"""

from __future__ import annotations

import numpy as np


def paired_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """a, b: metric -> per-user values, (U,) or (seeds, U) (averaged over seeds first), the same
    users in the same order. Returns metric -> {"diff": mean(b - a), "se": sd(b - a) / sqrt(U),
    "z": diff / se (0 when both are 0), "seed_differences": [mean(b_s - a_s) per seed]}."""
    if set(a) != set(b):
        raise ValueError(f"the two models have different metrics: {sorted(a)} against {sorted(b)}")
    out = {}
    for name in a:
        va, vb = np.atleast_2d(np.asarray(a[name], dtype=np.float64)), np.atleast_2d(np.asarray(b[name], dtype=np.float64))
        if va.shape != vb.shape:
            raise ValueError(f"{name}: per-user values of shape {va.shape} against {vb.shape}; pair the same "
                             "seeds and users")
        users = va.shape[1]
        if users < 2:
            raise ValueError(f"{name}: a paired standard error needs at least 2 users, got {users}")
        d = (vb - va).mean(0)  # (U,) per-user difference, averaged over seeds
        diff, se = float(d.mean()), float(d.std(ddof=1) / np.sqrt(users))
        out[name] = {"diff": diff, "se": se, "z": diff / se if se > 0 else 0.0,
                     "seed_differences": [float(x) for x in (vb - va).mean(1)]}
    return out


def paired_table(column: str, names: list[str], means: dict[str, dict[str, float]],
                 paired: dict[str, dict[str, dict]], reference: str) -> str:
    """A markdown table: one row per label (``means``' order), each metric's mean, and for every
    label but the reference its paired difference ``(+d ± se)`` against the reference."""
    lines = [f"| {column} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label in means:
        cells = [f"{means[label][n]:.4f}" + ("" if label == reference else
                 f" ({paired[label][n]['diff']:+.4f} ± {paired[label][n]['se']:.4f})") for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
