"""End to end under one real local Ray instance: the `recsys` CLI, a TIGER pipeline trained on Ray Train. (Ray
Train with DDP across two nodes, and its resume, are test_cluster.py's job test.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.cli import main
from recsys.runs import read_json

pytestmark = pytest.mark.ray


def only_dir(path: Path) -> Path:
    (found,) = [p for p in path.iterdir() if p.is_dir()]
    return found


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
