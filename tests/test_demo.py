"""`recsys demo` and the quiet console, without running the demo: each source of a warning or
error line a healthy run used to print is checked where it is fixed (the whole demo's console is
in docs/demo-output.txt)."""

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import ray_env
from pipelines.demo import (
    StageClock, comparison_note, demo_table, format_exchange, load_demo, split_overrides,
)
from pipelines.embed_job import actor_restarts

ROOT = Path(__file__).resolve().parent.parent
FIGURES = {"recall@5": 0.2, "recall@10": 0.3, "recall@20": 0.4, "ndcg@5": 0.1, "ndcg@10": 0.15, "ndcg@20": 0.2}


def test_importing_faiss_prints_nothing_even_with_info_logging_on():
    # Ray workers pass INFO to the console; faiss's loader logs each missing CPU build at INFO.
    code = "import logging; logging.basicConfig(level=logging.INFO); from recsys.faiss_lib import faiss; faiss.Kmeans"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


def test_no_module_imports_faiss_around_the_quiet_import():
    sources = [p for d in ("recsys", "pipelines", "serve", "tune") for p in (ROOT / d).rglob("*.py")
               if p.name != "faiss_lib.py"]
    offenders = [str(p.relative_to(ROOT)) for p in sources
                 if any(line.strip() == "import faiss" for line in p.read_text().splitlines())]
    assert offenders == []


@pytest.mark.parametrize("cluster", [False, True])
def test_local_ray_chooses_token_auth_and_no_preemption_watcher_a_cluster_keeps_it(monkeypatch, cluster):
    for key in ray_env.LOCAL_ENV:
        monkeypatch.setenv(key, "x")  # so that monkeypatch restores the key's absence afterwards
        monkeypatch.delenv(key)
    if cluster:
        monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # the env is set before any start
    ray_env.init_ray()
    if cluster:
        assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ
        assert actor_restarts() == {}  # Ray Data restarts lost encoder actors on a cluster
    else:
        assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
        assert actor_restarts() == {"max_restarts": 0}


def test_only_the_restart_arguments_deprecation_is_kept_quiet_and_only_around_that_call(monkeypatch):
    import warnings

    from ray.util.annotations import RayDeprecationWarning

    from pipelines.embed_job import actor_restart_args

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with actor_restart_args() as restarts:
            warnings.warn("`ray_remote_args` is deprecated and will be removed", RayDeprecationWarning)
            warnings.warn("`concurrency` is deprecated", RayDeprecationWarning)
        warnings.warn("`ray_remote_args` is deprecated and will be removed", RayDeprecationWarning)
    assert restarts == {"max_restarts": 0}
    assert [str(w.message)[:16] for w in seen] == ["`concurrency` is", "`ray_remote_args"]


def test_a_users_setting_wins_over_the_quiet_defaults(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    ray_env.init_ray()
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"


def test_a_local_start_caps_the_object_store_and_binds_the_dashboard_to_localhost(monkeypatch):
    """The branch of ``init_ray`` that starts Ray on this machine (`recsys serve`, `recsys pipeline` on
    a laptop), checked by its arguments: the Ray tests start their instance with the same ones
    (conftest.ray_session), and `recsys serve`'s own test joins that instance through RAY_ADDRESS."""
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    calls = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    ray_env.init_ray(num_cpus=2)
    assert calls == [{"num_cpus": 2, "object_store_memory": 1 << 30, "include_dashboard": True,
                      "dashboard_host": "127.0.0.1", "log_to_driver": True, "logging_level": "warning"}]
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a cluster: no local settings, its own resources
    ray_env.init_ray(num_cpus=2)
    assert calls[1] == {"log_to_driver": True}


def test_only_rays_auth_default_notice_is_dropped(caplog):
    ray_env.quiet_auth_notice()
    ray_env.quiet_auth_notice()  # idempotent
    log = logging.getLogger(ray_env.AUTH_LOGGER)
    assert sum(isinstance(f, ray_env.DropAuthNotice) for f in log.filters) == 1
    notice = ray_env.AUTH_NOTICE + " For more information, see https://docs.ray.io/"
    other = "Token authentication is disabled for this Ray cluster. Anyone with network access ..."
    assert not log.filter(logging.LogRecord(log.name, logging.WARNING, "", 0, notice, None, None))
    assert log.filter(logging.LogRecord(log.name, logging.WARNING, "", 0, other, None, None))
    assert log.filter(logging.LogRecord(log.name, logging.ERROR, "", 0, "token file unreadable", None, None))


@pytest.mark.ray
def test_rqvae_feed_keeps_ray_tqdm_off_on_its_own_dataset_only(ray_session):
    import ray.data

    from pipelines.ids_job import quiet_epochs

    ds = ray.data.range(4)
    quiet_epochs(ds)
    assert ds.context.use_ray_tqdm is False
    assert ray.data.DataContext.get_current().use_ray_tqdm is True  # the process-wide default is untouched


def test_stage_clock_prints_one_line_per_stage_after_it_ends():
    out = io.StringIO()
    clock = StageClock(out)
    with clock.stage("data") as note:
        assert out.getvalue() == ""
        note.append("2,000 users")
    with clock.stage("embed"):
        pass
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[data] ") and lines[0].endswith(" s  2,000 users")
    assert set(clock.seconds) == {"data", "embed"}


def test_table_puts_the_baseline_beside_the_model_and_the_note_says_when_it_trails():
    behind = {"tiger": {"valid": FIGURES, "test": FIGURES, "best_epoch": 4, "epochs_run": 4, "validated_users": 500},
              "sasrec": {"valid": FIGURES, "test": {**FIGURES, "recall@10": 0.5}, "best_epoch": 9, "epochs_run": 20}}
    table = demo_table(behind).splitlines()
    assert table[0].startswith("| model, split | recall@5 |")
    assert [row.split("|")[1].strip() for row in table[2:]] == [
        "tiger, valid (selected, 500 users)", "tiger, test", "sasrec, valid (selected)", "sasrec, test"]
    note = comparison_note("tiger", "sasrec", behind)
    assert note.startswith("note: tiger trails sasrec on test recall@10 (0.3000 against 0.5000): it was still "
                           "improving on validation at its last epoch (4)") and "\n" not in note
    peaked = {**behind, "tiger": {**behind["tiger"], "best_epoch": 2}}
    assert "it peaked on validation at epoch 2 of 4" in comparison_note("tiger", "sasrec", peaked)
    level = {**behind, "sasrec": {**behind["sasrec"], "test": FIGURES}}
    assert comparison_note("tiger", "sasrec", level) == ""


def test_served_answer_is_printed_with_titles_and_the_held_out_item_marked():
    import pandas as pd

    items = pd.DataFrame({"title": ["a serum", "a cleanser", "a lipstick"]}, index=["I1", "I2", "I3"])
    answer = {"catalogue_size": 3, "items": [{"id": "I3", "score": -0.5, "semantic_id": [1, 2, 0]},
                                              {"id": "I2", "score": -1.0, "semantic_id": [1, 3, 0]}]}
    text = format_exchange("http://127.0.0.1:1", {"history": ["I1"], "k": 2}, answer, "I2", items)
    lines = text.splitlines()
    assert lines[0].startswith("POST http://127.0.0.1:1/recommend")
    assert "I1 a serum" in lines[1]
    assert lines[3].startswith("   1. I3") and "a lipstick" in lines[3] and "held-out" not in lines[3]
    assert lines[4].endswith("a cleanser  <- this user's held-out next item")


def test_demo_configs_train_both_models_on_one_data_run_and_route_baseline_overrides():
    assert split_overrides(["a.b=1", "baseline.trainer.optim.epochs=2"]) == (["a.b=1"], ["trainer.optim.epochs=2"])
    exp, baseline = load_demo(ROOT / "configs" / "demo.yaml", ROOT / "configs" / "demo-sasrec.yaml",
                              ["data.synthetic.seed=2", "baseline.trainer.optim.epochs=3"])
    assert (exp.model_name, baseline.model_name) == ("tiger", "sasrec")
    assert baseline.data == exp.data and baseline.data.synthetic.seed == 2
    assert baseline.trainer.optim.epochs == 3 and exp.trainer.optim.epochs != 3


def test_a_baseline_config_with_its_own_data_is_refused(tmp_path):
    own = tmp_path / "base.yaml"
    own.write_text("model:\n  name: sasrec\ndata:\n  format: synthetic\n")
    with pytest.raises(ValueError, match=r"base.yaml: the baseline takes `data:` from the demo's config"):
        load_demo(ROOT / "configs" / "demo.yaml", own)
    with pytest.raises(ValueError, match="baseline.data"):
        load_demo(ROOT / "configs" / "demo.yaml", ROOT / "configs" / "demo-sasrec.yaml",
                  ["baseline.data.synthetic.seed=1"])


def test_make_demo_args_reach_the_demo_after_the_baseline_option():
    from pipelines.cli import build_parser, parse_args

    ns = parse_args(build_parser(), ["demo", "configs/demo.yaml", "--baseline", "configs/demo-sasrec.yaml",
                                     "data.synthetic.seed=1", "baseline.trainer.optim.epochs=3"])
    assert ns.config == ["configs/demo.yaml", "data.synthetic.seed=1", "baseline.trainer.optim.epochs=3"]
    assert ns.baseline == Path("configs/demo-sasrec.yaml")
