"""Leave-one-out split and training windows."""

import numpy as np
import pandas as pd
import pytest

from recsys.data import SyntheticConfig, generate_synthetic
from recsys.data.schema import InteractionData
from recsys.data.split import leave_one_out, pad_left, training_windows


def make_data(seqs):
    n = max(max(s) for s in seqs)
    items = pd.DataFrame({"item_id": np.arange(1, n + 1), "raw_id": [str(i) for i in range(1, n + 1)]})
    users = pd.DataFrame({"user_id": [f"u{i}" for i in range(len(seqs))], "item_ids": [np.array(s) for s in seqs]})
    return InteractionData(items, users)


def test_leave_one_out_targets_histories_and_cap():
    data = make_data([[1, 2, 3, 4, 5, 6], [7, 8], [2, 4, 6]])
    split = leave_one_out(data, max_history=3)
    assert split.dropped_users == 1  # [7, 8] has no room for train + valid + test
    assert split.test.targets.tolist() == [6, 6]
    assert split.valid.targets.tolist() == [5, 4]
    assert split.test.histories.tolist() == [[3, 4, 5], [0, 2, 4]]  # capped to 3, left-padded
    assert split.valid.histories.tolist() == [[2, 3, 4], [0, 0, 2]]
    assert [t.tolist() for t in split.train] == [[1, 2, 3, 4], [2]]


def test_a_validation_sample_is_fixed_by_its_seed_and_keeps_row_order():
    valid = leave_one_out(make_data([[1, 2, 3, i] for i in range(4, 24)]), max_history=3).valid
    a, b, c = valid.sample(7, seed=0), valid.sample(7, seed=0), valid.sample(7, seed=1)
    assert len(a) == 7 and a.user_index.tolist() == b.user_index.tolist() != c.user_index.tolist()
    assert a.user_index.tolist() == sorted(a.user_index.tolist())
    rows = np.sort(np.random.default_rng([0, 1]).choice(len(valid), 7, replace=False))  # what training drew
    assert a.user_index.tolist() == valid.user_index[rows].tolist()
    assert valid.sample(0, seed=0) is valid and valid.sample(len(valid), seed=0) is valid


def test_no_target_leaks_into_training():
    data = make_data([list(range(1, 30)), [30, 31, 32, 33]])
    split = leave_one_out(data, max_history=20)
    inputs, targets, *_ = training_windows(split.train, 5, "sliding")
    seen = set(inputs.ravel()) | set(targets.ravel())
    assert not seen & {28, 29, 32, 33}


def test_sliding_windows_cover_every_transition_once_and_last_only_the_newest():
    seq = np.arange(1, 13)  # 11 transitions
    inputs, targets, *_ = training_windows([seq], max_len=4, mode="sliding")
    pairs = {(int(a), int(b)) for row_i, row_t in zip(inputs, targets) for a, b in zip(row_i, row_t) if b}
    assert pairs == {(i, i + 1) for i in range(1, 12)}
    assert (targets > 0).sum() == 11
    inputs, targets, *_ = training_windows([seq], max_len=4, mode="last")
    assert inputs.tolist() == [[8, 9, 10, 11]] and targets.tolist() == [[9, 10, 11, 12]]


def test_prefix_windows_end_at_every_target():
    inputs, targets, rows, *_ = training_windows([np.arange(1, 6), np.array([7, 8])], max_len=3, mode="prefixes")
    assert targets[:, -1].tolist() == [5, 4, 3, 2, 8]  # one window per next item
    assert inputs.tolist() == [[2, 3, 4], [1, 2, 3], [0, 1, 2], [0, 0, 1], [0, 0, 7]]
    assert rows.tolist() == [0, 0, 0, 0, 1]  # the sequence each window was cut from


def test_training_rows_know_their_users():
    data = make_data([[1, 2, 3, 4], [5, 6], [2, 3, 4, 5, 6]])  # user 1 is too short and dropped
    split = leave_one_out(data, max_history=5)
    assert split.train_users.tolist() == [0, 2] == split.valid.user_index.tolist()
    windows = training_windows(split.train, 5, "prefixes")
    assert split.train_users[windows.rows].tolist() == [0, 2, 2]


def test_pad_left_and_bad_arguments():
    assert pad_left([np.array([1, 2]), np.array([], dtype=np.int64)], 3).tolist() == [[0, 1, 2], [0, 0, 0]]
    with pytest.raises(ValueError, match="max_history=0 is out of range"):
        leave_one_out(make_data([[1, 2, 3]]), 0)
    with pytest.raises(ValueError, match="samples='all' is not allowed"):
        training_windows([np.arange(1, 5)], 3, "all")


def test_cold_start_split_holds_items_out_of_everything_the_model_learns_from():
    from recsys.data.split import cold_start_split

    data = generate_synthetic(SyntheticConfig(n_users=300, n_items=80, n_topics=4, seed=3))
    held = np.array([5, 17, 40, 41, 79])
    cs = cold_start_split(data, 10, held)
    n_warm = data.n_items - len(held)
    assert cs.n_warm == n_warm and cs.n_items == data.n_items
    # warm items keep their order as 1..n_warm, held-out ones follow
    assert cs.new_id[held].tolist() == list(range(n_warm + 1, data.n_items + 1))
    assert sorted(cs.new_id[1:].tolist()) == list(range(1, data.n_items + 1))
    warm = cs.warm
    assert max(int(s.max(initial=0)) for s in warm.train) <= n_warm
    for eval_set in (warm.valid, warm.test):
        assert eval_set.histories.max() <= n_warm and eval_set.targets.max() <= n_warm
    assert (cs.cold_test.targets > n_warm).all() and (cs.warm_test.targets <= n_warm).all()
    assert len(cs.cold_test) + len(cs.warm_test) == len(leave_one_out(data, 10).test) > len(cs.cold_test) > 0
    # the test histories are the plain leave-one-out ones, renumbered (cold items kept)
    full = leave_one_out(data, 10).test
    row = {u: i for i, u in enumerate(full.user_index)}
    for s in (cs.cold_test, cs.warm_test):
        np.testing.assert_array_equal(s.histories, cs.new_id[full.histories[[row[u] for u in s.user_index]]])
    with pytest.raises(ValueError, match="held_out"):
        cold_start_split(data, 10, np.array([0, 3]))
