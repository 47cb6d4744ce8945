"""Cold start: items registered after the IDs were built get IDs from their content alone."""

import zlib

import numpy as np
import pandas as pd
import pytest
import torch

from recsys.catalog import ItemCatalog
from recsys.semantic_ids import HierarchicalKMeans
from recsys.semantic_ids.build import build_index
from recsys.text import ItemTextConfig

rng = np.random.default_rng(0)
CENTERS = rng.normal(size=(6, 16)).astype(np.float32) * 5
WORDS = ["lipstick", "shampoo", "mascara", "perfume", "sunscreen", "nail"]


def fake_embed(texts: list[str]) -> np.ndarray:
    """A content-faithful stand-in for the sentence encoder: the topic word picks the cluster."""
    out = []
    for text in texts:
        topic = next(i for i, w in enumerate(WORDS) if w in text)
        noise = np.random.default_rng(zlib.crc32(text.encode())).normal(size=16) * 0.05
        out.append(CENTERS[topic] + noise)
    return np.asarray(out, dtype=np.float32)


@pytest.fixture
def catalog():
    items = pd.DataFrame({"item_id": np.arange(1, 121), "title": [f"{WORDS[i % 6]} model {i}" for i in range(120)]})
    emb = fake_embed(items["title"].tolist())
    tokenizer = HierarchicalKMeans(branching=6, max_levels=2, seed=0).fit(emb)
    index = build_index(items["item_id"].to_numpy(), tokenizer, emb)
    return ItemCatalog(tokenizer, index, ItemTextConfig(template=["{title}"]), fake_embed)


def test_new_items_get_content_ids_without_changing_existing_ones(catalog):
    before = catalog.index.full_ids.clone()
    new = pd.DataFrame({"item_id": [500, 501], "title": ["mascara waterproof new", "sunscreen spf 50 new"]})
    ids = catalog.register(new)
    assert torch.equal(catalog.index.full_ids[:120], before)  # nothing existing moved
    # the new mascara shares its content prefix with the existing mascaras (items 3, 9, ...)
    assert ids[0, :1].tolist() == list(catalog.index.id_of(3)[:1])
    assert ids[1, :1].tolist() == list(catalog.index.id_of(5)[:1])
    for item, full in zip((500, 501), ids.tolist()):
        assert catalog.index.item_of(full) == item  # reachable: ID -> item
        node = catalog.index.node_of(tuple(full))
        assert catalog.index.item_at(node) == item  # and through the trie, as constrained decoding walks it


def test_registering_a_known_or_repeated_id_is_rejected_and_adds_nothing(catalog):
    n = len(catalog.index)
    with pytest.raises(ValueError, match=r"already registered or repeated: \[7\]"):
        catalog.register(pd.DataFrame({"item_id": [7], "title": ["nail polish"]}))
    with pytest.raises(ValueError, match="repeated in the request"):
        catalog.register(pd.DataFrame({"item_id": [900, 900], "title": ["nail a", "nail b"]}))
    with pytest.raises(ValueError, match="need an item_id column"):
        catalog.register(pd.DataFrame({"title": ["nail c"]}))
    assert len(catalog.index) == n
