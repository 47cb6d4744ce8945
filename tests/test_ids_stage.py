"""The ids stage: in-process and on Ray (hierarchical k-means subtrees as tasks, RQ-VAE on
Ray Train over Ray Data), writing tokenizer, index and the quality report."""

import json

import numpy as np
import pytest
import torch

from pipelines.ids_stage import INDEX_DIR, TOKENIZER_DIR, run_ids
from recsys.experiment import load_experiment
from recsys.semantic_ids import SemanticIdIndex, load_tokenizer
from recsys.text import load_embeddings, write_embeddings


@pytest.fixture(scope="module")
def embed_dir(tmp_path_factory):
    """A fake embed run: 600 items in 12 well-separated gaussian clusters, 24-D."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(12, 24)).astype(np.float32) * 4
    x = centers[rng.integers(0, 12, 600)] + rng.normal(size=(600, 24)).astype(np.float32) * 0.3
    directory = tmp_path_factory.mktemp("embed")
    write_embeddings(directory / "embeddings.parquet", np.arange(1, 601), x, "test-encoder", [str(i) for i in range(600)])
    return directory


def small(tmp_path, *overrides):
    return load_experiment(None, [f"run.root={tmp_path}", "ids.hkmeans.branching=8", "ids.hkmeans.max_levels=3",
                                  "ids.rqvae.codebook_size=16", "ids.rqvae.epochs=4", "ids.rqvae.hidden_dims=[32]",
                                  "ids.rqvae.latent_dim=8", "ids.rqvae.batch_size=128", *overrides])


def check_run(run_dir, n_items=600):
    index = SemanticIdIndex.load(run_dir / INDEX_DIR)
    ids = index.ids_for(np.arange(1, n_items + 1))
    assert len({tuple(r) for r in ids.tolist()}) == n_items  # unique full IDs
    assert all(index.item_of(tuple(r)) == i + 1 for i, r in enumerate(ids.tolist()[:50]))  # ID -> item -> ID
    quality = json.loads((run_dir / "id_quality.json").read_text())
    assert quality["n_items"] == n_items and len(quality["levels"]) == 3
    assert (run_dir / "code_usage.png").stat().st_size > 5000
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["reconstruction_sq_error"] >= 0
    return index, metrics


@pytest.mark.parametrize("method", ["hkmeans", "rqvae"])
def test_ids_stage_in_process(embed_dir, tmp_path, method):
    run_dir = run_ids(small(tmp_path, f"ids.method={method}", "ids.use_ray=false", "run.name=semantic"), embed_dir)
    assert run_dir.name.endswith(f"-{method}-semantic")  # run.name tells a behaviour fit from a content one
    _, metrics = check_run(run_dir)
    tokenizer = load_tokenizer(run_dir / TOKENIZER_DIR)
    assert tokenizer.n_levels == 3 and metrics["method"] == method


@pytest.mark.ray
def test_hkmeans_on_ray_tasks_equals_in_process(ray_session, embed_dir, tmp_path):
    local, _ = check_run(run_ids(small(tmp_path / "a", "ids.method=hkmeans", "ids.use_ray=false"), embed_dir))
    on_ray, metrics = check_run(run_ids(small(tmp_path / "b", "ids.method=hkmeans", "ids.cpus_per_task=0.5",
                                              "ids.use_ray=true"), embed_dir))
    assert metrics["use_ray"] and metrics["placement"] == "ids.use_ray=true"
    items = np.arange(1, 601)
    assert torch.equal(local.ids_for(items), on_ray.ids_for(items))


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_rqvae_on_one_ray_train_worker_equals_in_process(ray_session, one_thread, embed_dir, tmp_path):
    """Same seed, same IDs on either path: the Ray Train worker starts from the driver's
    initialised network and shuffles and re-seeds codes from the same generators. One thread on
    both sides (a Ray worker with 1 CPU runs one), so no sum is split differently."""
    overrides = ["ids.method=rqvae", "ids.rqvae.epochs=5", "ids.rqvae.dead_code_threshold=30"]
    local, local_metrics = check_run(run_ids(small(tmp_path / "a", *overrides, "ids.use_ray=false"), embed_dir))
    on_ray, _ = check_run(run_ids(small(tmp_path / "b", *overrides, "ids.use_ray=true", "ids.num_workers=1",
                                      "ids.checkpoint_every=2"), embed_dir))
    items = np.arange(1, 601)
    assert torch.equal(local.ids_for(items), on_ray.ids_for(items))
    assert not local_metrics["use_ray"]


@pytest.mark.ray
def test_auto_fits_in_process_on_one_node_and_says_why_once(ray_session, embed_dir, tmp_path, capsys):
    run_dir = run_ids(small(tmp_path, "ids.method=hkmeans"), embed_dir)  # ids.use_ray=auto, the default
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ids: ")]
    assert lines == ["ids: in-process (auto: one node, hierarchical k-means of 600 vectors; Ray would run the same "
                     "work on the same cores plus its start-up and per-task overhead; ids.use_ray=true forces Ray)"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["use_ray"] is False and metrics["placement"].startswith("auto: one node")
    assert not (run_dir / "ray-train").exists()


@pytest.mark.ray
@pytest.mark.timeout(240)  # regression: with lazy Ray Data this hung when the 2 workers held both CPUs
def test_rqvae_trains_on_ray_train_with_two_workers(ray_session, embed_dir, tmp_path):
    run_dir = run_ids(small(tmp_path, "ids.method=rqvae", "ids.num_workers=2", "ids.rqvae.epochs=6",
                            "ids.checkpoint_every=3", "ids.use_ray=true"), embed_dir)
    _, metrics = check_run(run_dir)
    # 12 clusters, 16 codes at level 0: the content codes must separate most items
    quality = json.loads((run_dir / "id_quality.json").read_text())
    assert quality["levels"][0]["used"] >= 10
    assert (run_dir / "ray-train").is_dir()


@pytest.mark.ray
def test_hkmeans_over_blocks_gives_unique_ids_and_a_top_level_as_good(ray_session, embed_dir, tmp_path):
    driver = run_ids(small(tmp_path / "a", "ids.method=hkmeans", "ids.use_ray=false"), embed_dir)
    blocks = run_ids(small(tmp_path / "b", "ids.method=hkmeans", "ids.hkmeans_top=blocks", "ids.top_sample=200",
                           "ids.top_refine_iters=3"), embed_dir)
    check_run(blocks)  # unique IDs, ID -> item -> ID, the report
    _, x = load_embeddings(embed_dir)

    def top_inertia(run_dir):  # k-means objective of the top split: squared distance to the group mean
        top = load_tokenizer(run_dir / TOKENIZER_DIR).fit_codes[:, 0].numpy()
        return sum(float(((x[top == c] - x[top == c].mean(0)) ** 2).sum()) for c in np.unique(top))

    # a sample + Lloyd over blocks reaches a top level about as good as faiss on all rows at once
    assert top_inertia(blocks) < 1.15 * top_inertia(driver)
