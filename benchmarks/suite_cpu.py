"""Where the test suite's CPU goes: runs ``python tests/suite.py`` (what ``make test`` runs) and reads
every process's CPU time from Linux's ``/proc`` once a second, then sums it by what each process was
(Ray Train, Serve, Ray Data, Ray's daemons, the pytest lanes, ...). Writes
benchmarks/results/suite/<machine>/<name>.json and prints the table.

    python benchmarks/suite_cpu.py --name zen3          # the whole suite
    python benchmarks/suite_cpu.py --name serve -- -k serve

Stop other CPU-bound work first (a training run: ``kill -STOP``): every process on the machine is
counted, since Ray's workers are not the suite's children. A Ray worker is classed by the first
title it shows other than ``ray::IDLE`` (Ray renames a worker after the actor or task it runs); a
process that lived less than a sample is missed, so the totals are lower bounds. ``busy`` is the
counted CPU over what the machine's cores give in the wall time: near 1, the suite is CPU-bound and
its wall time is its CPU divided by the core count.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.record import process_ticks, write_record  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
UNNAMED = "ray: idle or unnamed workers"
# (category, substrings of a process's title or command line), first match wins
CATEGORIES = (
    ("ray train and tune", ("RayTrainWorker", "TrainController", "PlacementGroupCleaner", "SynchronizationActor",
                            "DatasetManager", "ImplicitFunc", "ray::_Inner", "TrainTrainable")),
    ("ray serve", ("ServeReplica", "SERVE_REPLICA", "ServeController", "SERVE_CONTROLLER", "ProxyActor",
                   "SERVE_PROXY")),
    ("ray data", ("MapWorker", "MapBatches", "HashShuffle", "AutoscalingCoordinator", "_StatsActor", "FooterReader",
                  "ListFiles", "ReadParquet", "SplitCoordinator", "ray::Map", "ray::Read", "get_table_block_metadata")),
    ("ray daemons", ("gcs_server", "raylet/raylet", "log_monitor", "dashboard", "Dashboard", "monitor.py",
                     "runtime_env", "ray::StartLog", "multiprocessing.forkserver", "ray start")),
    ("pytest: tests without ray", ("-m not ray",)),
    ("pytest: first ray lane", ("-m ray and not second_lane",)),
    ("pytest: second ray lane", ("-m ray and second_lane",)),
)


def classify(title: str) -> str:
    """A process's category from its title and command line (``/proc/<pid>/cmdline``, NULs as spaces)."""
    for category, keys in CATEGORIES:
        if any(key in title for key in keys):
            return category
    if title.startswith("ray::IDLE") or "default_worker.py" in title:
        return UNNAMED
    if title.startswith("ray::"):
        return "ray: other actors and tasks"
    return "other processes (recsys subprocesses, the kernel, ...)"


def read_title(pid: int) -> str | None:
    """A live process's command line (NULs as spaces; a kernel thread's ``[name]``), or None if it ended."""
    try:
        title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        return title or f"[{Path(f'/proc/{pid}/comm').read_text().strip()}]"
    except OSError:
        return None


def cpu_seconds() -> dict[int, float]:
    """Every process's user + system CPU so far (``benchmarks.record.process_ticks``)."""
    tick = os.sysconf("SC_CLK_TCK")
    return {pid: ticks / tick for pid, (_, ticks) in process_ticks().items()}


class Sampler:
    """Every process's CPU since the first sample (a process already running then counts from there)."""

    def __init__(self, me: int, title=read_title):
        self.me, self.title = me, title
        self.seen, self.base = {}, {}  # pid -> [category, cpu]; pid -> cpu at the first sample
        self.first = True

    def sample(self, cpu: dict[int, float] | None = None) -> None:
        """Take ``cpu`` (pid -> CPU seconds; default ``cpu_seconds()``); a command line is read only for a
        process not seen before or still unnamed."""
        for pid, seconds in (cpu_seconds() if cpu is None else cpu).items():
            if pid == self.me:
                continue
            if pid not in self.seen or self.seen[pid][0] == UNNAMED:  # new, or a worker not yet named
                title = self.title(pid)
                if title is None:  # it ended meanwhile
                    continue
                if pid not in self.seen:
                    self.base[pid] = seconds if self.first else 0.0
                    self.seen[pid] = [classify(title), 0.0]
                else:  # a worker that took an actor or a task since
                    self.seen[pid][0] = classify(title)
            self.seen[pid][1] = seconds - self.base[pid]
        self.first = False

    def totals(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for category, cpu in self.seen.values():
            row = out.setdefault(category, {"core_s": 0.0, "processes": 0})
            row["core_s"] += cpu
            row["processes"] += cpu > 0
        return {k: {"core_s": round(v["core_s"], 1), "processes": v["processes"]}
                for k, v in sorted(out.items(), key=lambda kv: -kv[1]["core_s"])}


def table(totals: dict[str, dict], wall_s: float, cores: int) -> str:
    total = sum(row["core_s"] for row in totals.values())
    lines = ["| what | processes | core-s | share |", "|---|---|---|---|"]
    lines += [f"| {k} | {row['processes']} | {row['core_s']:.0f} | {row['core_s'] / total:.0%} |"
              for k, row in totals.items() if row["core_s"] >= 0.5]
    lines.append(f"\n{total:.0f} core-s in {wall_s:.0f} s on {cores} cores: busy {total / (wall_s * cores):.0%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="the record's name")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    parser.add_argument("suite_args", nargs="*", help="passed to tests/suite.py (after --)")
    args = parser.parse_args(argv)
    if not Path("/proc/self/stat").is_file():
        raise SystemExit("suite_cpu reads /proc: Linux only")
    sampler, done = Sampler(os.getpid()), threading.Event()
    sampler.sample()

    def loop() -> None:
        while not done.wait(args.interval):
            sampler.sample()
    thread = threading.Thread(target=loop, daemon=True)
    started = time.monotonic()
    thread.start()
    status = subprocess.call([sys.executable, "tests/suite.py", *args.suite_args], cwd=REPO)
    done.set()
    thread.join()
    sampler.sample()
    wall = time.monotonic() - started
    totals, cores = sampler.totals(), os.cpu_count() or 1
    total = sum(row["core_s"] for row in totals.values())
    print(table(totals, wall, cores))
    path = write_record(args.name, model="suite", dataset="local", wall_s=wall,
                        config={"suite_args": args.suite_args, "interval_s": args.interval},
                        metrics={"suite_status": status, "core_s": round(total, 1), "cores": cores,
                                 "busy": round(total / (wall * cores), 3), "by_category": totals})
    print(f"record: {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
