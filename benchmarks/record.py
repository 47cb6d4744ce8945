"""Benchmark records: ``benchmarks/results/<name>.json`` with command, date, commit, machine,
config, wall time and metrics under the project's fixed keys."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

from recsys.runs import machine_description

RESULTS = Path(__file__).parent / "results"
QUALITY_KEYS = [f"{m}@{k}" for m in ("recall", "ndcg") for k in (5, 10, 20)]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"




def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def write_record(name: str, *, config: dict, wall_s: float, metrics: dict, extra: dict | None = None) -> Path:
    """metrics: {"test": {...}, "valid": {...}} and/or speed keys (items_per_s, p50_ms, ...)."""
    for split in ("test", "valid"):
        if split in metrics and set(metrics[split]) != set(QUALITY_KEYS):
            raise ValueError(f"{split} metrics must have exactly the keys {QUALITY_KEYS}")
    record = {
        "name": name,
        "command": " ".join(["python", *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": machine_description(),
        "config": config,
        "wall_s": round(wall_s, 1),
        "metrics": metrics,
        **(extra or {}),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
