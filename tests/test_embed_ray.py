"""The embed stage end to end under the shared local Ray instance, with the real default model."""

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.embed_job import local_encoder, previous_vectors, run_embed
from recsys.data import InteractionData, SyntheticConfig, generate_synthetic
from recsys.runs import read_json
from recsys.text import (EMBEDDINGS_FILE, EncoderConfig, ItemTextConfig, build_texts, load_embeddings, text_hash,
                         write_embeddings)
from recsys.text.encoder import CACHE_ENV

pytestmark = pytest.mark.ray
N_ITEMS = 40


@pytest.fixture(scope="module")
def encoder_cfg() -> EncoderConfig:
    # The shared model cache, so the default model is fetched at most once per machine.
    return EncoderConfig(cache_dir=os.environ.get(CACHE_ENV) or str(Path.home() / ".cache/recsys/models"),
                         batch_size=16)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    data = generate_synthetic(SyntheticConfig(n_users=30, n_items=N_ITEMS, n_topics=4))
    data.save(tmp_path / "data")
    return tmp_path / "data"


@pytest.mark.timeout(240)
def test_embed_on_two_one_cpu_actors_matches_in_process_and_later_runs_reuse_it(ray_session, data_dir, encoder_cfg,
                                                                                 tmp_path, monkeypatch, capsys):
    """The embed stage on Ray (forced), then in-process, then again with every vector reused, then with
    one title changed. One Ray embed for all of it: its actors load the sentence encoder, ~10 s each here.

    The pool: regression for the RAY-NOTES hang. A fixed pool of two 1-CPU actors on a 2-CPU Ray holds
    both CPUs, so an upstream task (e.g. a read_parquet read) is never scheduled and the job never ends.
    run_embed starts the pool at one actor (min_size=1) and grows to num_actors, leaving a CPU for such
    tasks. Today's input (from_pandas blocks) has no upstream task, so the pool's shape is asserted: it
    must stay elastic if the stage ever reads its input with a Ray Data reader.

    The same texts in-process (auto on this one node) and on that pool: the same fp32 vectors up to
    padding round-off, and the same hierarchical k-means IDs built from them."""
    import ray.data

    from recsys.semantic_ids import HierarchicalKMeans

    pools = []
    real = ray.data.ActorPoolStrategy

    def spy(**kwargs):
        pools.append(kwargs)
        return real(**kwargs)
    monkeypatch.setattr(ray.data, "ActorPoolStrategy", spy)
    assert ray_session.cluster_resources()["CPU"] == 2
    runs, text_cfg, cfg = tmp_path / "runs", ItemTextConfig(), replace(encoder_cfg, precision="fp32")
    first = run_embed(data_dir, text_cfg, replace(cfg, num_actors=2, cpus_per_actor=1.0, use_ray=True), runs)
    assert capsys.readouterr().out.startswith("embed: on Ray (embed.encoder.use_ray=true)")
    assert pools == [{"min_size": 1, "max_size": 2}]
    assert first.parent == runs.resolve() / "embed"
    table = pq.read_table(first / EMBEDDINGS_FILE)
    assert table.schema.field("item_id").type == pa.int64()
    assert table.schema.field("vector").type == pa.list_(pa.float32())
    assert table.column("encoder").to_pylist() == [local_encoder(cfg).identity()] * N_ITEMS
    texts = build_texts(InteractionData.load(data_dir).items, text_cfg)
    assert table.column("text_hash").to_pylist() == [text_hash(t) for t in texts]
    ids, vectors = load_embeddings(first)
    assert ids.tolist() == list(range(1, N_ITEMS + 1)) and vectors.shape == (N_ITEMS, 384)
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    metrics = read_json(first / "metrics.json")
    assert metrics["encoded"] == N_ITEMS and metrics["reused"] == 0 and metrics["dim"] == 384
    assert metrics["route"] in {"pypi-cache", "pypi-download", "hf-cache", "hf-hub"}
    assert (metrics["use_ray"], metrics["precision"], metrics["num_actors"]) == (True, "fp32", 2)
    assert "embed:" in (first / "summary.md").read_text()

    # In-process (auto on this one node), into another root so that nothing is reused.
    local = run_embed(data_dir, text_cfg, cfg, tmp_path / "local")
    assert "embed: in-process (auto: one node, 40 texts;" in capsys.readouterr().out
    assert read_json(local / "metrics.json")["use_ray"] is False
    x = load_embeddings(local)[1]
    np.testing.assert_allclose(x, vectors, atol=2e-6)
    codes = [HierarchicalKMeans(branching=4, max_levels=3).fit(v).fit_codes for v in (x, vectors)]
    assert np.array_equal(codes[0].numpy(), codes[1].numpy())

    # The same items again: everything reused, nothing encoded.
    second = run_embed(data_dir, text_cfg, cfg, runs)
    metrics = read_json(second / "metrics.json")
    assert (metrics["encoded"], metrics["reused"], metrics["route"]) == (0, N_ITEMS, "none (all reused)")
    np.testing.assert_array_equal(load_embeddings(second)[1], vectors)

    # One changed title: exactly that item is encoded again, and only its vector changes.
    data = InteractionData.load(data_dir)
    data.items.loc[data.items["item_id"] == 7, "title"] = "Heavy duty motor oil for diesel engines"
    data.save(data_dir)
    third = run_embed(data_dir, text_cfg, cfg, runs)
    metrics = read_json(third / "metrics.json")
    assert (metrics["encoded"], metrics["reused"]) == (1, N_ITEMS - 1)
    changed = load_embeddings(third)[1]
    same = np.ones(N_ITEMS, bool)
    same[6] = False
    np.testing.assert_allclose(changed[same], vectors[same], atol=1e-6)
    assert changed[6] @ vectors[6] < 0.9

    # precision auto: the run records what it resolved to on this CPU, never "auto"
    resolved = run_embed(data_dir, text_cfg, encoder_cfg, tmp_path / "auto")
    assert read_json(resolved / "config.json")["encoder"]["precision"] == local_encoder(encoder_cfg).precision


def test_reuse_matches_encoder_identity_and_skips_bad_rows(tmp_path):
    """No Ray: earlier vectors count only under the same encoder identity, and NaN rows are not reused."""
    a, b = EncoderConfig(precision="fp32"), EncoderConfig(normalize=False, precision="fp32")
    assert a.identity() != b.identity() != EncoderConfig(precision="bf16").identity()
    (tmp_path / "embed" / "r1").mkdir(parents=True)
    vectors = np.array([[1, 0], [np.nan, 0]], dtype=np.float32)
    write_embeddings(tmp_path / "embed" / "r1" / EMBEDDINGS_FILE, np.array([1, 2]), vectors, a.identity(), ["h1", "h2"])
    assert list(previous_vectors(tmp_path, a.identity())) == ["h1"]
    assert previous_vectors(tmp_path, b.identity()) == {}
    # the embed stage of a pipeline run is found too, and the newer run wins
    (tmp_path / "pipeline" / "r2" / "embed").mkdir(parents=True)
    write_embeddings(tmp_path / "pipeline" / "r2" / "embed" / EMBEDDINGS_FILE, np.array([1]),
                     np.array([[0, 1]], dtype=np.float32), a.identity(), ["h1"])
    np.testing.assert_array_equal(previous_vectors(tmp_path, a.identity())["h1"], [0, 1])
