"""The whole suite as ``make test`` runs it: two pytest processes side by side.

The tests marked ``ray`` share one local Ray instance; they spend about a third of their time
waiting (process start-ups, Serve replicas coming up, polls, HTTP), and they are the critical
path. The other tests are CPU-bound and need no Ray. So the Ray tests run in the foreground, and
the rest run beside them at the lowest CPU priority (nice 19), taking only the cycles the Ray
tests leave idle: on a 2-core machine the whole suite takes about as long as the Ray tests alone.
A second Ray instance on the same cores would defeat this, so ``conftest.py`` fails any test that
is not marked ``ray`` and starts Ray.

Every test runs, in exactly one of the two processes (``-m ray`` and ``-m "not ray"``). The Ray
part prints as it goes; the other part's output follows it. The exit status is the worse of the
two. Arguments are passed to both, e.g. ``python tests/suite.py -x -k serve``.

    python tests/suite.py [PYTEST_ARGS ...]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

PYTEST = [sys.executable, "-m", "pytest", "-q"]
NO_TESTS_COLLECTED = 5  # pytest's exit status when a filter leaves a part empty


def low_priority() -> None:
    os.nice(19)


def wait(proc: subprocess.Popen) -> int:
    """Its exit status. Ctrl-C reaches the children too (one process group): each stops and prints
    its summary, and its status says it was interrupted, so wait for it rather than leave it."""
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return proc.wait()


def combined_status(ray: int, rest: int) -> int:
    """The worse status; a part that a filter left empty does not fail the run, both empty do. A part
    killed by a signal (Popen's -N) counts as a shell reports it, 128 + N."""
    ray, rest = (128 - code if code < 0 else code for code in (ray, rest))
    if ray == rest == NO_TESTS_COLLECTED:
        return NO_TESTS_COLLECTED
    codes = [code for code in (ray, rest) if code != NO_TESTS_COLLECTED]
    return max(codes)


def main(args: list[str]) -> int:
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        # its own cache dir, so the two processes never write the same lastfailed file
        rest = subprocess.Popen([*PYTEST, "-m", "not ray", "-o", "cache_dir=.pytest_cache/not-ray", *args],
                                stdout=log, stderr=subprocess.STDOUT, preexec_fn=low_priority)
        ray_status = wait(subprocess.Popen([*PYTEST, "-m", "ray", *args]))
        ray_done = time.monotonic() - started
        rest_status = wait(rest)
        log.seek(0)
        print("\n---- tests not marked `ray` (run beside the Ray tests at nice 19) ----", flush=True)
        sys.stdout.write(log.read())
    total = time.monotonic() - started
    print(f"---- suite: Ray tests exit {ray_status} after {ray_done:.0f} s; the rest exit {rest_status}; "
          f"wall {total:.0f} s ----", flush=True)
    return combined_status(ray_status, rest_status)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
