"""The cascade's re-ranking step (``recsys.cascade.rerank``) and the serving answer built on it
(``serve.state.answer``), without Ray: the ranker's order over the retriever's list, exactly as
offline evaluation scores it. tests/test_serve.py serves a cascade over real HTTP."""

import numpy as np
import pytest
import torch

from recsys.candidates import CandidateSet
from recsys.cascade import rerank
from recsys.data.split import Histories
from recsys.models import Batch, build_model, model_config_from_dict
from recsys.training.evaluate import ranker_scores
from serve.state import Query, Request, answer, run_queries

pytestmark = pytest.mark.usefixtures("one_thread")
N_ITEMS = 40


def ranker(name: str = "twin_v2"):
    """A ranker whose order is its own, not the retriever's (an untrained one copies the retriever)."""
    torch.manual_seed(0)
    _, cfg = model_config_from_dict({"name": name, "gamma": 3, "d_model": 16})
    vectors = torch.randn(N_ITEMS + 1, 6, generator=torch.Generator().manual_seed(1))
    model = build_model(name, cfg, n_items=N_ITEMS, max_len=10, item_vectors=vectors)
    with torch.no_grad():
        model.mlp[-1].weight.normal_(0, 1.0)
        model.score_weight.zero_()
    return model.eval()


def lists(seed: int = 0, rows: int = 4, n: int = 12):
    rng = np.random.default_rng(seed)
    histories = [list(rng.integers(1, N_ITEMS + 1, size=int(rng.integers(1, 30)))) for _ in range(rows)]
    candidates = [list(rng.permutation(np.arange(1, N_ITEMS + 1))[:n]) for _ in range(rows)]
    scores = [sorted(rng.normal(size=n).tolist(), reverse=True) for _ in range(rows)]
    return histories, candidates, scores


@pytest.mark.parametrize("name", ["twin", "twin_v2"])
def test_rerank_orders_the_retrievers_list_as_offline_evaluation_scores_it(name):
    model = ranker(name)
    histories, candidates, scores = lists()
    got = rerank(model, histories, candidates, scores, ks=[12, 5, 1, 12])
    # offline: the same lists through the evaluation path, user by user
    h = Histories(user_index=np.arange(4), items=[np.asarray(x) for x in histories], times=None,
                  targets=np.ones(4, dtype=np.int64), target_times=None)
    found = CandidateSet(np.arange(4), np.asarray(candidates), np.asarray(scores, dtype=np.float32), np.ones(4, np.int64))
    offline = ranker_scores(model, found, h)
    for row, (answer_, k) in enumerate(zip(got, [12, 5, 1, 12])):
        order = np.argsort(-offline[row], kind="stable")[:k]
        assert answer_.items == [candidates[row][j] for j in order]
        assert answer_.retriever_ranks == order.tolist()
        np.testing.assert_allclose(answer_.scores, offline[row][order], rtol=1e-5, atol=1e-5)
        assert answer_.scores == sorted(answer_.scores, reverse=True)
    assert any(a.retriever_ranks != sorted(a.retriever_ranks) for a in got)  # the ranker changed the order


def test_excluded_and_missing_candidates_are_never_returned():
    model = ranker()
    histories, candidates, scores = lists(rows=2, n=6)
    scores[0][2] = float("-inf")  # an excluded item
    candidates[1], scores[1] = candidates[1][:3], scores[1][:3]  # a shorter list
    got = rerank(model, histories, candidates, scores, ks=[6, 6])
    assert len(got[0].items) == 5 and candidates[0][2] not in got[0].items and 2 not in got[0].retriever_ranks
    assert sorted(got[1].items) == sorted(candidates[1]) and sorted(got[1].retriever_ranks) == [0, 1, 2]


def test_bad_arguments_say_what_is_wrong():
    model = ranker()
    histories, candidates, scores = lists(rows=2)
    with pytest.raises(ValueError, match="2 histories, 2 candidate lists, 2 score lists and 1 k's"):
        rerank(model, histories, candidates, scores, ks=[3])
    with pytest.raises(ValueError, match="request 1: 12 candidates but 11 retriever scores"):
        rerank(model, histories, candidates, [scores[0], scores[1][:-1]], ks=[3, 3])
    with pytest.raises(ValueError, match="at least one item"):
        rerank(model, [[], histories[1]], candidates, scores, ks=[3, 3])


def test_answer_retrieves_the_top_n_and_the_ranker_keeps_k():
    from recsys.models import build_model as build

    torch.manual_seed(0)
    _, cfg = model_config_from_dict({"name": "sasrec", "d_model": 16, "n_layers": 1, "d_ff": 32})
    retriever = build("sasrec", cfg, n_items=N_ITEMS, max_len=10).eval()
    model = ranker()
    long = [[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [7, 1]]
    requests = [Request(Query(h[-10:], 15, False, None), k, h) for h, k in zip(long, [4, 15])]
    got = answer(retriever, model, requests)
    found = run_queries(retriever, [r.query for r in requests])
    expected = rerank(model, long, [f[0] for f in found], [f[1] for f in found], [4, 15])
    assert [g[0] for g in got] == [e.items for e in expected] and [len(g[0]) for g in got] == [4, 15]
    assert [g[2] for g in got] == [e.retriever_ranks for e in expected]
    # the retriever reads its window only; the ranker reads the whole history
    alone = answer(retriever, None, [Request(Query(long[0][-10:], 4, False, None), 4)])
    direct = retriever.recommend(Batch(history=torch.tensor([long[0][-10:]])), 4)
    assert alone[0][0] == direct.items[0].tolist() and alone[0][2] is None
