"""Benchmark records: ``benchmarks/results/<model>/<dataset>/<name>.json`` with command, date, commit,
machine, config, wall time and metrics under the project's fixed keys.

A record with quality figures (``metrics.test`` / ``metrics.valid``) names its protocol:
``{"history": "kept" | "excluded", "refit": bool, "selected_on": "valid" | "none"}``. ``history``
says whether the user's history items stay in the ranking (kept: TIGER's and EAGER's released code,
LC-Rec, GRID and cornac score this way) or are removed (S3-Rec's masking); ``refit`` whether the test
model was trained on training + validation transitions (its epoch count then comes from an earlier,
validated run); ``selected_on`` the split the checkpoint (or beam width) was chosen on, ``none``
for what selects nothing (count baselines, fixed-epoch timings)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from recsys.runs import machine_description

RESULTS = Path(__file__).parent / "results"
QUALITY_KEYS = [f"{m}@{k}" for m in ("recall", "ndcg") for k in (5, 10, 20)]
RANKER_KEYS = ["auc", "gauc"]  # a ranker's record holds these beside QUALITY_KEYS (issue 22)
HISTORY = ("kept", "excluded")
SELECTED_ON = ("valid", "none")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# the instruction sets that decide a CPU's speed here: vector width, native bf16, AMX
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_fields(cpuinfo: str) -> dict[str, str]:
    """The first processor's fields of a ``/proc/cpuinfo`` text (every processor repeats them)."""
    field: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            field.setdefault(key.strip(), value.strip())
    return field


# Other processes using more than this many cores on average while a benchmark ran make it "shared".
SHARED_CORES = 0.25


def process_ticks(proc: Path = Path("/proc")) -> dict[int, tuple[int, int]]:
    """Every process now: pid -> (parent pid, user + system CPU time in clock ticks), from Linux's
    ``/proc/<pid>/stat`` ({} where there is no /proc)."""
    procs = {}
    for stat in proc.glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # it ended meanwhile
            continue
        fields = text[text.rindex(")") + 2:].split()  # after the command name, which may hold spaces
        procs[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return procs


def tree(procs: dict[int, tuple[int, int]], root: int) -> set[int]:
    """``root`` and its descendants among ``procs``."""
    children = defaultdict(list)
    for pid, (parent, _) in procs.items():
        children[parent].append(pid)
    found, stack = set(), [root]
    while stack:
        pid = stack.pop()
        found.add(pid)
        stack.extend(children[pid])
    return found


def others_cpu_ticks(before: dict[int, tuple[int, int]], now: dict[int, tuple[int, int]], me: int) -> int:
    """CPU ticks that processes outside ``me``'s tree used between the two snapshots (a process that
    started since counts whole; one that ended meanwhile is missed, so this is a lower bound)."""
    ours = tree(now, me)
    return sum(max(0, ticks - before.get(pid, (0, 0))[1]) for pid, (_, ticks) in now.items() if pid not in ours)


class OtherProcesses:
    """What the rest of the machine did while this benchmark ran: the CPU that processes outside this
    process's tree (its Ray workers and Serve replicas are inside it) used since this module was
    imported. The load average cannot tell: it counts the benchmark's own threads too."""

    def __init__(self):
        self.started, self.before = time.monotonic(), process_ticks()

    def cores(self) -> float | None:
        """Their mean number of busy cores so far; None without /proc."""
        now = process_ticks()
        if not now:
            return None
        ticks = others_cpu_ticks(self.before, now, os.getpid())
        return ticks / os.sysconf("SC_CLK_TCK") / max(time.monotonic() - self.started, 1e-3)


OTHERS = OtherProcesses()  # from the import: every benchmark script imports this module first


def machine_note(threads: int) -> dict:
    """What a speed or wall-time figure was measured on, beyond ``machine_description``: the CPU's
    model name, family and model number (a virtual machine may name only "AMD EPYC", and two of its
    generations differ ~1.5x in speed here), its ISA flags among ``ISA_FLAGS``, whether it runs
    bf16 natively, the torch threads used, the load average, and the cores that other processes kept
    busy while the benchmark ran (``OtherProcesses``). Above ``SHARED_CORES`` the note says the
    machine was shared: the figure is an upper bound on a quiet machine's."""
    from recsys.hardware import cpu_supports_bf16

    cpuinfo = Path("/proc/cpuinfo")
    field = cpu_fields(cpuinfo.read_text() if cpuinfo.is_file() else "")
    flags = set(field.get("flags", "").split())
    cpus = os.cpu_count() or 1
    others = OTHERS.cores()
    note = {"cpu": field.get("model name", "unknown"),
            "cpu_family_model": f"{field.get('cpu family', '?')}/{field.get('model', '?')}",
            "cpu_flags": [f for f in ISA_FLAGS if f in flags], "native_bf16": cpu_supports_bf16(),
            "cpus": cpus, "torch_threads": threads, "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "other_processes_cores": None if others is None else round(others, 2)}
    if others is not None and others > SHARED_CORES:
        note["shared"] = (f"other processes kept {others:.2f} of {cpus} CPUs busy on average while this ran: "
                          "the machine was shared")
    return note


def torch_threads() -> int:
    """The torch threads of this process: what a record's figures ran with unless its script says."""
    import torch

    return torch.get_num_threads()


def training_time(run_dir: Path) -> dict | None:
    """What a train run took to its selected epoch, from its ``epochs.jsonl`` and ``metrics.json``
    (None without ``epochs.jsonl``; a run stopped by hand has no ``metrics.json``): the seconds of training steps to that epoch, and an estimate of
    the wall time with validation, taken as the steps plus, per epoch, the median time between two
    consecutive epochs' ends less the later one's steps (so a pause between a stop and a resume
    counts nothing). Also the run's selected epoch and the config it trained with."""
    run_dir = Path(run_dir)
    if not (run_dir / "epochs.jsonl").is_file():
        return None
    epochs = [json.loads(line) for line in (run_dir / "epochs.jsonl").read_text().splitlines() if line.strip()]
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    if metrics.get("epochs_run") != epochs[-1]["epoch"]:
        metrics = {}  # written by an earlier invocation (a stop_epoch before a resume): not this run's end
    best = int(epochs[-1]["best_epoch"])
    steps = [e["epoch_s"] for e in epochs if e["epoch"] <= best]
    between = sorted(b["finished_at"] - a["finished_at"] - b["epoch_s"]
                     for a, b in zip(epochs, epochs[1:]) if b["epoch"] == a["epoch"] + 1)
    other = between[len(between) // 2] if between else 0.0
    return {"run": str(run_dir), "selected_epoch": best, "epochs_run": int(epochs[-1]["epoch"]),
            "finished": bool(metrics),
            "train_steps_s_to_selected": round(sum(steps), 1),
            "wall_s_to_selected_estimate": round(sum(steps) + other * len(steps), 1),
            "validation_and_checkpoint_s_per_epoch_median": round(other, 1),
            "samples_per_s": round(sum(e["samples_per_s"] for e in epochs) / len(epochs), 1),
            "resumed_from_epochs": metrics.get("resumed_from_epochs"),  # None: unknown, the run did not finish
            "trained_with": json.loads((run_dir / "config.json").read_text())
            if (run_dir / "config.json").is_file() else None}


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def protocol(*, exclude_history: bool, refit: bool = False, selected_on: str = "valid") -> dict:
    """The protocol object of a record (see the module docstring)."""
    value = {"history": "excluded" if exclude_history else "kept", "refit": bool(refit), "selected_on": selected_on}
    check_protocol(value)
    return value


def check_protocol(value: object) -> None:
    """Raise ValueError unless ``value`` is a protocol object with exactly its three keys."""
    if not isinstance(value, dict) or set(value) != {"history", "refit", "selected_on"}:
        raise ValueError(f"protocol must be a dict with keys history, refit, selected_on; got {value!r}")
    if value["history"] not in HISTORY:
        raise ValueError(f"protocol.history must be one of {HISTORY}, got {value['history']!r}")
    if not isinstance(value["refit"], bool):
        raise ValueError(f"protocol.refit must be true or false, got {value['refit']!r}")
    if value["selected_on"] not in SELECTED_ON:
        raise ValueError(f"protocol.selected_on must be one of {SELECTED_ON}, got {value['selected_on']!r}")


def dataset_name(data: dict) -> str:
    """A record's dataset folder from a ``data`` config section: the data path's folder without
    ``amazon-`` (``/x/amazon-beauty`` -> ``beauty``), else the format (``synthetic``)."""
    if data.get("path"):
        return Path(data["path"]).name.removeprefix("amazon-")
    return str(data.get("format") or "unknown")


def run_dataset(run_dir: Path) -> str:
    """The dataset of a pipeline run directory (data, embed, ...), from its ``config.json``."""
    config = run_dir / "config.json"
    return dataset_name(json.loads(config.read_text()).get("data", {})) if config.is_file() else "unknown"


def checkpoint_model(checkpoint: Path) -> str:
    """The registered model name a checkpoint directory was saved under."""
    return json.loads((Path(checkpoint) / "model.json").read_text())["name"]


def record_path(model: str, dataset: str, name: str) -> Path:
    for part, value in (("model", model), ("dataset", dataset), ("name", name)):
        if not value or "/" in value or value.startswith("."):
            raise ValueError(f"record {part} must be a plain folder or file name, got {value!r}")
    return RESULTS / model / dataset / f"{name.removesuffix('.json')}.json"


def find_record(spec: str) -> Path:
    """A record from a path, ``MODEL/DATASET/NAME`` under the results folder, or a ``NAME`` that
    only one model/dataset folder holds."""
    path = Path(spec)
    if path.is_file():
        return path
    stem = spec.removesuffix(".json")
    if (RESULTS / f"{stem}.json").is_file():
        return RESULTS / f"{stem}.json"
    matches = sorted(RESULTS.glob(f"*/*/{stem}.json")) if "/" not in stem else []
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(f"record {spec!r} is ambiguous: " + ", ".join(str(m.relative_to(RESULTS)) for m in matches))
    raise ValueError(f"no record {spec!r}: neither a file nor MODEL/DATASET/NAME under {RESULTS}")


def write_record(name: str, *, model: str, dataset: str, config: dict, wall_s: float, metrics: dict,
                 protocol: dict | None = None, extra: dict | None = None) -> Path:
    """Write ``benchmarks/results/<model>/<dataset>/<name>.json``. metrics: {"test": {...},
    "valid": {...}} and/or speed keys (items_per_s, p50_ms, ...); quality figures need ``protocol``.
    Every record names the CPU it ran on, its ISA flags and whether it runs bf16 natively
    (``machine_note``): the script's own note in ``extra``, else this process's."""
    for split in ("test", "valid"):
        if split in metrics and set(metrics[split]) - set(RANKER_KEYS) != set(QUALITY_KEYS):
            raise ValueError(f"{split} metrics must have exactly the keys {QUALITY_KEYS} (a ranker's also "
                             f"{RANKER_KEYS})")
    if protocol is not None or "test" in metrics or "valid" in metrics:
        check_protocol(protocol)
    path = record_path(model, dataset, name)
    extra = dict(extra or {})
    note = extra.pop("machine_note", None) or machine_note(torch_threads())
    record = {
        "name": name,
        "model": model,
        "dataset": dataset,
        **({"protocol": protocol} if protocol is not None else {}),
        "command": " ".join(["python", *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "machine": machine_description(),
        "machine_note": note,
        "config": config,
        "wall_s": round(wall_s, 1),
        "metrics": metrics,
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
