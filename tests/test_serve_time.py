"""Serving with timestamps, without Ray: request checks, Query -> Batch, and batching that keeps
timed and untimed queries apart."""

import pydantic
import pytest
import torch

from recsys.models.base import AtomicIdModel, Batch, Capabilities
from serve.schemas import RecommendRequest
from serve.state import Query, RequestError, check_times, group_key, run_queries

N_ITEMS = 10


class TimeAware(AtomicIdModel):
    """Prefers item (gap before the request, in hours) mod N, + 1; records its batches."""

    capabilities = Capabilities(reads_timestamps=True)

    def __init__(self):
        super().__init__(N_ITEMS, 8)
        self.batches: list[Batch] = []

    def score_items(self, batch):
        self.batches.append(batch)
        scores = -0.01 * torch.arange(N_ITEMS + 1.0).expand(len(batch.history), -1).clone()  # low ids first
        if batch.timestamps is not None:
            gap_hours = (batch.target_time - batch.timestamps[:, -1]) // 3600
            scores[torch.arange(len(scores)), gap_hours % N_ITEMS + 1] = 1.0
        return scores


class TimeBlind(TimeAware):
    capabilities = Capabilities()


def test_time_checks_say_what_is_wrong():
    assert check_times(2, [5, 5], 9) == 9  # ties allowed
    assert check_times(2, None, None, now=123.7) == 123  # time defaults to now
    assert check_times(1, [100], None, now=200) == 200
    with pytest.raises(RequestError, match="timestamps holds 1 values for 2 history items") as err:
        check_times(2, [1], 5)
    assert err.value.status == 422
    with pytest.raises(RequestError, match=r"timestamps decrease at position 2 \(30 then 20\)"):
        check_times(3, [10, 30, 20], 40)
    with pytest.raises(RequestError, match="time=25 is before the last history timestamp 30"):
        check_times(2, [10, 30], 25)


def test_request_schema_takes_integer_timestamps_and_time():
    body = RecommendRequest(history=["a", "b"], timestamps=[1, 2], time=3)
    assert body.model_dump()["timestamps"] == [1, 2] and body.time == 3
    assert RecommendRequest(history=["a"]).timestamps is None
    with pytest.raises(pydantic.ValidationError):
        RecommendRequest(history=["a"], timestamps=["yesterday"])


def test_times_reach_the_batch_left_padded_and_timed_queries_never_share_a_call_with_untimed():
    model = TimeAware()
    hour = 3600
    queries = [Query([1, 2, 3], 1, False, None, [0, hour, 2 * hour], 5 * hour),  # gap 3 h -> item 4
               Query([4], 1, False, None, [10 * hour], 17 * hour),  # gap 7 h -> item 8
               Query([5, 6], 1, False, None)]  # untimed: the lowest id wins
    assert group_key(queries[0], model) == group_key(queries[1], model) != group_key(queries[2], model)
    answers = run_queries(model, queries)
    assert [items for items, _ in answers] == [[4], [8], [1]]
    timed = next(b for b in model.batches if b.timestamps is not None)
    assert timed.timestamps.tolist() == [[0, hour, 2 * hour], [0, 0, 10 * hour]]  # 0 at padding
    assert timed.target_time.tolist() == [5 * hour, 17 * hour]
    assert all(b.target_time is None for b in model.batches if b.timestamps is None)
    for q, (items, scores) in zip(queries, answers):  # batched == asked alone
        assert run_queries(model, [q]) == [(items, scores)]


def test_a_time_blind_model_gets_no_times():
    model = TimeBlind()
    run_queries(model, [Query([1, 2], 1, False, None, [1, 2], 3)])
    assert model.batches[-1].timestamps is None and model.batches[-1].target_time is None


def test_a_model_that_requires_times_or_users_says_so_in_a_422():
    from recsys.experiment import load_experiment
    from recsys.models import build_model
    from serve.state import check_required_inputs

    exp = load_experiment(None, ["model.name=hstu", "model.d_model=8", "model.time_bias=on", "model.loss=ce"])
    hstu = build_model("hstu", exp.model, n_items=20, max_len=5)
    with pytest.raises(RequestError, match="reads event times .* give `timestamps`") as err:
        check_required_inputs(hstu, None, None)
    assert err.value.status == 422
    check_required_inputs(hstu, None, [1, 2])
    auto = build_model("hstu", load_experiment(None, ["model.name=hstu", "model.d_model=8", "model.loss=ce"]).model,
                       n_items=20, max_len=5)
    check_required_inputs(auto, None, None)  # time_bias=auto runs without times


@pytest.mark.parametrize("query_time", ["next_event", "last_event"])
def test_the_request_time_is_hstus_query_time_only_with_next_event(query_time):
    from recsys.experiment import load_experiment
    from recsys.models import build_model

    torch.manual_seed(0)
    exp = load_experiment(None, ["model.name=hstu", "model.d_model=8", "model.time_bias=on", "model.loss=ce",
                                 f"model.query_time={query_time}"])
    hstu = build_model("hstu", exp.model, n_items=20, max_len=5).eval()
    day = 86_400
    asked = [run_queries(hstu, [Query([3, 8, 1], 20, False, None, [0, day, 2 * day], time)])[0][1]
             for time in (2 * day + 60, 90 * day)]
    if query_time == "next_event":
        assert asked[0] != pytest.approx(asked[1], abs=1e-6)
    else:  # the newest history time is the query time: the request's time changes nothing
        assert asked[0] == asked[1]
