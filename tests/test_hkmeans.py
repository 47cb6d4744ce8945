"""Hierarchical k-means: identical to a single-process faiss recursion whatever the map_fn."""

import math
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
import pytest
import torch

from recsys.semantic_ids import (
    HierarchicalKMeans, HKMeansConfig, accumulate_centroids, assign_nearest, fit_subtree, load_tokenizer,
    make_subtree_tasks, mean_centroids, single_process_recursion, split_node,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def mixture(n: int, dim: int, k: int, seed: int = 0, weights=None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = 3 * rng.standard_normal((k, dim)).astype(np.float32)
    return (centers[rng.choice(k, n, p=weights)] + rng.standard_normal((n, dim))).astype(np.float32)


def reversed_map(fn, tasks):
    return [fn(task) for task in reversed(list(tasks))]  # results come back reversed too


def shuffled_map(fn, tasks):
    tasks = list(tasks)
    return [fn(tasks[i]) for i in np.random.default_rng(7).permutation(len(tasks))]


def assert_same_tree(tok: HierarchicalKMeans, ref_codes: np.ndarray, ref_nodes: dict) -> None:
    np.testing.assert_array_equal(tok.fit_codes.numpy(), ref_codes)
    nodes = tok.nodes()
    assert nodes.keys() == ref_nodes.keys()
    for path, (codes, centroids) in ref_nodes.items():
        np.testing.assert_array_equal(nodes[path][0], codes)
        np.testing.assert_array_equal(nodes[path][1], centroids)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return mixture(700, 8, 6)


@pytest.mark.parametrize("max_levels,balanced", [(3, False), (3, True), (0, False)])
def test_fit_equals_reference_for_any_map_order(data, max_levels, balanced):
    cfg = HKMeansConfig(branching=4, max_levels=max_levels, balanced=balanced, niter=10)
    ref_codes, ref_nodes = single_process_recursion(data, cfg)
    for map_fn in (map, reversed_map, shuffled_map):
        assert_same_tree(HierarchicalKMeans(config=cfg).fit(data, map_fn=map_fn), ref_codes, ref_nodes)
    if max_levels == 0:  # every leaf holds one item: content IDs alone are unique
        assert len(np.unique(ref_codes, axis=0)) == len(data)


def test_fit_in_a_process_pool_equals_reference(data, monkeypatch):
    cfg = HKMeansConfig(branching=4, max_levels=3, niter=10, seed=3)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned workers read it at start
    with ProcessPoolExecutor(max_workers=2, mp_context=get_context("spawn")) as pool:
        tok = HierarchicalKMeans(config=cfg).fit(data, map_fn=pool.map)
    assert_same_tree(tok, *single_process_recursion(data, cfg))


def test_seed_changes_the_tree_and_encode_reproduces_fit_codes(data):
    a = HierarchicalKMeans(branching=4, max_levels=3, niter=10, seed=0).fit(data)
    b = HierarchicalKMeans(branching=4, max_levels=3, niter=10, seed=1).fit(data)
    assert not torch.equal(a.fit_codes, b.fit_codes)
    assert torch.equal(a.encode(data), a.fit_codes)  # greedy descent follows the unbalanced tree
    new = mixture(50, 8, 6, seed=11)  # cold start: unseen items get valid paths
    assert a.decode(a.encode(new)).shape == (50, 8)


def test_balanced_gives_equal_cluster_sizes():
    x = mixture(1000, 8, 4, seed=2, weights=[0.85, 0.05, 0.05, 0.05])
    root_sizes = {}
    for balanced in (False, True):
        tok = HierarchicalKMeans(branching=8, max_levels=2, balanced=balanced, niter=10).fit(x)
        root_sizes[balanced] = np.bincount(tok.fit_codes[:, 0].numpy(), minlength=8)
        if balanced:  # every node's children hold at most ceil(n / K) items
            codes = tok.fit_codes.numpy()
            for prefix in np.unique(codes[:, :1], axis=0):
                members = codes[(codes[:, :1] == prefix).all(1)]
                assert np.bincount(members[:, 1]).max() <= math.ceil(len(members) / 8)
    assert (root_sizes[True] == 125).all()  # 1000 / 8 with capacity 125 leaves no slack
    assert root_sizes[False].max() - root_sizes[False].min() > 50  # plain k-means follows the density


def test_more_codes_than_items_gives_direct_codes_and_exact_decode():
    x = mixture(5, 4, 2)
    tok = HierarchicalKMeans(branching=8, max_levels=2).fit(x)
    np.testing.assert_array_equal(tok.fit_codes.numpy(), [[0, 0], [1, 0], [2, 0], [3, 0], [4, 0]])
    assert torch.equal(tok.decode(tok.fit_codes), torch.from_numpy(x))
    assert torch.equal(tok.encode(x), tok.fit_codes)
    with pytest.raises(ValueError, match="not paths of the tree"):
        tok.decode(torch.tensor([[5, 0], [1, 1]]))
    # direct codes follow item index, whatever order the node lists its items in
    split = split_node(x[::-1].copy(), np.arange(5)[::-1].copy(), (), tok.config)
    np.testing.assert_array_equal(split.labels, [4, 3, 2, 1, 0])
    np.testing.assert_array_equal(split.centroids, x)


def test_identical_vectors_still_split_when_recursing_to_single_items():
    x = np.ones((20, 3), dtype=np.float32)
    tok = HierarchicalKMeans(branching=4, max_levels=0, niter=5).fit(x)
    assert len(np.unique(tok.fit_codes.numpy(), axis=0)) == 20


def test_rejects_too_few_items_and_nan_rows(data):
    with pytest.raises(ValueError, match="at least 2"):
        HierarchicalKMeans(branching=4).fit(data[:1])
    bad = data.copy()
    bad[[2, 5]] = np.nan
    with pytest.raises(ValueError, match=r"2 row\(s\) contain NaN or inf, rows \[2, 5\]"):
        HierarchicalKMeans(branching=4).fit(bad)
    with pytest.raises(ValueError, match="min_cluster_to_split"):
        HKMeansConfig(branching=4, min_cluster_to_split=5)


def test_save_load_round_trip(data, tmp_path):
    tok = HierarchicalKMeans(branching=4, max_levels=0, niter=5).fit(data)
    loaded = load_tokenizer(tok.save(tmp_path / "hk"))
    assert torch.equal(loaded.fit_codes, tok.fit_codes) and loaded.n_levels == tok.n_levels
    assert torch.equal(loaded.decode(tok.fit_codes), torch.from_numpy(data))  # one item per leaf
    assert torch.equal(loaded.encode(data[:50]), tok.encode(data[:50]))


def test_block_helpers_match_whole_data_and_fit_from_root(data):
    cfg = HKMeansConfig(branching=4, max_levels=2, niter=10)
    root = split_node(data, np.arange(len(data)), (), cfg)
    blocks = np.array_split(np.arange(len(data)), 3)
    labels = np.concatenate([assign_nearest(data[b], root.centroids)[0] for b in blocks])
    np.testing.assert_array_equal(root.codes[labels], root.labels)  # all 4 clusters used: codes = rows
    sums, counts = map(sum, zip(*(accumulate_centroids(data[b], labels[b], 4) for b in blocks)))
    np.testing.assert_allclose(sums / counts[:, None], mean_centroids(data, labels, 4), rtol=1e-5)
    tasks = make_subtree_tasks(data, root, cfg)
    assert [t.path for t in tasks] == [(0,), (1,), (2,), (3,)] and sum(len(t.item_index) for t in tasks) == len(data)
    assert fit_subtree(tasks[0]).path == (0,)
    tok = HierarchicalKMeans(config=cfg).fit_from_root(data, root)
    assert torch.equal(tok.fit_codes, HierarchicalKMeans(config=cfg).fit(data).fit_codes)
    with pytest.raises(ValueError, match="map_fn returned"):
        HierarchicalKMeans(config=cfg).fit_from_root(data, root, map_fn=lambda fn, ts: [fn(t) for t in list(ts)[1:]])
