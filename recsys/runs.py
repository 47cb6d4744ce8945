"""Run directories: ``<root>/<stage>/<run-id>/`` with config, metrics and a readable summary.

Files are written to a temporary name and renamed into place, so a crash never leaves a
half-written file behind under the final name. A stage's very last write is ``COMPLETE``
(``mark_complete``); a directory without it crashed or is still running, and the stages that
read a run refuse it (``require_complete``).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.md"
COMPLETE_FILE = "COMPLETE"


class IncompleteRunError(ValueError):
    """A run directory that lacks its completion marker, or holds another stage's run."""


def new_run_dir(root: str | Path, stage: str, name: str = "") -> Path:
    """Create and return ``root/stage/<YYYYmmdd-HHMMSS>[-name][-n]``, never reusing one."""
    base = Path(root).resolve() / stage
    base.mkdir(parents=True, exist_ok=True)
    stem = time.strftime("%Y%m%d-%H%M%S") + (f"-{name}" if name else "")
    for n in range(1000):
        path = base / (stem if n == 0 else f"{stem}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run directory under {base}")


def named(kind: str, run_name: str) -> str:
    """A run's name where the stage names it by what it made (a data run by its format, an ids run by
    its method): ``kind``, then ``run.name`` when one is given, so ``run.name`` tells two such runs apart."""
    return f"{kind}-{run_name}" if run_name else kind


def stage_run_dir(root: str | Path, stage: str, name: str = "", parent: str | Path | None = None) -> Path:
    """A stage's run directory: ``parent/stage`` inside a pipeline run (created, must not exist),
    else a new ``root/stage/<run-id>``."""
    if parent is None:
        return new_run_dir(root, stage, name)
    path = Path(parent).resolve() / stage
    path.mkdir(parents=True)
    return path


def write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return json.loads(path.read_text())


def mark_complete(run_dir: str | Path, stage: str) -> None:
    """The last write of a stage: ``run_dir/COMPLETE`` names the stage and when it finished."""
    write_json(Path(run_dir) / COMPLETE_FILE, {"stage": stage, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def clear_complete(run_dir: str | Path) -> None:
    """Unmark a run that is about to change again (a train run being resumed)."""
    Path(run_dir, COMPLETE_FILE).unlink(missing_ok=True)


def require_complete(run_dir: str | Path, stage: str) -> Path:
    """Return ``run_dir`` resolved if it is a finished ``stage`` run; else IncompleteRunError saying
    what it is and what to do."""
    finished_stage(run_dir, (stage,))
    return Path(run_dir).resolve()


def finished_stage(run_dir: str | Path, stages: tuple[str, ...]) -> str:
    """Which of ``stages`` the finished run ``run_dir`` holds (its COMPLETE marker names it); else
    FileNotFoundError or IncompleteRunError saying what it is and what to do."""
    run_dir = Path(run_dir).resolve()
    wanted = " or ".join(stages)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} does not exist; expected a `recsys {wanted}` run directory")
    marker = run_dir / COMPLETE_FILE
    if not marker.is_file():
        again = (f"continue it with `recsys train --resume {run_dir}`" if stages == ("train",)
                 else f"run `recsys {wanted}` again")
        raise IncompleteRunError(f"{run_dir} is not a complete {wanted} run (no {COMPLETE_FILE} marker): it crashed "
                                 f"or is still running; {again}")
    found = read_json(marker).get("stage")
    if found not in stages:
        raise IncompleteRunError(f"{run_dir} is a {found} run, not a {wanted} run")
    return found


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``final``. The swap is two
    renames (``final`` -> ``.final.old``, temporary -> ``final``); a crash between them leaves only
    ``.final.old``, which ``recover_directory`` (called here and by readers) puts back."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_directory(final: str | Path) -> bool:
    """Undo a swap of ``atomic_directory`` cut between its two renames: when ``final`` is missing
    and its ``.old`` sibling exists, the previous version goes back in place. True if it did."""
    final = Path(final)
    old = final.with_name(f".{final.name}.old")
    if final.exists() or not old.is_dir():
        return False
    os.replace(old, final)
    return True


def machine_description() -> str:
    """The hardware a figure was measured on, for run metrics and benchmark records."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}"
