"""Timestamps through the data path: validation, split, windows, batches, evaluation, synthetic signal."""

import hashlib

import numpy as np
import pandas as pd
import pytest
import torch

from recsys.data import SyntheticConfig, generate_synthetic
from recsys.data.schema import DataFormatError, InteractionData
from recsys.data.split import leave_one_out, training_windows
from recsys.models.base import AtomicIdModel, Batch
from recsys.training.batching import epoch_batches
from recsys.training.evaluate import evaluate


def make_data(seqs, times=None):
    n = max(max(s) for s in seqs)
    items = pd.DataFrame({"item_id": np.arange(1, n + 1), "raw_id": [str(i) for i in range(1, n + 1)]})
    users = {"user_id": [f"u{i}" for i in range(len(seqs))], "item_ids": [np.array(s) for s in seqs]}
    if times is not None:
        users["timestamps"] = [np.array(t, dtype=np.int64) for t in times]
    return InteractionData(items, pd.DataFrame(users))


# item i happens at time 100 * i, so every time field can be checked against its item
SEQS = [[1, 2, 3, 4, 5, 6], [7, 8], [2, 4, 6], [9, 10, 11, 12]]
TIMED = make_data(SEQS, [[100 * i for i in s] for s in SEQS])


def test_decreasing_timestamps_name_the_user_position_and_file(tmp_path):
    make_data([[1, 2, 3]], [[5, 5, 9]]).validate()  # ties are allowed
    with pytest.raises(DataFormatError, match=r"user 'u1': timestamps decrease at position 2 \(30 then 20\)"):
        make_data([[1, 2, 3], [1, 2, 3]], [[1, 2, 3], [10, 30, 20]]).validate("x.csv")
    with pytest.raises(DataFormatError, match="user 'u0' has 2 timestamps for 3 items"):
        make_data([[1, 2, 3]], [[1, 2]]).validate()
    bad = make_data([[1, 2, 3]], [[1, 2, 3]])
    bad.save(tmp_path)
    frame = pd.read_parquet(tmp_path / "sequences.parquet")
    frame["timestamps"] = [np.array([3, 2, 1])]
    frame.to_parquet(tmp_path / "sequences.parquet")
    with pytest.raises(DataFormatError, match=f"{tmp_path}: user 'u0': timestamps decrease at position 1"):
        InteractionData.load(tmp_path)


def test_split_carries_aligned_times_and_none_without_them():
    split = leave_one_out(TIMED, max_history=3)
    for es in (split.valid, split.test):
        assert np.array_equal(es.timestamps, es.histories * 100)  # aligned, 0 at padding
        assert np.array_equal(es.target_times, es.targets * 100)
    assert [t.tolist() for t in split.train_times] == [(s * 100).tolist() for s in split.train]
    assert np.array_equal(split.valid.subset(np.array([1])).target_times, [400])
    plain = leave_one_out(make_data(SEQS), max_history=3)
    assert plain.train_times is None and plain.valid.timestamps is None and plain.test.target_times is None
    assert plain.full_histories("test").times is None and plain.training_with_validation_times() is None


@pytest.mark.parametrize("mode", ["last", "sliding", "prefixes"])
def test_windows_and_batches_carry_times_of_their_items(mode):
    split = leave_one_out(TIMED, max_history=20)
    w = training_windows(split.train, 3, mode, times=split.train_times)
    assert np.array_equal(w.times, w.inputs * 100)
    assert np.array_equal(w.target_times, w.targets[:, -1] * 100)  # the time of each window's last target
    assert training_windows(split.train, 3, mode).times is None
    batches = list(epoch_batches(w.inputs, w.targets, 2, seed=0, epoch=0, timestamps=w.times,
                                 target_times=w.target_times))
    for b in batches:
        assert b.timestamps.shape == b.history.shape and torch.equal(b.timestamps, b.history * 100)
        assert torch.equal(b.target_time, b.targets[:, -1] * 100)
    assert all(b.timestamps is None and b.target_time is None
               for b in epoch_batches(w.inputs, w.targets, 2, seed=0, epoch=0))


class Recorder(AtomicIdModel):
    """Scores items by id and remembers the batches evaluation gave it."""

    def __init__(self, n_items):
        super().__init__(n_items, 20)
        self.seen: list[Batch] = []

    def score_items(self, batch):
        self.seen.append(batch)
        return torch.arange(self.n_items + 1, dtype=torch.float).expand(len(batch.history), -1).clone()


def test_evaluate_passes_times_in_the_batch():
    split = leave_one_out(TIMED, max_history=20)
    model = Recorder(split.n_items)
    evaluate(model, split.test, ks=(1,))
    assert model.seen and all(torch.equal(b.timestamps, b.history * 100) and torch.equal(b.target_time, b.target * 100)
                              for b in model.seen)
    model = Recorder(split.n_items)
    evaluate(model, leave_one_out(make_data(SEQS), 20).test, ks=(1,))
    assert all(b.timestamps is None and b.target_time is None for b in model.seen)


def test_full_histories_are_untruncated_and_hold_only_events_before_the_target():
    data = generate_synthetic(SyntheticConfig(n_users=60, n_items=100, min_length=5, max_length=40, seed=2))
    split = leave_one_out(data, max_history=4)
    seqs, times = data.item_sequences(), data.time_sequences()
    back = {"train": 3, "valid": 2, "test": 1}
    for name, b in back.items():
        h = split.full_histories(name)
        assert len(h) == len(split.train_users)  # every kept user has >= 5 items, so a train transition
        for i, user in enumerate(h.user_index):
            n = len(seqs[user])
            assert h.items[i].tolist() == seqs[user][:n - b].tolist()  # whole history, never the last 4
            assert h.targets[i] == seqs[user][n - b] and h.target_times[i] == times[user][n - b]
            assert (h.times[i] <= h.target_times[i]).all() and len(h.times[i]) == len(h.items[i])
        items, stamps = h.padded([0, 1])
        assert items.shape[1] == max(len(h.items[0]), len(h.items[1])) > 4
        assert np.array_equal(stamps > 0, items > 0)
    assert split.full_histories("valid").targets.tolist() == split.valid.targets.tolist()
    with pytest.raises(ValueError, match="split must be 'train', 'valid' or 'test'"):
        split.full_histories("dev")


def test_train_full_histories_skip_users_without_a_training_transition():
    split = leave_one_out(make_data([[1, 2, 3], [1, 2, 3, 4, 5]]), max_history=5)
    h = split.full_histories("train")
    assert h.user_index.tolist() == [1] and h.items[0].tolist() == [1, 2] and h.targets.tolist() == [3]


def fingerprint(data: InteractionData) -> str:
    h = hashlib.sha256()
    for s, t in zip(data.sequences["item_ids"], data.sequences["timestamps"]):
        h.update(np.asarray(s, np.int64).tobytes())
        h.update(np.asarray(t, np.int64).tobytes())
    h.update("|".join(data.items["title"]).encode())
    return h.hexdigest()


def test_default_synthetic_data_is_byte_identical_to_before_the_time_signal():
    # digests of the generator's output before time_signal existed (commit c8b22ce)
    assert fingerprint(generate_synthetic(SyntheticConfig(n_users=200, n_items=100, seed=3))) == \
        "e38ca70c72ede8de8d4469f3ba471f6c08708bdab3c4a061073599d0f039950b"
    assert fingerprint(generate_synthetic(SyntheticConfig())) == \
        "ad794edb3b42d64eca34c7ec14ab69446be620ff51a3dca95a9139a5c35eef70"


def test_time_signal_short_gaps_stay_in_the_topic_and_long_gaps_switch():
    data = generate_synthetic(SyntheticConfig(n_users=300, n_items=200, time_signal=True, seed=1))
    topic = dict(zip(data.items["item_id"], (c[0] for c in data.items["categories"])))
    same_after = {"short": [], "long": []}
    for seq, times in zip(data.item_sequences(), data.time_sequences()):
        for a, b, gap in zip(seq[:-1], seq[1:], np.diff(times)):
            assert gap > 0
            same_after["short" if gap < 86_400 else "long"].append(topic[a] == topic[b])
    stay, switch = np.mean(same_after["short"]), np.mean(same_after["long"])
    assert stay > 0.95 and switch < 0.05, (stay, switch)
    assert 0.7 < len(same_after["short"]) / (len(same_after["short"]) + len(same_after["long"])) < 0.9  # stay 0.8
    # off, the same topic follows short and long gaps alike: the gaps carry nothing
    plain = generate_synthetic(SyntheticConfig(n_users=300, n_items=200, seed=1))
    topic = dict(zip(plain.items["item_id"], (c[0] for c in plain.items["categories"])))
    rates = {}
    for seq, times in zip(plain.item_sequences(), plain.time_sequences()):
        for a, b, gap in zip(seq[:-1], seq[1:], np.diff(times)):
            rates.setdefault(gap < 15 * 86_400, []).append(topic[a] == topic[b])
    assert abs(np.mean(rates[True]) - np.mean(rates[False])) < 0.05


def test_pace_signal_the_gap_before_the_last_event_predicts_the_next_move():
    """time_signal_kind=pace: the gap *before* an event (known at query time without the target's
    time) predicts whether the next item stays in the topic; the gap-kind data does not."""
    def stay_after(kind: str) -> dict[bool, float]:
        data = generate_synthetic(SyntheticConfig(n_users=400, n_items=200, time_signal=True,
                                                  time_signal_kind=kind, seed=1))
        topic = dict(zip(data.items["item_id"], (c[0] for c in data.items["categories"])))
        rates: dict[bool, list] = {}
        for seq, times in zip(data.item_sequences(), data.time_sequences()):
            gaps = np.diff(times)
            for i in range(1, len(seq) - 1):  # the gap before item i, then the move from i to i + 1
                rates.setdefault(bool(gaps[i - 1] < 86_400), []).append(topic[seq[i]] == topic[seq[i + 1]])
        return {short: float(np.mean(v)) for short, v in rates.items()}

    pace, gap = stay_after("pace"), stay_after("gap")
    assert pace[True] > 0.9 and pace[False] < 0.75, pace  # persistent modes: the last gap tells the next move
    assert abs(gap[True] - gap[False]) < 0.05, gap  # gap kind: each gap tells only its own step
    overall = generate_synthetic(SyntheticConfig(n_users=400, n_items=200, time_signal=True, time_signal_kind="pace",
                                                 seed=1))
    topic = dict(zip(overall.items["item_id"], (c[0] for c in overall.items["categories"])))
    moves = [topic[a] == topic[b] for seq in overall.item_sequences() for a, b in zip(seq[:-1], seq[1:])]
    assert 0.7 < np.mean(moves) < 0.9  # about stay_probability (0.8), as without time
    with pytest.raises(ValueError, match="synthetic.time_signal_kind='rhythm' is not allowed"):
        SyntheticConfig(time_signal_kind="rhythm")


def test_decay_signal_the_gaps_between_past_events_say_which_of_them_the_next_item_returns_to():
    """time_signal_kind=decay: after two items of different subtopics, the next item returns to the
    older one's subtopic far more often when little time separates the two (its pull has not faded);
    the items alone cannot show that gap, and the gaps themselves are drawn independently of them."""
    data = generate_synthetic(SyntheticConfig(n_users=400, n_items=200, time_signal=True, time_signal_kind="decay",
                                              seed=1))
    sub = dict(zip(data.items["item_id"], (tuple(c[:2]) for c in data.items["categories"])))
    back: dict[str, list] = {"close": [], "far": []}
    gaps = []
    for seq, times in zip(data.item_sequences(), data.time_sequences()):
        gaps.extend(np.diff(times))
        for i in range(1, len(seq) - 1):
            older, newer, nxt = sub[seq[i - 1]], sub[seq[i]], sub[seq[i + 1]]
            if older != newer:
                gap = times[i] - times[i - 1]
                if gap < 3_600 or gap > 7 * 86_400:
                    back["close" if gap < 3_600 else "far"].append(nxt == older)
    close, far = np.mean(back["close"]), np.mean(back["far"])
    assert close > 0.18 and far < 0.08, (close, far)
    assert 60 <= min(gaps) and max(gaps) <= 60 * 86_400  # log-uniform, 1 minute to 60 days
    with pytest.raises(ValueError, match=r"time_signal_kind='fade' is not allowed; choose one of \['gap', 'pace', 'decay', 'session'\]"):
        SyntheticConfig(time_signal_kind="fade")


def test_session_signal_the_gap_before_the_last_event_says_whether_a_move_away_returns():
    """time_signal_kind=session: after A then B of another topic, the next item returns to A's
    subtopic when B came after a short gap (a detour) and stays in B's when it came after a long one
    (a new session's interest). The gaps are drawn independently of the items."""
    data = generate_synthetic(SyntheticConfig(n_users=400, n_items=200, time_signal=True, time_signal_kind="session",
                                              seed=1))
    cats = dict(zip(data.items["item_id"], (tuple(c[:2]) for c in data.items["categories"])))
    moves: dict[bool, list] = {True: [], False: []}
    for seq, times in zip(data.item_sequences(), data.time_sequences()):
        gaps = np.diff(times)
        assert ((60 <= gaps) & (gaps <= 3_600) | (86_400 <= gaps) & (gaps <= 30 * 86_400)).all()
        for i in range(1, len(seq) - 1):
            a, b, nxt = cats[seq[i - 1]], cats[seq[i]], cats[seq[i + 1]]
            if a[0] != b[0]:
                moves[bool(gaps[i - 1] >= 86_400)].append((nxt == a, nxt == b))
    short, long = np.mean(moves[False], 0), np.mean(moves[True], 0)
    assert short[0] > 0.45 and short[1] < 0.35, short  # a detour: back to A
    assert long[0] < 0.1 and long[1] > 0.7, long  # a new interest: on in B
    assert 0.4 < len(moves[True]) / (len(moves[True]) + len(moves[False])) < 0.6  # half the gaps are long
