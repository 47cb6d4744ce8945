"""The whole suite as ``make test`` runs it: three pytest processes in two lanes.

The tests marked ``ray`` spend about a third of their time waiting (process start-ups, Serve
replicas coming up, polls, HTTP), and they are the critical path. The other tests are CPU-bound
and need no Ray. So:

- the first lane runs most Ray tests (``-m "ray and not second_lane"``) in the foreground;
- the second lane runs the rest beside it at the lowest CPU priority (nice 19), taking only the
  cycles the Ray tests leave idle, and once they are done, the Ray tests marked ``second_lane``
  (conftest.py's SECOND_LANE_MODULES) at normal priority, in a Ray instance of their own: two Ray
  lanes fill each other's waits.

The three have one OpenMP thread each (``ONE_THREAD``). conftest.py fails any test that is not
marked ``ray`` and starts Ray, so no Ray instance appears at nice 19. Every test runs, in exactly one
process. The first lane prints as it goes; the others' output follows. The exit status is the worst
of the three. Arguments are passed to all three, e.g. ``python tests/suite.py -x -k serve``. The three
share a directory in which the first to need one of the costly session fixtures builds it for all
(tests/shared_builds.py).

    python tests/suite.py [PYTEST_ARGS ...]
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

from shared_builds import SHARED_DIR_ENV

PYTEST = [sys.executable, "-m", "pytest", "-q"]
NO_TESTS_COLLECTED = 5  # pytest's exit status when a filter leaves a part empty
INTERRUPTED = 2  # pytest's exit status after Ctrl-C (or a collection error)
# Three pytest processes share 2 cores: with two OpenMP threads, one of them waits for a core another
# lane holds and the other spins at every barrier. Measured 2026-12-07 (Ice Lake, beside a one-core busy
# loop): the two cold-start benchmark tests took 402 s at nice 19 with 2 threads, 18 s with 1. A test
# that sets its own thread count (trainer.resources.threads) still gets it.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def low_priority() -> None:
    os.nice(19)


def combined_status(*statuses: int) -> int:
    """The worst status; a part that a filter left empty does not fail the run, all empty do. A part
    killed by a signal (Popen's -N) counts as a shell reports it, 128 + N."""
    codes = [128 - code if code < 0 else code for code in statuses]
    if all(code == NO_TESTS_COLLECTED for code in codes):
        return NO_TESTS_COLLECTED
    return max(code for code in codes if code != NO_TESTS_COLLECTED)


class SecondLane(threading.Thread):
    """The tests without Ray at nice 19, then (unless they were interrupted) the second lane's Ray
    tests at normal priority; each part's output goes to its own log."""

    def __init__(self, args: list[str], rest_log, ray_log):
        super().__init__(daemon=True)
        self.args, self.rest_log, self.ray_log = args, rest_log, ray_log
        self.interrupted, self.lock = threading.Event(), threading.Lock()
        self.ray = self.rest_status = self.ray_status = None
        self.ray_started = self.ray_ended = None
        # started here, not in run(), so that Ctrl-C can never find it not yet started
        self.rest = subprocess.Popen([*PYTEST, "-m", "not ray", "-o", "cache_dir=.pytest_cache/not-ray", *args],
                                     stdout=rest_log, stderr=subprocess.STDOUT, preexec_fn=low_priority)

    def run(self) -> None:
        self.rest_status = self.rest.wait()
        with self.lock:
            if self.interrupted.is_set() or self.rest_status == INTERRUPTED:
                return
            self.ray_started = time.monotonic()
            self.ray = subprocess.Popen([*PYTEST, "-m", "ray and second_lane", "-o",
                                         "cache_dir=.pytest_cache/second-lane", *self.args],
                                        stdout=self.ray_log, stderr=subprocess.STDOUT)
        self.ray_status = self.ray.wait()
        self.ray_ended = time.monotonic()

    def interrupt(self) -> None:
        """After Ctrl-C: the second lane's Ray tests do not start, or, if they started just after the
        signal reached the process group, they are interrupted too."""
        with self.lock:
            self.interrupted.set()
            if self.ray is not None:
                self.ray.send_signal(signal.SIGINT)


def main(args: list[str]) -> int:
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as rest_log, tempfile.TemporaryFile("w+") as ray_log, \
            tempfile.TemporaryDirectory(prefix="recsys-tests-") as shared:
        os.environ[SHARED_DIR_ENV] = shared  # the three processes build the costly session fixtures once
        os.environ.update(ONE_THREAD)
        lane = SecondLane(args, rest_log, ray_log)
        lane.start()
        first = subprocess.Popen([*PYTEST, "-m", "ray and not second_lane", *args])
        try:
            first_status = first.wait()
        except KeyboardInterrupt:
            lane.interrupt()
            first_status = first.wait()
        first_done = time.monotonic() - started
        while lane.is_alive():  # join() with a timeout, so that Ctrl-C is seen here too
            try:
                lane.join(0.5)
            except KeyboardInterrupt:
                lane.interrupt()
        for title, log in (("tests not marked `ray` (second lane, nice 19)", rest_log),
                           ("Ray tests marked `second_lane` (second lane, after the tests without Ray)", ray_log)):
            log.seek(0)
            print(f"\n---- {title} ----", flush=True)
            sys.stdout.write(log.read())
    total = time.monotonic() - started
    if lane.ray_status is None:
        second = "did not start (interrupted)"
        lane.ray_status = INTERRUPTED
    else:
        second = (f"exit {lane.ray_status} ({lane.ray_started - started:.0f}-{lane.ray_ended - started:.0f} s)")
    print(f"---- suite: first lane's Ray tests exit {first_status} after {first_done:.0f} s; the tests without "
          f"Ray exit {lane.rest_status}; the second lane's Ray tests {second}; wall {total:.0f} s ----", flush=True)
    return combined_status(first_status, lane.rest_status, lane.ray_status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
