"""The serving state without Ray: id mapping, request checks, registrations, exact batching."""

import pytest
import torch

from recsys.models import IdTable, Batch, Tiger, TigerConfig, semantic_id_table
from recsys.semantic_ids import SemanticIdIndex
from serve.state import (ItemIds, Query, Registration, RequestError, apply_registrations, check_history, check_k,
                         run_queries)

N_ITEMS, MAX_LEN = 30, 6


@pytest.fixture
def index() -> SemanticIdIndex:
    codes = torch.randint(0, 4, (N_ITEMS, 2), generator=torch.Generator().manual_seed(0))
    return SemanticIdIndex(item_ids=torch.arange(1, N_ITEMS + 1), codes=codes, codebook_sizes=[4, 4])


@pytest.fixture
def model(index) -> Tiger:
    torch.manual_seed(0)
    sizes = index.level_sizes
    cfg = TigerConfig(d_model=16, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, head_dim=8, d_ff=32, beam_size=5)
    return Tiger(cfg, N_ITEMS, MAX_LEN, ids={"semantic": IdTable(semantic_id_table(index, N_ITEMS), sizes[:-1] + [sizes[-1] + 4])}).eval()


def raw_ids(n: int = N_ITEMS) -> list[str]:
    return [f"R{i}" for i in range(1, n + 1)]


def test_item_ids_map_both_ways_and_name_unknown_ids():
    ids = ItemIds(raw_ids())
    assert ids.internal(["R3", "R1"]) == [3, 1] and ids.raw(30) == "R30"
    with pytest.raises(RequestError, match=r"unknown item id\(s\) in history: 'X', 'R0'") as err:
        ids.internal(["R1", "X", "R0"])
    assert err.value.status == 422
    assert ids.add("NEW") == 31 and ids.internal(["NEW"]) == [31]
    with pytest.raises(RequestError, match="already registered"):
        ids.add("R2")
    with pytest.raises(ValueError, match="appears twice"):
        ItemIds(["a", "b", "a"])


def test_request_checks_say_what_is_wrong():
    check_history(["a"], 3)
    with pytest.raises(RequestError, match="history is empty"):
        check_history([], 3)
    with pytest.raises(RequestError, match="holds 4 items, more than the limit of 3"):
        check_history(["a"] * 4, 3)
    check_k(5, 5, 100)
    with pytest.raises(RequestError, match=r"k=6 is out of range; allowed: 1 <= k <= 5"):
        check_k(6, 5, 100)
    with pytest.raises(RequestError, match=r"1 <= k <= 2 \(the smaller of max_k=2"):
        check_k(3, 5, 2)
    with pytest.raises(RequestError, match="k=0"):
        check_k(0, 5, 100)


def test_batched_queries_answer_exactly_as_calls_of_their_own(model):
    g = torch.Generator().manual_seed(1)
    queries = []
    for i in range(12):
        n = int(torch.randint(1, MAX_LEN + 1, (1,), generator=g))
        history = torch.randint(1, N_ITEMS + 1, (n,), generator=g).tolist()
        queries.append(Query(history, k=[1, 3, 5, 8, 12][i % 5], exclude_history=i % 3 == 0, user=None))
    batched = run_queries(model, queries)
    for q, (items, scores) in zip(queries, batched):
        alone = model.recommend(Batch(history=torch.tensor([q.history])), q.k, exclude_history=q.exclude_history)
        assert items == alone.items[0].tolist()
        assert scores == pytest.approx(alone.scores[0].tolist(), abs=1e-4)
        if q.exclude_history:
            assert not set(items) & set(q.history)


def test_registrations_apply_in_order_once_and_refuse_gaps(model, index):
    ids = ItemIds(raw_ids())
    full_a = index.add(31, [0, 0])
    full_b = index.add(32, [0, 0])
    log = [Registration(1, 31, "A", full_a), Registration(2, 32, "B", full_b)]
    assert apply_registrations(model, ids, 0, log[:1]) == 1
    assert apply_registrations(model, ids, 1, log) == 2  # entry 1 again: skipped, not re-added
    assert model.n_items == 32 and ids.internal(["A", "B"]) == [31, 32]
    assert model.item_codes[32].tolist() == list(full_b)
    # the new items decode: with k = the catalogue size every item comes out
    top = model.recommend(Batch(history=torch.tensor([[1, 2]])), 32).items[0].tolist()
    assert {31, 32} <= set(top)
    with pytest.raises(RuntimeError, match="gap"):
        apply_registrations(model, ids, 2, [Registration(4, 34, "D", (1, 1, 0))])
    with pytest.raises(RuntimeError, match="do not follow"):
        apply_registrations(model, ids, 2, [Registration(3, 40, "C", (1, 1, 0))])
    assert model.n_items == 32 and len(ids) == 32  # nothing changed by the refused ones


def test_user_id_gives_the_models_user_index_when_the_training_data_knows_the_user():
    from serve.state import user_index

    rows = {"u1": 0, "u7": 6}
    assert user_index("u7", None, rows) == 6 and user_index("u7", 6, rows) == 6
    assert user_index(None, 3, rows) == 3 and user_index("new-user", 4, rows) == 4  # no index of its own
    assert user_index("new-user", None, rows) is None
    with pytest.raises(RequestError, match="user=2 disagrees with user_id='u7', whose index in the training data is 6"):
        user_index("u7", 2, rows)


def test_a_users_stored_history_comes_before_the_requests_and_is_cut_to_max_len():
    from serve.state import join_history

    assert join_history(["a", "b", "c"], [None] * 3, ["d"], None, 3, timed=False) == (["b", "c", "d"], None)
    assert join_history(["a"], [5], ["b"], [7], 5, timed=True) == (["a", "b"], [5, 7])
    with pytest.raises(RequestError, match="stored events have none"):
        join_history(["a"], [None], ["b"], [7], 5, timed=True)
    with pytest.raises(RequestError, match="before the user's last stored event"):
        join_history(["a"], [9], ["b"], [7], 5, timed=True)
    with pytest.raises(RequestError, match="give `timestamps`"):
        join_history(["a"], [9], ["b"], None, 5, timed=True)
