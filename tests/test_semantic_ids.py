"""Semantic-ID tokenizers behind one interface (RQ-VAE, hierarchical k-means) and the ID report."""

import json

import numpy as np
import pytest
import torch

from recsys.semantic_ids import (
    RQVAE, HierarchicalKMeans, RQVAEConfig, RQVAETokenizer, SemanticIdTokenizer, id_quality, init_codebooks,
    load_tokenizer, reseed_dead_codes, reseed_dead_codes_synced, rqvae_epoch, shuffled_batches, write_report,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def mixture(n: int, dim: int, k: int, noise: float = 0.1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, dim)).astype(np.float32)
    return (centers[rng.integers(0, k, n)] + noise * rng.standard_normal((n, dim))).astype(np.float32)


SMALL_RQVAE = dict(hidden_dims=[32], latent_dim=8, n_levels=3, codebook_size=16, epochs=3, batch_size=128, lr=3e-3)
TOKENIZERS = {
    "rqvae": lambda: RQVAETokenizer(**SMALL_RQVAE),
    "hkmeans": lambda: HierarchicalKMeans(branching=8, max_levels=3),
}


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return mixture(600, 16, 12)


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def fitted(request, data) -> SemanticIdTokenizer:
    return TOKENIZERS[request.param]().fit(data)


# --- the shared interface --------------------------------------------------------------------
def test_shapes_and_code_ranges(fitted, data):
    codes = fitted.encode(data)
    assert codes.shape == (len(data), fitted.n_levels) and codes.dtype == torch.int64
    assert len(fitted.codebook_sizes) == fitted.n_levels == 3
    assert ((codes >= 0) & (codes < torch.tensor(fitted.codebook_sizes))).all()
    decoded = fitted.decode(codes)
    assert decoded.shape == data.shape and decoded.dtype == torch.float32
    assert fitted.encode(data[:0]).shape == (0, 3)


def test_decode_is_a_function_of_the_codes(fitted, data):
    codes = fitted.encode(data[:20])
    twice = fitted.decode(codes[[3, 3, 7]])
    assert torch.equal(twice[0], twice[1])
    # independent of the batch around it: a batch-dependent decode would differ by far more than
    # rounding; the matrix kernels may block a 3-row and a 20-row product differently (on AMD EPYC
    # the RQ-VAE decoder's rows differ by 6e-8), so equality up to float32 rounding is all we ask
    torch.testing.assert_close(twice, fitted.decode(codes)[[3, 3, 7]], rtol=1e-5, atol=1e-6)


def test_save_load_gives_identical_encode_decode(fitted, data, tmp_path):
    fitted.save(tmp_path / "tok")
    for loaded in (load_tokenizer(tmp_path / "tok"), type(fitted).load(tmp_path / "tok")):
        assert type(loaded) is type(fitted)
        codes = fitted.encode(data)
        assert torch.equal(loaded.encode(data), codes)
        assert torch.equal(loaded.decode(codes), fitted.decode(codes))
    other = RQVAETokenizer if isinstance(fitted, HierarchicalKMeans) else HierarchicalKMeans
    with pytest.raises(ValueError, match="tokenizer, not"):
        other.load(tmp_path / "tok")
    assert not any(p.suffix in (".pt", ".pkl") for p in (tmp_path / "tok").iterdir())


def test_bad_inputs_are_rejected_with_row_indices(fitted, data):
    bad = data.copy()
    bad[[1, 4]] = np.nan
    bad[9, 0] = np.inf
    with pytest.raises(ValueError, match=r"3 row\(s\) contain NaN or inf, rows \[1, 4, 9\]"):
        fitted.encode(bad)
    with pytest.raises(ValueError, match=r"rows \[1, 4, 9\]"):
        type(fitted)(**({"branching": 8} if isinstance(fitted, HierarchicalKMeans) else SMALL_RQVAE)).fit(bad)
    with pytest.raises(ValueError, match="2-D"):
        fitted.encode(data[0])
    with pytest.raises(ValueError, match="expected 16"):
        fitted.encode(data[:, :5])
    with pytest.raises(ValueError, match="outside codebook sizes"):
        fitted.decode(torch.full((2, 3), 10_000))
    with pytest.raises(ValueError, match="at least 2"):
        type(fitted)().fit(data[:1])
    with pytest.raises(RuntimeError, match="not fitted"):
        type(fitted)().encode(data)


def test_configs_validate_and_constructors_are_keyword_only():
    with pytest.raises(ValueError, match="codebook_size"):
        RQVAEConfig(codebook_size=1)
    with pytest.raises(ValueError, match="hidden_dims"):
        RQVAEConfig(hidden_dims=[0])
    with pytest.raises(ValueError, match="either config"):
        RQVAETokenizer(config=RQVAEConfig(), latent_dim=4)
    with pytest.raises(TypeError):
        RQVAETokenizer(RQVAEConfig())  # noqa: keyword-only on purpose


# --- RQ-VAE ----------------------------------------------------------------------------------
def test_rqvae_round_trip_on_a_mixture_improves_with_training():
    x = mixture(2000, 32, 16)
    tok = RQVAETokenizer(hidden_dims=[64, 32], latent_dim=8, n_levels=3, codebook_size=16, epochs=20,
                         batch_size=64, lr=3e-3)
    errors = []
    tok.fit(x, on_epoch_end=lambda epoch, stats: errors.append(tok.reconstruction_error(x)))
    assert len(errors) == len(tok.history) == 20
    assert errors[-1] < 0.3 * errors[0]
    assert tok.reconstruction_error(x) / x.var() < 0.05  # the mixture's noise is 1% of its variance
    assert tok.history[-1].reconstruction_loss < tok.history[0].reconstruction_loss


def test_rqvae_forward_output_and_loss():
    model = RQVAE(RQVAEConfig(input_dim=12, hidden_dims=[16], latent_dim=4, n_levels=2, codebook_size=8))
    x = torch.randn(10, 12)
    out = model(x)
    assert out.reconstruction.shape == (10, 12) and out.latent.shape == (10, 4) and out.quantized.shape == (10, 4)
    assert out.codes.shape == (10, 2) and out.residuals.shape == (10, 2, 4)
    assert torch.allclose(out.loss, out.reconstruction_loss + out.quantize_loss)
    assert torch.allclose(out.quantized, model.codebooks[[0, 1], out.codes].sum(1))  # value = sum of codes
    assert torch.allclose(model.decode_codes(out.codes), out.reconstruction)
    out.reconstruction_loss.backward()  # straight-through: the encoder learns from reconstruction
    assert model.encoder[0].weight.grad.abs().sum() > 0


def test_dead_code_reseeding_reduces_unused_codes():
    x = mixture(1000, 16, 32)
    cfg = RQVAEConfig(input_dim=16, hidden_dims=[32], latent_dim=8, n_levels=2, codebook_size=32, batch_size=100)
    used = {}
    for threshold in (0, 1):
        torch.manual_seed(0)
        model = RQVAE(cfg)
        init_codebooks(model, x, cfg)
        with torch.no_grad():
            model.codebooks[0, 1:] += 100.0  # all but code 0 far away: 31 dead codes
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        stats = rqvae_epoch(model, opt, shuffled_batches(torch.from_numpy(x), 100, gen),
                            dead_code_threshold=threshold, generator=gen)
        assert stats.code_counts[0, 1:].sum() == 0 and stats.n_items == 1000
        assert stats.reseeded[0] == (31 if threshold else 0)
        with torch.no_grad():
            codes = model.quantize(model.encoder(torch.from_numpy(x)))[0]
        used[threshold] = len(codes[:, 0].unique())
    assert used[0] == 1 and used[1] >= 16


def test_rqvae_epoch_takes_any_iterable_and_synced_reseed_matches_local():
    x = torch.from_numpy(mixture(300, 16, 4))
    cfg = RQVAEConfig(input_dim=16, hidden_dims=[16], latent_dim=4, n_levels=2, codebook_size=64)
    model = RQVAE(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stats = rqvae_epoch(model, opt, iter([x[:100], x[100:250], x[250:]]), dead_code_threshold=0)
    assert stats.n_items == 300 and int(stats.code_counts.sum()) == 300 * 2 and stats.reseeded.sum() == 0
    a, b = RQVAE(cfg), RQVAE(cfg)
    b.load_state_dict(a.state_dict())
    ra = reseed_dead_codes(a, stats.code_counts, stats.residual_sample, 1, torch.Generator().manual_seed(1))
    rb = reseed_dead_codes_synced(b, opt, stats, 1, torch.Generator().manual_seed(1))  # no process group
    assert torch.equal(ra, rb) and ra.sum() > 0 and torch.equal(a.codebooks, b.codebooks)


# --- the quality report ----------------------------------------------------------------------
def test_id_quality_on_known_codes():
    codes = np.array([[0, 0], [0, 0], [1, 2], [3, 1]])
    q = id_quality(codes, [4, 4], reconstruction_error=0.5)
    lv0 = q["levels"][0]
    assert (lv0["used"], lv0["utilisation"]) == (3, 0.75)
    assert lv0["perplexity"] == pytest.approx(np.exp(-(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25))))
    assert (q["unique_tuples"], q["collision_rate"], q["max_items_per_tuple"]) == (3, 0.5, 2)
    assert q["reconstruction_error"] == 0.5 and q["n_items"] == 4
    uniform = id_quality(np.arange(8)[:, None], [8])
    assert uniform["levels"][0]["perplexity"] == pytest.approx(8) and uniform["collision_rate"] == 0


def test_write_report_files(tmp_path):
    codes = np.random.default_rng(0).integers(0, 8, (200, 3))
    table = write_report(tmp_path / "r", codes, [8, 8, 8])
    q = json.loads((tmp_path / "r" / "id_quality.json").read_text())
    assert q == json.loads(json.dumps(id_quality(codes, [8, 8, 8])))
    png = (tmp_path / "r" / "code_usage.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width = matplotlib.image.imread(tmp_path / "r" / "code_usage.png").shape[:2]
    assert width == 3 * height * 4 // 3  # one 4x3-inch panel per level
    assert table.count("\n| ") == 3 and "collision rate" in table
