"""End to end under one real local Ray instance: the `recsys` CLI, Ray Train with DDP, resume."""

import contextlib
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_run

from pipelines.cli import main
from recsys.runs import read_json

pytestmark = pytest.mark.ray


def only_dir(path: Path) -> Path:
    (found,) = [p for p in path.iterdir() if p.is_dir()]
    return found


@pytest.fixture(scope="module")
def ddp_pipeline(ray_session, tmp_path_factory) -> tuple[Path, str]:
    """A tiny pipeline whose training runs on two DDP workers: its runs directory and its console. The
    resume test continues a copy of its train run (a Ray Train fit costs ~12 s here, so they share one)."""
    root = tmp_path_factory.mktemp("ddp")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["pipeline", *tiny_run(root / "runs"), "trainer.resources.num_workers=2"]) == 0
    return root / "runs", out.getvalue()


def test_pipeline_with_two_ddp_workers(ddp_pipeline):
    runs, out = ddp_pipeline
    assert "| test |" in out and "recall@10" in out
    pipeline_dir = only_dir(runs / "pipeline")
    result = read_json(pipeline_dir / "metrics.json")
    for stage, path in [("pipeline", pipeline_dir), *result["stages"].items()]:  # every stage finished
        assert read_json(Path(path) / "COMPLETE")["stage"] == stage
    assert set(result["test"]) == {f"{m}@{k}" for m in ("recall", "ndcg") for k in (5, 10, 20)}
    train_dir = Path(result["stages"]["train"])
    train = read_json(train_dir / "metrics.json")
    assert train["workers"] == 2 and train["epochs_run"] == 3
    assert train["worker_restarts"] == 0 and train["resumed_from_epochs"] == []
    assert (train_dir / "checkpoints" / "best" / "model.safetensors").is_file()
    assert (train_dir / "training_curve.png").stat().st_size > 10_000
    epochs = [json.loads(x) for x in (train_dir / "epochs.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert all("valid_recall@10" in e for e in epochs)  # reported every epoch
    best = max(epochs, key=lambda e: e["valid_ndcg@10"])
    assert train["best_epoch"] == best["epoch"]
    # `recsys evaluate` on the train run reproduces the pipeline's test figures
    assert main(["evaluate", str(train_dir), "--split", "test"]) == 0
    # the pipeline's own evaluate stage lives inside its run directory; this one stands alone
    assert read_json(only_dir(runs / "evaluate") / "metrics.json")["test"] == pytest.approx(result["test"])


def test_train_resumes_from_the_last_ray_checkpoint(ddp_pipeline, tmp_path):
    """A copy of the DDP pipeline's 3-epoch train run, moved to another directory (Ray Train's
    checkpoint names are relative to the run), continues to 5 epochs on its two workers."""
    runs, _ = ddp_pipeline
    train_dir = tmp_path / "moved"
    shutil.copytree(Path(read_json(only_dir(runs / "pipeline") / "metrics.json")["stages"]["train"]), train_dir)
    first = [json.loads(x) for x in (train_dir / "epochs.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in first] == [1, 2, 3]
    resumed_at = time.time()
    assert main(["train", "--resume", str(train_dir), "trainer.optim.epochs=5"]) == 0
    epochs = [json.loads(x) for x in (train_dir / "epochs.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4, 5]
    # epochs 1-3 come from the first run's checkpoint, not from training again
    assert epochs[:3] == first
    assert all(e["finished_at"] > resumed_at for e in epochs[3:])
    # Ray Train restored the epoch-3 checkpoint once: a user resume, not a worker restart
    assert epochs[3]["resumed_from_epoch"] == 3
    metrics = read_json(train_dir / "metrics.json")
    assert metrics["resumed_from_epochs"] == [3] and metrics["worker_restarts"] == 0 and metrics["workers"] == 2
    assert read_json(train_dir / "config.json")["trainer"]["optim"]["epochs"] == 5


def test_console_script_reports_bad_config_clearly(tmp_path):
    recsys = Path(sys.executable).parent / "recsys"
    proc = subprocess.run([str(recsys), "train", "trainer.optim.epochs=-1", f"run.root={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "trainer.optim.epochs=-1 is out of range" in proc.stderr
    assert not (tmp_path / "train").exists()  # nothing half-made


def test_resume_refuses_a_config_file(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "configs/demo.yaml"]) == 2
    assert "give only overrides" in capsys.readouterr().err


def test_tiger_pipeline_runs_data_embed_ids_train_evaluate_and_refits_under_ray_train(ray_session, tmp_path,
                                                                                      capsys):
    """Every stage of a TIGER pipeline, its training on Ray Train, as a refit (training + validation
    transitions, stopped at epoch 2 of a 4-epoch schedule): one Ray Train fit (~12 s here) checks both
    that a generative model trains there and that a refit under Ray Train keeps its last epoch and
    reports no validation (the DDP pipeline above selects on validation)."""
    overrides = [f"run.root={tmp_path / 'runs'}", "data.synthetic.n_users=200", "data.synthetic.n_items=60",
                 "data.synthetic.n_topics=4", "ids.method=hkmeans", "ids.hkmeans.branching=6", "ids.use_ray=false",
                 "model.name=tiger", "model.d_model=32", "model.n_encoder_layers=1", "model.n_decoder_layers=1",
                 "model.n_heads=2", "model.head_dim=16", "model.d_ff=64", "trainer.data.samples=prefixes",
                 "trainer.optim.epochs=4", "trainer.optim.stop_epoch=2", "trainer.selection.refit=true",
                 "trainer.optim.batch_size=128"]
    assert main(["pipeline", *overrides]) == 0
    out = capsys.readouterr().out
    assert "| test (refit on training + validation) |" in out and "| valid (selected" not in out
    pipeline_dir = only_dir(tmp_path / "runs" / "pipeline")
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["pipeline"]  # one run directory holds it all
    result = read_json(pipeline_dir / "metrics.json")
    assert result["stages"] == {s: str(pipeline_dir / s) for s in ("data", "embed", "ids", "train", "evaluate")}
    ids_dir, train_dir = Path(result["stages"]["ids"]), Path(result["stages"]["train"])
    assert (ids_dir / "index").is_dir()
    assert read_json(train_dir / "config.json")["ids_dirs"] == {"semantic": str(ids_dir)}
    assert read_json(train_dir / "config.json")["ids"] == read_json(ids_dir / "config.json")["ids"]
    assert 0.0 <= result["test"]["recall@20"] <= 1.0
    train = read_json(train_dir / "metrics.json")
    assert train["workers"] == 1 and train["refit"] and train["valid"] == {}
    assert train["epochs_run"] == 2 and train["best_epoch"] == 2
    epochs = [json.loads(x) for x in (train_dir / "epochs.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2] and not any(k.startswith("valid_") for e in epochs for k in e)
    from recsys.training.checkpoint import load_train_state

    assert load_train_state(train_dir / "checkpoints" / "best")["loop"]["epoch"] == 2
    assert "refit on training + validation transitions: 2 epochs of a 4-epoch schedule" in \
        (train_dir / "summary.md").read_text()
    # the checkpoint carries the semantic-ID table: it rebuilds and decodes only real items
    from recsys.models import Batch
    from recsys.training.checkpoint import load_model

    model = load_model(train_dir / "checkpoints" / "best")
    import torch

    top = model.recommend(Batch(history=torch.tensor([[0, 0, 3, 7, 9]])), 10).items
    assert ((top >= 1) & (top <= 60)).all()
