"""Session fixtures that `make test` builds once for all of its pytest processes.

tests/suite.py runs three pytest processes (tests/suite.py's docstring), and a session fixture is
built once per process: the tiny TIGER pipeline and the cascade over it are needed by the Serve tests
(first lane) and by the ranking tests (the tests without Ray), about 15 s of CPU each time on a 2-core
machine. Under the suite, ``RECSYS_TEST_SHARED_DIR`` names a directory the three processes share:
the first process at normal priority that needs a build makes it under a file lock, the others at
that priority wait for the lock and read what it returned. A process at lower priority (the suite's
nice-19 lane) never holds a build that another waits for: three fresh clones that let it build
under the lock had the first lane waiting on it (its slowest test 45 s against 31 s); it reads a
finished build, or makes its own, privately. Outside the suite (plain ``pytest``) each process builds
its own, as before. The consumers only read what was built (they write new runs elsewhere, or
beside it)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Callable

SHARED_DIR_ENV = "RECSYS_TEST_SHARED_DIR"
PATH_TAG = "__path__"


def encode(value):
    if isinstance(value, Path):
        return {PATH_TAG: str(value)}
    if isinstance(value, dict):
        return {key: encode(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(item) for item in value]
    return value


def decode(value):
    if isinstance(value, dict):
        if set(value) == {PATH_TAG}:
            return Path(value[PATH_TAG])
        return {key: decode(item) for key, item in value.items()}
    if isinstance(value, list):
        return [decode(item) for item in value]
    return value


def built_once(name: str, make_dir: Callable[[str], Path], build: Callable[[Path], dict],
               low_priority: bool | None = None) -> dict:
    """``build(directory)``'s result. Without the suite's shared directory: built here, into
    ``make_dir(name)`` (e.g. ``tmp_path_factory.mktemp``). With it: built by the first process at
    normal priority to get here, into ``<shared>/<name>``, and read back by the others; a build that
    raised leaves nothing behind that counts (the next process to need it builds it again). A process
    at lower priority (``low_priority``; by default, a niceness above 0) reads a finished one, or
    builds its own into ``make_dir(name)``."""
    shared = os.environ.get(SHARED_DIR_ENV)
    if not shared:
        return build(make_dir(name))
    base = Path(shared)
    result_file, target = base / f"{name}.json", base / name
    if os.nice(0) > 0 if low_priority is None else low_priority:  # never make a higher priority wait
        if result_file.exists():
            return decode(json.loads(result_file.read_text()))
        return build(make_dir(name))
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when build raises
        if result_file.exists():
            return decode(json.loads(result_file.read_text()))
        if target.exists():  # what a process that raised left behind
            shutil.rmtree(target)
        target.mkdir()
        result = build(target)
        written = base / f"{name}.json.tmp"
        written.write_text(json.dumps(encode(result)))
        os.replace(written, result_file)  # atomic and last: a reader sees a complete result or none
        return result
