"""The semantic-ID index: collision level, ID <-> item maps, and the prefix trie."""

from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from recsys.semantic_ids import SemanticIdIndex


@pytest.fixture
def items():
    rng = np.random.default_rng(0)
    item_ids = rng.permutation(np.arange(1, 5000))[:300]  # distinct, unordered, not 0..N-1
    codes = rng.integers(0, 4, (300, 3))  # 64 tuples for 300 items: plenty of collisions
    return item_ids, codes


@pytest.fixture
def index(items):
    return SemanticIdIndex(item_ids=items[0], codes=items[1], codebook_sizes=[4, 4, 4])


def brute_prefixes(full_ids: np.ndarray) -> dict[tuple, set]:
    nxt = defaultdict(set)
    for row in full_ids.tolist():
        for depth in range(len(row)):
            nxt[tuple(row[:depth])].add(row[depth])
    return nxt


def test_full_ids_are_unique_and_keep_content_codes(index, items):
    item_ids, codes = items
    full = index.ids_for(item_ids)
    assert full.shape == (300, 4)
    assert len(torch.unique(full, dim=0)) == 300
    assert torch.equal(full[:, :3], torch.from_numpy(codes))


def test_collision_codes_follow_item_id_order(index, items):
    groups = defaultdict(list)
    for item, row in zip(*items):
        groups[tuple(row)].append(item)
    for members in groups.values():
        assert [index.id_of(item)[-1] for item in sorted(members)] == list(range(len(members)))
    sizes = Counter(tuple(r) for r in items[1].tolist())
    assert index.collision_rate == pytest.approx(sum(s for s in sizes.values() if s > 1) / 300)
    assert index.max_collision_depth == max(sizes.values())
    assert index.level_sizes == [4, 4, 4, max(sizes.values())]


def test_id_item_round_trip_and_unknowns(index, items):
    for item in items[0].tolist():
        assert index.item_of(index.id_of(item)) == item
    assert torch.equal(index.ids_for(items[0][:5]), torch.tensor([index.id_of(i) for i in items[0][:5]]))
    with pytest.raises(KeyError, match="belongs to no item"):
        index.item_of((9, 9, 9, 0))
    with pytest.raises(KeyError, match="not in the semantic-ID index"):
        index.id_of(-5)
    with pytest.raises(KeyError, match=r"1 item id\(s\) are not in the index: \[123456\]"):
        index.ids_for([items[0][0], 123456])


def test_constructor_rejects_bad_input(items):
    with pytest.raises(ValueError, match="already in the index"):
        SemanticIdIndex(item_ids=[1, 1], codes=[[0, 0], [0, 1]])
    with pytest.raises(ValueError, match="hold 2 items but codes hold 1"):
        SemanticIdIndex(item_ids=[1, 2], codes=[[0, 0]])
    with pytest.raises(ValueError, match="outside codebook sizes"):
        SemanticIdIndex(item_ids=[1], codes=[[0, 7]], codebook_sizes=[4, 4])


def test_trie_matches_brute_force_prefixes(index):
    full = index.full_ids.numpy()
    expected = brute_prefixes(full)
    for prefix, tokens in expected.items():
        assert index.allowed_next(prefix).tolist() == sorted(tokens)
        node_tokens, child_nodes = index.children(index.node_of(prefix))
        assert node_tokens.tolist() == sorted(tokens) and len(child_nodes) == len(tokens)
    n_prefixes = len({tuple(r[:d]) for r in full.tolist() for d in range(5)})
    assert index.n_nodes == n_prefixes  # one node per distinct prefix, the full IDs included
    assert index.allowed_next(tuple(full[0])).numel() == 0  # a full ID has no continuation
    absent = next(p for p in ((a, b) for a in range(5) for b in range(5)) if p not in expected)
    assert index.allowed_next(absent).numel() == 0
    with pytest.raises(KeyError, match="no semantic ID starts with"):
        index.node_of(absent)


def test_batched_trie_walk_reaches_every_item(index, items):
    full = index.ids_for(items[0])  # (N, L + 1)
    table = index.transition_table()
    nodes = torch.zeros(len(full), dtype=torch.int64)
    vocab = max(index.level_sizes)
    for depth in range(full.shape[1]):
        mask = index.next_mask(nodes, vocab_size=vocab)
        assert mask[torch.arange(len(full)), full[:, depth]].all()
        for b in range(0, len(full), 37):  # the mask is exactly the allowed set
            assert torch.nonzero(mask[b]).flatten().tolist() == index.allowed_next(full[b, :depth].tolist()).tolist()
        nodes = index.step(nodes, full[:, depth])
        assert (table.depth[nodes] == depth + 1).all()
    assert torch.equal(table.leaf_item[nodes], torch.from_numpy(items[0]))
    dead = index.step(torch.tensor([0, 0, -1]), torch.tensor([vocab + 1, -1, 0]))
    assert dead.tolist() == [-1, -1, -1]
    assert not index.next_mask(torch.tensor([-1]), vocab).any()


def test_add_never_changes_existing_ids_and_new_ids_are_reachable(index, items):
    before = {item: index.id_of(item) for item in items[0].tolist()}
    tuple0 = tuple(items[1][0].tolist())
    shared = sum(1 for r in items[1].tolist() if tuple(r) == tuple0)
    n = len(index)
    assert index.next_full_id(tuple0) == tuple0 + (shared,) and len(index) == n  # a preview adds nothing
    new_id = index.add(10_001, tuple0)
    assert new_id == tuple0 + (shared,)  # next free collision code of its tuple
    fresh = index.add_many([10_003, 10_002], [[3, 3, 3], [3, 3, 3]])
    assert fresh[1, -1] + 1 == fresh[0, -1]  # item-id order within the batch
    assert {item: index.id_of(item) for item in items[0].tolist()} == before
    for item in (10_001, 10_002, 10_003):
        full_id = index.id_of(item)
        assert index.item_at(index.node_of(full_id)) == item
        assert full_id[-1] in index.allowed_next(full_id[:-1]).tolist()
    assert len(torch.unique(index.full_ids, dim=0)) == len(index) == 303
    with pytest.raises(ValueError, match="already in the index"):
        index.add(10_001, [0, 0, 0])
    with pytest.raises(ValueError, match="must be 3 non-negative"):
        index.add(10_004, [0, 0])


def test_save_load_keeps_ids_and_trie(index, tmp_path):
    index.add(20_000, [1, 2, 3])
    loaded = SemanticIdIndex.load(index.save(tmp_path / "idx"))
    assert torch.equal(loaded.item_ids, index.item_ids) and torch.equal(loaded.full_ids, index.full_ids)
    for a, b in zip(loaded.transition_table(), index.transition_table()):
        assert torch.equal(a, b)
    assert loaded.collision_rate == index.collision_rate and loaded.codebook_sizes == [4, 4, 4]
    assert loaded.add(20_001, [1, 2, 3]) == index.add(20_001, [1, 2, 3])
