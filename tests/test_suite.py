"""`make test` (tests/suite.py) runs the tests marked ``ray`` and the rest side by side; conftest
keeps the partition honest: a test that is not marked ``ray`` may neither use the shared Ray
instance nor start Ray."""

import os
import re
from pathlib import Path

import pytest

from suite import NO_TESTS_COLLECTED, combined_status

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()


@pytest.mark.parametrize("ray, rest, expected", [(0, 0, 0), (1, 0, 1), (0, 1, 1), (2, 1, 2),
                                                  (NO_TESTS_COLLECTED, 0, 0), (0, NO_TESTS_COLLECTED, 0),
                                                  (NO_TESTS_COLLECTED, 1, 1), (0, -9, 137), (-2, 5, 130),
                                                  (NO_TESTS_COLLECTED, NO_TESTS_COLLECTED, NO_TESTS_COLLECTED)])
def test_the_suite_fails_when_either_part_fails_and_an_empty_part_is_not_a_failure(ray, rest, expected):
    assert combined_status(ray, rest) == expected


@pytest.mark.parametrize("statuses, expected", [
    ((0, 0, 0), 0), ((0, 0, 1), 1), ((NO_TESTS_COLLECTED, 0, NO_TESTS_COLLECTED), 0),
    ((NO_TESTS_COLLECTED,) * 3, NO_TESTS_COLLECTED), ((0, 1, -15), 143)])
def test_the_second_lanes_ray_tests_count_like_the_others(statuses, expected):
    assert combined_status(*statuses) == expected


def test_all_three_processes_run_with_one_openmp_thread(monkeypatch, capfd):
    """Two OpenMP threads per process stall on 2 shared cores (tests/suite.py's ONE_THREAD: 402 s
    against 18 s for two tests at nice 19 beside a busy core)."""
    import sys

    import suite
    from shared_builds import SHARED_DIR_ENV

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv(SHARED_DIR_ENV, "")  # main() sets both; monkeypatch restores them
    report = "import os, sys; print('lane', sys.argv[2], 'threads', os.environ['OMP_NUM_THREADS']); sys.exit(5)"
    monkeypatch.setattr(suite, "PYTEST", [sys.executable, "-c", report])
    assert suite.main([]) == NO_TESTS_COLLECTED
    lanes = re.findall(r"^lane (.+) threads (\d+)$", capfd.readouterr().out, re.M)
    assert sorted(lanes) == [("not ray", "1"), ("ray and not second_lane", "1"), ("ray and second_lane", "1")]


def test_the_second_lane_holds_the_ray_tests_of_its_modules_and_nothing_else(pytester):
    # the conftest as shipped, its module list pointed at a module of this temporary suite (in process:
    # the shipped list names this suite's own modules, already imported here)
    conftest, found = re.subn(r"^SECOND_LANE_MODULES = \{.*\}$", 'SECOND_LANE_MODULES = {"test_lane_two.py"}', CONFTEST,
                              flags=re.M)
    assert found == 1
    pytester.makeconftest(conftest)
    pytester.makepyfile(test_lane_two="""
import pytest

@pytest.mark.ray
def test_on_ray():
    pass

def test_without_ray():
    pass
""", test_lane_one="""
import pytest

@pytest.mark.ray
def test_on_ray():
    pass
""")
    markers = ["-o", "markers=ray: r\nsecond_lane: s", "-p", "no:cacheprovider"]
    second = pytester.runpytest_inprocess("-m", "ray and second_lane", "--collect-only", "-q", *markers)
    assert [line for line in second.outlines if "::" in line] == ["test_lane_two.py::test_on_ray"]
    first = pytester.runpytest_inprocess("-m", "ray and not second_lane", "--collect-only", "-q", *markers)
    assert [line for line in first.outlines if "::" in line] == ["test_lane_one.py::test_on_ray"]


def test_a_test_that_uses_the_shared_ray_but_is_not_marked_ray_is_refused_at_collection(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_unmarked="def test_uses_ray(ray_session):\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "use ray_session but are not marked `ray`: ['test_unmarked.py::test_uses_ray']" in result.stderr.str()


def test_a_test_that_starts_ray_but_is_not_marked_ray_fails(pytester):
    # a stand-in for `ray` in a fresh interpreter: the check reads only ray.is_initialized()
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_starts="""
import sys, types

import pytest

def test_starts_ray():
    sys.modules["ray"] = types.SimpleNamespace(is_initialized=lambda: True)

@pytest.mark.ray
def test_marked_may():
    sys.modules["ray"] = types.SimpleNamespace(is_initialized=lambda: True)
""")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-o", "markers=ray: r")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*test_starts.py::test_starts_ray started Ray but is not marked `ray`*"])


def test_a_shared_build_is_made_once_for_every_process_and_a_failed_one_is_made_again(tmp_path, monkeypatch):
    import json
    import subprocess
    import sys

    from shared_builds import SHARED_DIR_ENV, built_once

    calls = []

    def build(directory: Path) -> dict:
        calls.append(directory)
        (directory / "run").mkdir()
        return {"run": directory / "run", "metrics": {"ndcg@10": 0.5, "path": "not a Path"}, "dirs": [directory]}

    # without the suite's directory: every call builds, into the directory it is given
    monkeypatch.delenv(SHARED_DIR_ENV, raising=False)  # tests/suite.py sets it for the suite itself
    made = iter([tmp_path / "a", tmp_path / "b"])
    for _ in range(2):
        built_once("x", lambda name: _mkdir(next(made)), build)
    assert calls == [tmp_path / "a", tmp_path / "b"]

    shared = tmp_path / "shared"
    shared.mkdir()
    monkeypatch.setenv(SHARED_DIR_ENV, str(shared))

    def fails(directory: Path) -> dict:
        (directory / "half").mkdir()
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        built_once("x", _unused, fails, low_priority=False)
    calls.clear()
    first = built_once("x", _unused, build, low_priority=False)  # the failed build's leftovers are gone
    assert calls == [shared / "x"] and not (shared / "x" / "half").exists()
    assert first == {"run": shared / "x" / "run", "metrics": {"ndcg@10": 0.5, "path": "not a Path"},
                     "dirs": [shared / "x"]}
    assert built_once("x", _unused, build, low_priority=False) == first and len(calls) == 1
    # another process reads it, with Paths restored, and never calls its own build
    code = ("import json, sys; sys.path.insert(0, 'tests'); from shared_builds import built_once; "
            "r = built_once('x', None, lambda d: 1 / 0); "
            "print(json.dumps({'run_is_path': type(r['run']).__name__, 'run': str(r['run'])}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                         capture_output=True, text=True, env={**os.environ, SHARED_DIR_ENV: str(shared)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"run_is_path": "PosixPath", "run": str(shared / "x" / "run")}
    # a process at lower priority (the suite's nice-19 lane) never waits on the lock, which one at
    # normal priority may hold for a whole build: with it held and nothing finished, it builds its own
    import fcntl

    with open(shared / "y.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another open file: built_once's flock here would block
        own = built_once("y", lambda name: _mkdir(tmp_path / "private"), lambda d: {"dir": d}, low_priority=True)
    assert own == {"dir": tmp_path / "private"} and not (shared / "y.json").exists()
    assert built_once("x", _unused, fails, low_priority=True) == first  # ... and reads a finished one


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _unused(name: str) -> Path:
    raise AssertionError("with the shared directory set, no per-process directory is made")
