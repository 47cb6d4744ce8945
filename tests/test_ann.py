"""The ANN baseline: SASRec's user embedding searched in a faiss index over its item embeddings."""

import pytest
import torch

from recsys.ann import AnnRetriever
from recsys.models import IdTable, Batch, build_model, get_spec

N_ITEMS, MAX_LEN = 300, 8


@pytest.fixture(scope="module")
def sasrec():
    torch.manual_seed(0)
    config = get_spec("sasrec").config_cls(d_model=16, n_layers=1, n_heads=1, d_ff=32)
    return build_model("sasrec", config, n_items=N_ITEMS, max_len=MAX_LEN).eval()


@pytest.fixture(scope="module")
def histories():
    h = torch.randint(1, N_ITEMS + 1, (32, MAX_LEN), generator=torch.Generator().manual_seed(1))
    h[:8, :5] = 0  # left padding
    return h


def test_sasrec_scores_are_inner_products_of_user_and_item_embeddings(sasrec, histories):
    scores = sasrec.score_items(Batch(history=histories))[:, 1:]  # (B, N)
    expected = sasrec.user_embedding(Batch(history=histories)) @ sasrec.item_embeddings().T
    assert sasrec.item_embeddings().shape == (N_ITEMS, 16)
    assert torch.allclose(scores, expected, atol=1e-5)


@pytest.mark.parametrize("exclude", [False, True])
def test_flat_index_returns_exactly_what_the_model_returns(sasrec, histories, exclude):
    ann = AnnRetriever(sasrec, index="Flat")
    got = ann.recommend(Batch(history=histories), 10, exclude_history=exclude)
    want = sasrec.recommend(Batch(history=histories), 10, exclude_history=exclude)
    assert torch.equal(got.items, want.items)
    assert torch.allclose(got.scores, want.scores, atol=1e-4)
    if exclude:
        for row, items in zip(histories, got.items):
            assert not set(items.tolist()) & set(row.tolist())


def test_hnsw_index_recovers_most_of_the_exact_top_k(sasrec, histories):
    ann = AnnRetriever(sasrec, index="HNSW16", ef_search=64)
    got = ann.recommend(Batch(history=histories), 20, exclude_history=True)
    want = sasrec.recommend(Batch(history=histories), 20, exclude_history=True)
    overlap = [len(set(g.tolist()) & set(w.tolist())) / 20 for g, w in zip(got.items, want.items)]
    assert sum(overlap) / len(overlap) >= 0.9
    assert (got.items > 0).all() and (got.scores[:, :-1] >= got.scores[:, 1:] - 1e-5).all()


def test_models_without_embeddings_and_unknown_indexes_are_refused(sasrec):
    from recsys.models import Tiger, TigerConfig

    tiger = Tiger(TigerConfig(d_model=8, n_encoder_layers=1, n_decoder_layers=1, n_heads=1, head_dim=8, d_ff=16),
                  3, 4, ids={"semantic": IdTable(torch.tensor([[0, 0], [0, 0], [0, 1], [1, 0]]))})
    with pytest.raises(ValueError, match="Tiger does not expose user and item vectors"):
        AnnRetriever(tiger)
    with pytest.raises(ValueError, match="ann index 'IVF4096,PQ8' is not supported"):
        AnnRetriever(sasrec, index="IVF4096,PQ8")
    with pytest.raises(ValueError, match="k=301 is out of range"):
        AnnRetriever(sasrec, index="Flat").recommend(Batch(history=torch.ones(1, 2, dtype=torch.long)), 301)


def test_a_time_aware_hstu_is_served_by_the_index_with_its_times():
    """The ANN path passes a request's times to HSTU as the model's own path does, and asks for
    them when the model requires them (model.time_bias=on)."""
    from serve.state import Query, RequestError, check_required_inputs, run_queries

    torch.manual_seed(0)
    config = get_spec("hstu").config_cls(d_model=16, n_layers=1, n_heads=2, loss="ce", time_bias="on")
    hstu = build_model("hstu", config, n_items=N_ITEMS, max_len=MAX_LEN).eval()
    ann = AnnRetriever(hstu, index="Flat")
    assert ann.capabilities.reads_timestamps and ann.timestamps_required and not ann.users_required
    with pytest.raises(RequestError, match="give `timestamps`"):
        check_required_inputs(ann, None, None)
    hour = 3600
    queries = [Query([5, 9, 2], 10, False, None, [0, hour, 5 * hour], 6 * hour),
               Query([7], 10, True, None, [100 * hour], 900 * hour)]
    got, want = run_queries(ann, queries), run_queries(hstu, queries)
    assert [items for items, _ in got] == [items for items, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-5)
    later = run_queries(ann, [queries[0]._replace(time=60 * 24 * hour)])  # the request's time is the query time
    assert later[0][1] != pytest.approx(got[0][1], abs=1e-5)
