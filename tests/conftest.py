"""Shared fixtures. One local Ray instance serves each pytest process's Ray tests (starting Ray costs
~3 s and each Ray Train fit ~12 s here, so tests share it and keep fits few); under `make test` the
two Ray lanes of tests/suite.py have one each."""

import os
import socket
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train's controller polls its workers every 2 s by default, so each fit waits up to a poll
# after the workers finish (and a killed worker is noticed up to 2 s late); the tests fit often
# (a one-worker RQ-VAE fit: 31.6 s -> 21.3 s at 0.2 s). Read by the controller actor, which
# inherits this environment from the Ray the session starts (or the `ray start` of test_cluster).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Ray starts its workers at nice 15 (RAY_worker_niceness), barely above the nice 19 at which
# `make test` runs the tests not marked `ray` beside the Ray ones (tests/suite.py): at 15 against
# 19 the CPU is shared about 70/30 and the Ray tests, the critical path, slow down. At 0 the other
# tests take only the cycles the Ray tests leave idle.
os.environ.setdefault("RAY_worker_niceness", "0")


def ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


# The Ray tests of these modules form tests/suite.py's second lane: they run, in a Ray instance of
# their own, once the tests not marked ``ray`` are done, beside the first lane's Ray tests. Chosen so
# that both lanes end together: with test_ids_stage.py here too, the second lane ended 106-172 s after
# the first in five fresh clones on an Ice Lake (76 s on a Zen 4); it moved to the first lane on
# 2026-12-07 (docs/experiments/ci.md).
SECOND_LANE_MODULES = {"test_tune.py", "test_embed_ray.py"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by mark
def pytest_collection_modifyitems(config, items):
    """`make test` runs the tests not marked ``ray`` beside the Ray ones (tests/suite.py): none of
    them may use the shared Ray instance. The Ray tests of SECOND_LANE_MODULES get ``second_lane``."""
    unmarked = [item.nodeid for item in items
                if "ray_session" in getattr(item, "fixturenames", ()) and item.get_closest_marker("ray") is None]
    if unmarked:
        raise pytest.UsageError(f"these tests use ray_session but are not marked `ray`: {unmarked}")
    for item in items:
        if item.get_closest_marker("ray") is not None and item.path.name in SECOND_LANE_MODULES:
            item.add_marker(pytest.mark.second_lane)


@pytest.fixture(autouse=True)
def ray_only_where_marked(request):
    """Fails a test not marked ``ray`` that leaves Ray started in this process: such a test would
    start a second Ray instance beside the Ray tests' under `make test` (tests/suite.py)."""
    before = ray_running()
    yield
    if not before and ray_running() and request.node.get_closest_marker("ray") is None:
        pytest.fail(f"{request.node.nodeid} started Ray but is not marked `ray` (pytestmark = pytest.mark.ray)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # Dashboard on, as in pipelines.ray_env: Ray Train's placement-group cleaner needs its State API.
    # A free port, so a benchmark running beside the tests does not collide with them.
    # address="local": a new instance even where `ray start` left one (test_cluster's nodes run beside
    # the second lane's instance under `make test`).
    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=free_port(),
             object_store_memory=1 << 30, log_to_driver=False)
    yield ray
    ray.shutdown()


def tiny_run(root: Path) -> list[str]:
    """Overrides for a seconds-long run on a small synthetic dataset, into ``root``."""
    return [
        f"run.root={root}",
        "data.synthetic.n_users=300", "data.synthetic.n_items=80", "data.synthetic.n_topics=4",
        "model.d_model=32", "model.n_layers=1", "model.d_ff=64",
        "trainer.optim.epochs=3", "trainer.optim.batch_size=64", "trainer.selection.patience=0",
    ]


@pytest.fixture
def tiny_overrides(tmp_path):
    """``tiny_run`` into tmp_path/runs."""
    return tiny_run(tmp_path / "runs")


@pytest.fixture
def forced_bf16():
    """A context for code that trains in bf16 by request: on a CPU without native bf16 the trainer
    must warn that it is emulated (the test then checks the warning), elsewhere it must not."""
    import contextlib
    import warnings

    from recsys import hardware

    @contextlib.contextmanager
    def expect():
        if hardware.cpu_supports_bf16() is False:
            with pytest.warns(RuntimeWarning, match="emulated"):
                yield
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("error", message=".*emulated", category=RuntimeWarning)
                yield

    return expect


@pytest.fixture(scope="module")
def one_thread():
    """One torch and one faiss thread for a module's small problems: on a busy 2-core machine
    OpenMP threads only contend (about 20x slower), and one thread keeps timings stable."""
    import faiss
    import torch

    saved = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(saved[0])
    faiss.omp_set_num_threads(saved[1])


TIGER_PIPELINE_ITEMS = 60


@pytest.fixture(scope="session")
def tiger_pipeline(tmp_path_factory) -> dict:
    """A tiny TIGER pipeline, in-process (data, a real sentence-transformers embed, hierarchical
    k-means IDs, 2 epochs), shared by the Serve tests and the cascade over TIGER: its root, and its
    data, embed and train run directories. Tests read these runs; they write only new runs. Built
    once per `make test` for all its processes (tests/shared_builds.py)."""
    from pipelines.cli import main
    from shared_builds import built_once

    def build(directory: Path) -> dict:
        root = directory / "runs"
        overrides = [f"run.root={root}", "data.synthetic.n_users=200", f"data.synthetic.n_items={TIGER_PIPELINE_ITEMS}",
                     "data.synthetic.n_topics=4", "ids.method=hkmeans", "ids.hkmeans.branching=6", "ids.use_ray=false",
                     "model.name=tiger", "model.d_model=32", "model.n_encoder_layers=1", "model.n_decoder_layers=1",
                     "model.n_heads=2", "model.head_dim=16", "model.d_ff=64", "model.beam_size=10",
                     "model.collision_scoring=content", "trainer.data.samples=prefixes", "trainer.optim.epochs=2",
                     "trainer.optim.batch_size=128", "trainer.selection.patience=0", "trainer.resources.use_ray=false"]
        assert main(["pipeline", *overrides]) == 0
        (pipeline,) = (root / "pipeline").iterdir()
        return {"root": root, "data": pipeline / "data", "embed": pipeline / "embed", "tiger": pipeline / "train"}

    return built_once("tiger-pipeline", tmp_path_factory.mktemp, build)


@pytest.fixture(scope="session")
def tiger_cascade(tiger_pipeline, tmp_path_factory) -> dict:
    """A cascade over the tiny TIGER: TWIN-V2 trained by `recsys rank` on 2 user folds (fold TIGERs
    on the same IDs), its item vectors the embed run behind the IDs. Shared by the rank test over
    TIGER and the Serve test that registers items through a cascade: its rank run and metrics. Built
    once per `make test` for all its processes (tests/shared_builds.py)."""
    from pipelines.rank_stage import run_rank
    from recsys.experiment import load_experiment
    from shared_builds import built_once

    def build(root: Path) -> dict:
        exp = load_experiment(None, [f"run.root={root}", "trainer.resources.use_ray=false", "model.name=twin_v2",
                                     "model.gamma=3", "model.d_model=16", "model.random_negatives=3",
                                     "trainer.optim.epochs=1", "trainer.optim.batch_size=32", "run.name=over-tiger"])
        run_dir, metrics = run_rank(exp, tiger_pipeline["tiger"], 20, folds=2, fold_examples=2)
        return {"rank": run_dir, "metrics": metrics}

    return built_once("tiger-cascade", tmp_path_factory.mktemp, build)
