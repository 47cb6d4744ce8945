"""Batched constrained beam search against exhaustive scoring of every valid ID (slow reference)."""

import pytest
import torch

from recsys.generation import advance, allowed_tokens, beam_search, trie_edges
from recsys.semantic_ids import SemanticIdIndex

B = 4


def catalogue(n_items: int = 30, seed: int = 0, n_codes: int = 3) -> SemanticIdIndex:
    """3 content levels of n_codes codes plus the collision level; 30 items in 27 tuples collide."""
    codes = torch.randint(0, n_codes, (n_items, 3), generator=torch.Generator().manual_seed(seed))
    return SemanticIdIndex(item_ids=torch.arange(1, n_items + 1), codes=codes)


class RandomModel:
    """A step_fn defined on full prefixes: log-probs depend on (batch row, whole prefix) only.

    Every level's vocabulary has one token more than the IDs use, so that there is always
    something to mask; ``bad`` puts most of the mass on tokens no ID uses.
    """

    def __init__(self, index: SemanticIdIndex, seed: int, bad: float = 0.0):
        g = torch.Generator().manual_seed(seed)
        self.vocab = [v + 1 for v in index.level_sizes]
        self.n_prefixes = [1]
        for v in self.vocab[:-1]:
            self.n_prefixes.append(self.n_prefixes[-1] * v)
        self.logp = []
        for n, v in zip(self.n_prefixes, self.vocab):
            logits = torch.randn(B, n, v, generator=g) * 2
            logits[..., -1] += bad
            self.logp.append(torch.log_softmax(logits, -1))  # (B, prefixes, V)
        self.calls = 0
        self.rows: list[int] = []  # rows scored per call

    def key(self, prefix: torch.Tensor) -> torch.Tensor:
        """prefix (R, t) -> (R,) mixed-radix number of the prefix."""
        key = torch.zeros(len(prefix), dtype=torch.long)
        for level in range(prefix.shape[1]):
            key = key * self.vocab[level] + prefix[:, level]
        return key

    def __call__(self, prefix: torch.Tensor, parents: torch.Tensor | None) -> torch.Tensor:
        self.calls += 1
        R, t = prefix.shape
        # each row extends the previous call's row ``parents[r]``: what a decoder's cache follows
        assert (parents is None) == (t == 0)
        if parents is not None:
            assert torch.equal(prefix[:, :-1], self.previous[parents])
        self.previous = prefix
        self.rows.append(R)
        row = torch.arange(R) // (R // B)  # beams are batch-major
        return self.logp[t][row, self.key(prefix)]  # (R, V_t)

    def exhaustive(self, full_ids: torch.Tensor) -> torch.Tensor:
        """full_ids (N, L + 1) -> (B, N) sum of log-probs along each ID's path."""
        total = torch.zeros(B, len(full_ids))
        for t in range(full_ids.shape[1]):
            total += self.logp[t][:, self.key(full_ids[:, :t]), full_ids[:, t]]
        return total


def reference_top(model: RandomModel, index: SemanticIdIndex, k: int, exclude: torch.Tensor | None = None):
    scores = model.exhaustive(index.full_ids)  # (B, N), columns in index row order
    items = index.item_ids.expand(B, -1)
    if exclude is not None:
        scores = scores.masked_fill((items[:, :, None] == exclude[:, None, :]).any(-1), float("-inf"))
    top = scores.topk(k, dim=1)
    return items.gather(1, top.indices), top.values


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 5, 30])
def test_beam_as_wide_as_the_catalogue_is_exhaustive(seed, k):
    index = catalogue(seed=seed)
    model = RandomModel(index, seed)
    for beam in (30, 45):
        out = beam_search(model, index.transition_table(), B, k, beam)
        ref_items, ref_scores = reference_top(model, index, k)
        assert torch.equal(out.items, ref_items)
        torch.testing.assert_close(out.scores, ref_scores)
        assert torch.equal(out.codes, index.ids_for(out.items.reshape(-1)).reshape(B, k, -1))
    assert model.calls == 2 * len(index.level_sizes)  # one step_fn call per level
    # the root is scored once per batch row, every later level once per beam (+ the excluded)
    levels = len(index.level_sizes)
    assert model.rows == [B] + [B * 30] * (levels - 1) + [B] + [B * 45] * (levels - 1)


def test_small_beams_return_valid_distinct_items_scored_exactly():
    """Over many random batches, with beams much narrower than the catalogue: invalid rate 0, and
    every returned score is the item's true path log-probability."""
    returned = invalid = 0
    for seed in range(40):
        index = catalogue(seed=seed)
        model = RandomModel(index, seed, bad=3.0 * (seed % 2))  # odd seeds favour invalid tokens
        exact = model.exhaustive(index.full_ids)  # (B, N)
        column = {item: c for c, item in enumerate(index.item_ids.tolist())}
        for beam, k in ((1, 1), (2, 2), (5, 3), (8, 8)):
            out = beam_search(model, index.transition_table(), B, k, beam)
            items = out.items.tolist()
            returned += out.items.numel()
            invalid += sum(item not in column for row in items for item in row)
            assert all(len(set(row)) == k for row in items)
            truth = torch.tensor([[exact[b, column[i]].item() for i in row] for b, row in enumerate(items)])
            torch.testing.assert_close(out.scores, truth)
            assert (out.scores[:, :-1] >= out.scores[:, 1:]).all()
    assert returned > 1000 and invalid == 0


def test_beam_one_is_greedy_over_allowed_tokens():
    index = catalogue(seed=3)
    model = RandomModel(index, 3, bad=5.0)
    out = beam_search(model, index.transition_table(), B, 1, 1)
    for b in range(B):
        prefix = ()
        for t in range(len(index.level_sizes)):
            allowed = index.allowed_next(prefix)
            logp = model.logp[t][b, model.key(torch.tensor([prefix], dtype=torch.long).reshape(1, t))[0]]
            prefix += (int(allowed[logp[allowed].argmax()]),)
        assert out.items[b, 0].item() == index.item_of(prefix)


def test_fewer_ids_than_k_pads_with_minus_one_and_minus_inf():
    index = SemanticIdIndex(item_ids=torch.tensor([1, 2, 3]), codes=torch.tensor([[0, 1], [0, 1], [2, 0]]))
    model = RandomModel(index, 1)
    out = beam_search(model, index.transition_table(), B, 5, 8)
    assert (out.items[:, :3] > 0).all() and sorted(out.items[0, :3].tolist()) == [1, 2, 3]
    assert (out.items[:, 3:] == -1).all() and torch.isinf(out.scores[:, 3:]).all()
    assert torch.isfinite(out.scores[:, :3]).all() and (out.codes[:, 3:] == -1).all()


@pytest.mark.parametrize("seed", range(4))
def test_exclude_masks_items_at_the_leaf(seed):
    index = catalogue(seed=seed)
    model = RandomModel(index, seed)
    g = torch.Generator().manual_seed(seed)
    exclude = torch.randint(0, 31, (B, 6), generator=g)  # 0 = padding
    out = beam_search(model, index.transition_table(), B, 10, 30, exclude=exclude)  # exhaustive width
    ref_items, ref_scores = reference_top(model, index, 10, exclude)
    assert torch.equal(out.items, ref_items)
    torch.testing.assert_close(out.scores, ref_scores)
    # narrower beams: still no excluded item, and k results (24+ items remain outside exclude)
    for beam in (2, 20):
        narrow = beam_search(model, index.transition_table(), B, beam, beam, exclude=exclude)
        assert (narrow.items > 0).all()
        for row, banned in zip(narrow.items.tolist(), exclude.tolist()):
            assert not set(row) & set(banned) and len(set(row)) == beam


def test_all_but_excluded_are_returned_when_k_exceeds_what_is_left():
    index = catalogue(n_items=10, seed=1)
    model = RandomModel(index, 1)
    exclude = torch.arange(1, 5).expand(B, -1)  # 6 items left
    out = beam_search(model, index.transition_table(), B, 8, 8, exclude=exclude)
    assert all(sorted(row[:6]) == list(range(5, 11)) for row in out.items.tolist())
    assert (out.items[:, 6:] == -1).all() and torch.isinf(out.scores[:, 6:]).all()


def test_vectorised_trie_ops_match_the_index():
    index = catalogue(seed=2)
    edges = trie_edges(index.transition_table())
    g = torch.Generator().manual_seed(0)
    nodes = torch.randint(-1, index.n_nodes, (200,), generator=g)
    tokens = torch.randint(-1, 6, (200,), generator=g)
    for vocab in (2, 4, 6):
        assert torch.equal(allowed_tokens(edges, nodes, vocab), index.next_mask(nodes, vocab))
    assert torch.equal(advance(edges, nodes, tokens), index.step(nodes, tokens))


def test_bad_arguments_are_rejected():
    index = catalogue()
    with pytest.raises(ValueError, match="k=6 is out of range"):
        beam_search(RandomModel(index, 0), index.transition_table(), B, 6, 5)
    empty = SemanticIdIndex(item_ids=torch.zeros(0, dtype=torch.long), codes=torch.zeros(0, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="holds no IDs"):
        trie_edges(empty.transition_table())
