"""Benchmark scripts whose logic goes beyond timing, run on tiny synthetic inputs."""

import json

import numpy as np
import pytest

import benchmarks.record
from recsys.data import SyntheticConfig, generate_synthetic
from recsys.text.store import EMBEDDINGS_FILE, write_embeddings


@pytest.fixture
def data_and_embed(tmp_path):
    """A synthetic data run and a fake embed run whose vectors follow each item's top category."""
    data = generate_synthetic(SyntheticConfig(n_users=300, n_items=80, n_topics=4, seed=0))
    data.save(tmp_path / "data")
    top = data.items["categories"].map(lambda c: c[0]).astype("category").cat.codes.to_numpy()
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(top.max() + 1, 16))
    vectors = centers[top] + 0.3 * rng.normal(size=(len(top), 16))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    (tmp_path / "embed").mkdir()
    write_embeddings(tmp_path / "embed" / EMBEDDINGS_FILE, data.items["item_id"].to_numpy(), vectors, "fake",
                     [f"h{i}" for i in range(len(vectors))])
    return tmp_path / "data", tmp_path / "embed"


def test_cold_start_slice_holds_items_out_and_scores_them_after_registration(data_and_embed, tmp_path, monkeypatch):
    from benchmarks.tiger_cold_start import main

    monkeypatch.setattr(benchmarks.record, "RESULTS", tmp_path / "results")
    data_dir, embed_dir = data_and_embed
    main(["--data", str(data_dir), "--embed", str(embed_dir), "--fraction", "0.1",
          f"run.root={tmp_path / 'runs'}", "data.max_history=10", "ids.method=hkmeans", "ids.hkmeans.branching=4",
          "model.name=tiger", "model.d_model=32", "model.n_encoder_layers=1", "model.n_decoder_layers=1",
          "model.n_heads=2", "model.head_dim=16", "model.d_ff=64", "trainer.samples=prefixes", "trainer.epochs=3",
          "trainer.batch_size=128", "trainer.lr=3e-3", "trainer.patience=0"])
    record = json.loads((tmp_path / "results" / "tiger-cold-start-synthetic.json").read_text())
    assert record["held_out_items"] == 8 and record["cold_test_users"] > 0
    assert record["cold_test_users"] + record["warm_test_users"] == 300
    held = json.loads((tmp_path / "runs" / "train").glob("*-cold-start").__next__().joinpath("config.json")
                      .read_text())["held_out"]
    assert len(held) == 8
    for name in ("tiger_learned", "tiger_content", "content_knn"):
        for slice_ in ("cold", "warm"):
            assert 0.0 <= record["metrics"][name][slice_]["recall@20"] <= 1.0
    # registered from content alone, held-out targets are found (the untrained model could not return them)
    assert record["metrics"]["tiger_content"]["cold"]["recall@20"] > 0


def test_serve_load_summary_counts_errors_by_kind_and_times_only_answers():
    from benchmarks.serve_load import markdown, summarise

    ok = [{"start": i / 10, "ms": float(i), "status": 200, "error": None, "retries": int(i == 3)}
          for i in range(1, 101)]
    bad = [{"start": 1.0, "ms": 5000.0, "status": 503, "error": None, "retries": 0},
           {"start": 1.0, "ms": 60000.0, "status": None, "error": "ServerDisconnectedError", "retries": 0},
           {"start": 1.0, "ms": 3.0, "status": 200, "error": "9 items instead of 10", "retries": 0}]
    s = summarise(ok + bad, duration_s=10.0)
    assert (s["requests"], s["ok"], s["errors"], s["retried"]) == (103, 100, 3, 1)
    assert s["error_kinds"] == {"http 503": 1, "ServerDisconnectedError": 1, "9 items instead of 10": 1}
    assert s["throughput_rps"] == 10.0
    assert s["p50_ms"] == 50.5 and s["p99_ms"] == 99.0 and s["max_ms"] == 100.0  # failures are not timed
    assert summarise([], 1.0)["p50_ms"] is None
    table = markdown({"tiger": {"c8": s}, "ann": {"c8": s}, "fault": []})
    assert "| tiger | 8 | 50.5 |" in table and "| ann | 8 |" in table
