"""cluster_history: TWIN-V2's recursive k-means into virtual items of at most gamma members."""

import numpy as np
import pytest

from recsys.history import VirtualItems, cluster_history
from recsys.history.clustering import kmeans_labels


def history(n: int, dim: int = 8, k: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = 4 * rng.standard_normal((k, dim))
    vectors = (centers[rng.integers(k, size=n)] + rng.standard_normal((n, dim))).astype(np.float32)
    return rng.integers(1, 1000, size=n).astype(np.int64), vectors


def check_invariants(out: VirtualItems, items: np.ndarray, vectors: np.ndarray, gamma: int) -> None:
    n_clusters = len(out.item)
    assert out.members.shape == (len(items),) and out.members.dtype == np.int64
    assert out.vector.shape == (n_clusters, vectors.shape[1]) and out.vector.dtype == np.float32
    assert out.position.dtype == np.float32 and out.size.dtype == np.int64 and out.item.dtype == np.int64
    assert (out.size <= gamma).all() and (out.size >= 1).all()
    assert out.size.sum() == len(items)
    np.testing.assert_array_equal(np.bincount(out.members, minlength=n_clusters), out.size)
    for c in range(n_clusters):
        idx = np.flatnonzero(out.members == c)
        mean = vectors[idx].astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(out.vector[c], mean, rtol=1e-5, atol=1e-5)
        assert out.position[c] == pytest.approx(idx.mean())
        dist = ((vectors[idx] - mean) ** 2).sum(axis=1)
        assert out.item[c] == items[idx[np.argmin(dist)]]  # nearest member; ties to the oldest
    first = [np.flatnonzero(out.members == c)[0] for c in range(n_clusters)]
    assert first == sorted(first)  # clusters ordered by their oldest member


@pytest.mark.parametrize("n,gamma,bands", [(0, 2, 1), (1, 2, 1), (7, 8, 1), (300, 20, 1), (300, 2, 1),
                                           (301, 16, 3), (50, 5, 80)])
def test_every_cluster_fits_gamma_and_means_are_exact(n, gamma, bands):
    items, vectors = history(n)
    out = cluster_history(items, vectors, gamma, bands=bands, seed=3)
    check_invariants(out, items, vectors, gamma)
    if n and n <= gamma:
        assert len(out.item) == 1  # a short history is one cluster, no k-means
    if n >= 300:
        assert out.compression >= gamma / 2  # clusters are mostly full, not singletons


def test_clusters_follow_the_embeddings():
    # Two well-separated groups of 10, gamma 10: k-means must recover exactly the two groups.
    rng = np.random.default_rng(0)
    side = rng.permutation(np.repeat([0, 1], 10))
    vectors = (np.where(side[:, None] == 1, 10.0, -10.0) + rng.standard_normal((20, 4))).astype(np.float32)
    out = cluster_history(np.arange(20), vectors, 10)
    assert len(out.item) == 2
    for c in range(len(out.item)):
        assert len(set(side[out.members == c])) == 1


def test_recency_bands_never_mix():
    items, vectors = history(90)
    out = cluster_history(items, vectors, 50, bands=3)
    band = np.repeat([0, 1, 2], 30)
    for c in range(len(out.item)):
        assert len(set(band[out.members == c])) == 1
    assert len(out.item) == 3  # each band of 30 fits gamma=50: one cluster per band


def test_identical_vectors_are_cut_by_recency():
    vectors = np.ones((25, 3), dtype=np.float32)
    out = cluster_history(np.arange(25), vectors, 4)
    check_invariants(out, np.arange(25), vectors, 4)
    for c in range(len(out.item)):  # contiguous runs of positions
        idx = np.flatnonzero(out.members == c)
        assert (np.diff(idx) == 1).all()


def test_deterministic_for_a_seed_and_seed_matters():
    items, vectors = history(400, k=40)
    a = cluster_history(items, vectors, 12, seed=7)
    b = cluster_history(items, vectors, 12, seed=7)
    for field in ("item", "size", "vector", "position", "members"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    c = cluster_history(items, vectors, 12, seed=8)
    assert not np.array_equal(a.members, c.members)


def test_kmeans_labels_reduces_inertia_against_random_assignment():
    _, x = history(200, k=4)
    x = x.astype(np.float64)
    labels = kmeans_labels(x, 4, np.random.default_rng(0))

    def inertia(lab):
        return sum(((x[lab == c] - x[lab == c].mean(0)) ** 2).sum() for c in np.unique(lab))
    assert inertia(labels) < 0.5 * inertia(np.random.default_rng(1).integers(4, size=200))


@pytest.mark.parametrize("gamma", [1, 0, -3, 2.5, True])
def test_gamma_below_two_names_the_key(gamma):
    items, vectors = history(10)
    with pytest.raises(ValueError, match="history.gamma"):
        cluster_history(items, vectors, gamma)


@pytest.mark.parametrize("kwargs,match", [({"bands": 0}, "history.bands"), ({"seed": -1}, "history.seed")])
def test_bad_settings_name_their_key(kwargs, match):
    items, vectors = history(10)
    with pytest.raises(ValueError, match=match):
        cluster_history(items, vectors, 4, **kwargs)


def test_bad_inputs_say_what_is_wrong():
    items, vectors = history(10)
    with pytest.raises(ValueError, match=r"\(L, D\)"):
        cluster_history(items, vectors[:5], 4)
    with pytest.raises(ValueError, match="1-D integer"):
        cluster_history(items.astype(float), vectors, 4)
    bad = vectors.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cluster_history(items, bad, 4)
