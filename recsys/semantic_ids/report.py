"""How good are the semantic IDs? Codebook use per level, collisions, and a usage plot.

Utilisation (used codes / K) and perplexity (exp of the entropy of code usage; K would mean
perfectly uniform use) show codebook collapse; the collision rate and the largest group show
how much work the collision level has to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recsys.semantic_ids.base import validate_codes

QUALITY_FILE = "id_quality.json"
USAGE_PLOT = "code_usage.png"


def _level_stats(column: np.ndarray, size: int) -> dict[str, float]:
    counts = np.bincount(column, minlength=size).astype(np.float64)  # (K,)
    p = counts[counts > 0] / max(len(column), 1)
    perplexity = float(np.exp(-(p * np.log(p)).sum())) if len(p) else 0.0
    used = int((counts > 0).sum())
    return {"codebook_size": size, "used": used, "utilisation": used / size, "perplexity": perplexity,
            "max_count": int(counts.max()) if len(column) else 0}


def id_quality(codes: Any, codebook_sizes: list[int], reconstruction_error: float | None = None) -> dict:
    """codes (N, L) -> {"n_items", "n_levels", "levels": [per-level stats], "unique_tuples",
    "collision_rate" (share of items whose tuple is shared, before dedupe), "max_items_per_tuple",
    "reconstruction_error"}."""
    c = validate_codes(codes.numpy() if isinstance(codes, torch.Tensor) else codes, codebook_sizes)
    levels = [{"level": level, **_level_stats(c[:, level], size)} for level, size in enumerate(codebook_sizes)]
    if len(c):
        _, inverse, counts = np.unique(c, axis=0, return_inverse=True, return_counts=True)
        shared = int((counts[inverse.reshape(-1)] > 1).sum())
    else:
        counts, shared = np.zeros(0, dtype=np.int64), 0
    return {
        "n_items": int(len(c)),
        "n_levels": len(codebook_sizes),
        "levels": levels,
        "unique_tuples": int(len(counts)),
        "collision_rate": shared / max(len(c), 1),
        "max_items_per_tuple": int(counts.max()) if len(counts) else 0,
        "reconstruction_error": None if reconstruction_error is None else float(reconstruction_error),
    }


def plot_code_usage(codes: Any, codebook_sizes: list[int], path: str | Path) -> Path:
    """PNG with one panel per level: code usage counts sorted high to low (a flat curve is
    uniform use; a cliff is collapse)."""
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, touches no global backend

    c = validate_codes(codes.numpy() if isinstance(codes, torch.Tensor) else codes, codebook_sizes)
    n_levels = len(codebook_sizes)
    fig = Figure(figsize=(4 * n_levels, 3))
    axes = fig.subplots(1, n_levels, squeeze=False)
    for level, (ax, size) in enumerate(zip(axes[0], codebook_sizes)):
        counts = np.sort(np.bincount(c[:, level], minlength=size))[::-1]  # (K,) descending
        stats = _level_stats(c[:, level], size)
        ax.bar(np.arange(size), counts, width=1.0)
        ax.set_title(f"level {level}: {stats['used']}/{size} used, ppl {stats['perplexity']:.1f}", fontsize=9)
        ax.set_xlabel("code rank")
        ax.set_ylabel("items" if level == 0 else "")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def markdown_table(quality: dict) -> str:
    """A short markdown summary of ``id_quality``'s output."""
    lines = ["| level | K | used | utilisation | perplexity |", "|---|---|---|---|---|"]
    for lv in quality["levels"]:
        lines.append(f"| {lv['level']} | {lv['codebook_size']} | {lv['used']} | {lv['utilisation']:.3f} "
                     f"| {lv['perplexity']:.1f} |")
    lines.append("")
    lines.append(f"items {quality['n_items']}, unique tuples {quality['unique_tuples']}, "
                 f"collision rate {quality['collision_rate']:.4f}, "
                 f"max items per tuple {quality['max_items_per_tuple']}")
    if quality["reconstruction_error"] is not None:
        lines.append(f"reconstruction MSE {quality['reconstruction_error']:.6g}")
    return "\n".join(lines) + "\n"


def write_report(directory: str | Path, codes: Any, codebook_sizes: list[int],
                 reconstruction_error: float | None = None) -> str:
    """Write id_quality.json and code_usage.png into ``directory``; return the markdown table."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    quality = id_quality(codes, codebook_sizes, reconstruction_error)
    (directory / QUALITY_FILE).write_text(json.dumps(quality, indent=2))
    plot_code_usage(codes, codebook_sizes, directory / USAGE_PLOT)
    return markdown_table(quality)
