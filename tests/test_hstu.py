"""What is particular to HSTU: the layer against the paper's formulas, the relative time bias and
its modes, padding, the ANN contract and bad input. The shared battery (tests/test_model_battery.py)
covers causality, save/load, seeds, overfitting and recommend."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from recsys.models import HSTU, Batch, HSTUConfig, build_model, model_config_from_dict
from recsys.models.hstu import HSTUBlock
from recsys.models.layers import RelativeBias, causal_mask, time_bucket
from recsys.training.batching import trim_padding

N_ITEMS, MAX_LEN = 30, 8


def model(seed: int = 0, **config) -> HSTU:
    torch.manual_seed(seed)
    cfg = HSTUConfig(**{"d_model": 16, "n_heads": 2, "n_negatives": 8, "temperature": 0.1, **config})
    return build_model("hstu", cfg, n_items=N_ITEMS, max_len=MAX_LEN).eval()


def batch(seed: int = 0, rows: int = 4, pad: int = 2, timed: bool = True) -> Batch:
    """Rows 0 and 1 start with ``pad`` padding columns; times increase (0 at padding)."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, N_ITEMS + 1, (rows, MAX_LEN + 1), generator=g)
    seq[:2, :pad] = 0
    times = torch.randint(1, 10 ** 6, (rows, MAX_LEN + 1), generator=g).cumsum(1) * (seq > 0)
    targets = seq[:, 1:].clone()
    targets[seq[:, :-1] == 0] = 0
    return Batch(history=seq[:, :-1], targets=targets, target=seq[:, -1],
                 timestamps=times[:, :-1] if timed else None, target_time=times[:, -1] if timed else None)


def test_the_layer_matches_the_formulas():
    """One block against a loop over (query i, key j) written from the paper and the official code."""
    torch.manual_seed(0)
    B, T, D, H, hd, L = 2, 4, 6, 2, 3, 5
    block = HSTUBlock(D, H, hd, dropout=0.0, max_len=L, time_buckets=128).eval()
    for p in block.rab.parameters():
        torch.nn.init.normal_(p, std=0.5)  # a bias large enough to matter
    x = torch.randn(B, T, D)
    valid = torch.tensor([[False, True, True, True], [True] * 4])
    ts = torch.tensor([[0, 100, 5000, 90000], [1, 2, 30, 10 ** 6]])
    query = torch.cat([ts[:, 1:], torch.tensor([[10 ** 7], [2 * 10 ** 6]])], 1)
    out = block(x, causal_mask(valid), float(L), block.rab.buckets(ts, query))

    expected = torch.empty_like(x)
    W, Wo, bo = block.uvqk.weight, block.out.weight, block.out.bias
    for b in range(B):
        for i in range(T):
            def proj(t):  # SiLU(LN(x_t) W_uvqk), split u, v, q, k
                xt = x[b, t]
                xn = (xt - xt.mean()) / torch.sqrt(xt.var(unbiased=False) + 1e-6)
                return F.silu(W @ xn).split(H * hd)
            u_i, _, q_i, _ = proj(i)
            av = torch.zeros(H * hd)
            for j in range(i + 1):
                if not valid[b, j] and j != i:
                    continue
                _, v_j, _, k_j = proj(j)
                gap = int(query[b, i] - ts[b, j])
                bucket = min(max(math.floor(math.log(max(abs(gap), 1)) / 0.301), 0), 128)
                rab = block.rab.position[j - i + L - 1] + block.rab.time[bucket]
                for h in range(H):
                    s = slice(h * hd, (h + 1) * hd)
                    av[s] += F.silu(q_i[s] @ k_j[s] + rab) / L * v_j[s]
            normed = (av - av.mean()) / torch.sqrt(av.var(unbiased=False) + 1e-6)
            expected[b, i] = x[b, i] + Wo @ (u_i * normed) + bo
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_the_time_bias_changes_the_output_exactly_when_timestamps_differ():
    m, b = model(time_bias="on"), batch(pad=0)
    out = m.encode(b)
    shifted = Batch(history=b.history, timestamps=b.timestamps + 12345, target_time=b.target_time + 12345)
    torch.testing.assert_close(m.encode(shifted), out)  # the same gaps: the same output
    j = 4
    moved = b.timestamps.clone()
    moved[:, j:] += 10 ** 8  # every gap across j changes bucket
    changed = m.encode(Batch(history=b.history, timestamps=moved, target_time=b.target_time + 10 ** 8))
    # position i reads times <= i + 1 (the next event's time is its query time): j - 1 on move
    torch.testing.assert_close(changed[:, :j - 1], out[:, :j - 1])
    assert not torch.allclose(changed[:, j - 1:], out[:, j - 1:])
    later = m.encode(Batch(history=b.history, timestamps=b.timestamps, target_time=b.target_time + 10 ** 8))
    torch.testing.assert_close(later[:, :-1], out[:, :-1])  # the query time reaches only the last position
    assert not torch.allclose(later[:, -1], out[:, -1])


def test_time_bias_off_never_reads_times():
    m, b = model(time_bias="off"), batch()
    assert m.blocks[0].rab.time is None
    untimed = Batch(history=b.history)
    scrambled = Batch(history=b.history, timestamps=b.timestamps.flip(1) * 7, target_time=b.target_time)
    torch.testing.assert_close(m.encode(b), m.encode(untimed))
    torch.testing.assert_close(m.encode(scrambled), m.encode(untimed))


def test_time_bias_on_without_timestamps_is_an_error():
    m = model(time_bias="on")
    with pytest.raises(ValueError, match="model.time_bias=on, but the batch carries no timestamps"):
        m.encode(batch(timed=False))
    b = batch()
    with pytest.raises(ValueError, match="Batch.target_time"):
        m.encode(Batch(history=b.history, timestamps=b.timestamps))


def test_time_bias_auto_without_timestamps_warns_once_and_runs_position_only():
    auto = model(time_bias="auto")
    b = batch(timed=False)
    with pytest.warns(RuntimeWarning, match="position-only") as record:
        out = auto.encode(b)
        auto.encode(b)
        auto.loss(b).total.backward()
    assert len([w for w in record if "position-only" in str(w.message)]) == 1
    assert all(p.grad is not None for p in auto.parameters())  # DDP needs every parameter to get one
    off = model(time_bias="off")
    off.load_state_dict({k: v for k, v in auto.state_dict().items() if not k.endswith("rab.time")})
    torch.testing.assert_close(off.encode(b), out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto.encode(batch())  # with timestamps: silent, and time-aware
    assert not torch.allclose(auto.encode(batch()), out)


@pytest.mark.parametrize("time_bias", ["on", "off"])
def test_trimming_left_padding_changes_nothing(time_bias):
    m, b = model(time_bias=time_bias), batch(pad=3)
    for row in range(len(b.history)):
        b.history[row, :3] = 0  # every row starts with 3 padding columns
    b.timestamps[:, :3] = 0
    history, times = trim_padding(b.history, b.timestamps)
    assert history.shape[1] == MAX_LEN - 3
    full = m.encode(b)
    trimmed = m.encode(Batch(history=history, timestamps=times, target_time=b.target_time))
    torch.testing.assert_close(trimmed, full[:, 3:], atol=1e-6, rtol=1e-5)


def test_scores_are_user_vectors_times_item_vectors():
    """The ANN contract: score_items == user_embedding @ item_embeddings().T, on unit vectors."""
    m, b = model(time_bias="on"), batch()
    user, items = m.user_embedding(b), m.item_embeddings()
    assert items.shape == (N_ITEMS, 16)
    torch.testing.assert_close(user.norm(dim=-1), torch.ones(len(user)))
    torch.testing.assert_close(items.norm(dim=-1), torch.ones(N_ITEMS))
    torch.testing.assert_close(m.score_items(b)[:, 1:], user @ items.T)


def test_the_time_buckets_are_computed_once_per_forward(monkeypatch):
    calls = []
    original = RelativeBias.buckets
    monkeypatch.setattr(RelativeBias, "buckets", lambda self, *a: calls.append(1) or original(self, *a))
    model(time_bias="on", n_layers=3).encode(batch())
    assert len(calls) == 1


@pytest.mark.parametrize("loss", ["sampled_softmax", "ce"])
def test_both_losses_train(loss):
    m, b = model(loss=loss, time_bias="on", dropout=0.0, emb_dropout=0.0), batch()
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = m.loss(b).total.item()
    for _ in range(60):
        out = m.loss(b)
        opt.zero_grad()
        out.total.backward()
        opt.step()
    assert set(out.parts) == {loss}
    assert out.total.item() < 0.5 * first


def test_bad_input_is_refused_with_the_key_named():
    with pytest.raises(ValueError, match="model.temperature=0"):
        HSTUConfig(temperature=0)
    with pytest.raises(ValueError, match=r"model.temperature=-0.5 is out of range; allowed: > 0"):
        HSTUConfig(temperature=-0.5)
    with pytest.raises(ValueError, match="model.time_bias='sometimes' is not allowed"):
        HSTUConfig(time_bias="sometimes")
    with pytest.raises(ValueError, match="model.loss"):
        HSTUConfig(loss="bce")
    with pytest.raises(ValueError, match="model.d_model=50 must be divisible by model.n_heads=3"):
        HSTUConfig(n_heads=3)
    with pytest.raises(ValueError, match=r"model.n_negatives=30 must be smaller than the catalogue size \(30 items\)"):
        model(n_negatives=30)
    model(loss="ce", n_negatives=128)  # ce samples nothing
    # the config loader reads a bare on/off as words (tests/test_config.py); a boolean is refused
    with pytest.raises(ValueError, match="model.time_bias must be a string"):
        model_config_from_dict({"name": "hstu", "time_bias": False})


def test_time_bucket_is_the_official_formula():
    gaps = torch.tensor([0, 1, 2, 3, 60, 3600, 86400, -86400, 10 ** 12])
    expected = [min(max(math.floor(math.log(max(abs(int(g)), 1)) / 0.301), 0), 128) for g in gaps]
    assert time_bucket(gaps).tolist() == expected


def test_the_trainer_feeds_times_and_query_times_to_hstu(monkeypatch):
    """configs/synthetic-time-hstu.yaml in small: time_bias=on errors unless every training and
    validation batch carries timestamps and target_time; one epoch trains and evaluates."""
    from recsys.data.readers import load_dataset
    from recsys.data.split import leave_one_out
    from recsys.experiment import load_experiment
    from recsys.training.session import build_trainer

    exp = load_experiment("configs/synthetic-time-hstu.yaml", [
        "data.synthetic.n_users=60", "data.synthetic.n_items=40", "data.synthetic.n_topics=4",
        "model.d_model=16", "model.n_negatives=8", "trainer.optim.batch_size=32"])
    split = leave_one_out(load_dataset(exp.data), exp.data.max_history)
    trainer = build_trainer(exp, split)
    seen = []
    original = HSTU.time_buckets
    monkeypatch.setattr(HSTU, "time_buckets", lambda self, b: seen.append(b) or original(self, b))
    metrics = trainer.train_epoch(0)
    assert math.isfinite(metrics["train_sampled_softmax"])
    assert 0 <= trainer.validate()["ndcg@10"] <= 1
    assert seen and all(b.timestamps is not None and b.target_time is not None for b in seen)
    # the query time at the last position is the target's: never before the history's newest event
    assert all((b.target_time >= b.timestamps[:, -1]).all() for b in seen)


def test_query_time_last_event_never_reads_the_target_time():
    """last_event: position i's query time is its own event's, so the target's time (and any later
    time) never reaches it; next_event reads the next event's time."""
    m, b = model(time_bias="on", query_time="last_event"), batch(pad=0)
    out = m.encode(b)
    for target_time in (b.target_time + 10 ** 9, b.target_time * 0, None):
        torch.testing.assert_close(m.encode(Batch(history=b.history, timestamps=b.timestamps,
                                                  target_time=target_time)), out)
    j = 4
    moved = b.timestamps.clone()
    moved[:, j:] += 10 ** 8
    changed = m.encode(Batch(history=b.history, timestamps=moved))
    torch.testing.assert_close(changed[:, :j], out[:, :j])  # position j - 1 no longer reads ts[j]
    assert not torch.allclose(changed[:, j:], out[:, j:])
    # the same weights with the official query time: a different output, and target_time required
    nxt = model(time_bias="on", query_time="next_event")
    nxt.load_state_dict(m.state_dict())
    assert not torch.allclose(nxt.encode(b), out)
    with pytest.raises(ValueError, match="model.query_time=last_event does not read it"):
        nxt.encode(Batch(history=b.history, timestamps=b.timestamps))


def test_position_bias_off_drops_the_position_term_and_with_time_off_there_is_no_rab():
    plain = model(time_bias="off", position_bias=False)
    assert all(blk.rab.position is None and blk.rab.time is None for blk in plain.blocks)
    assert not [n for n, _ in plain.named_parameters() if ".rab." in n]
    zeroed = model(time_bias="off")  # the same weights, its position terms set to 0
    zeroed.load_state_dict(plain.state_dict(), strict=False)
    for blk in zeroed.blocks:
        torch.nn.init.zeros_(blk.rab.position)
    b = batch()
    torch.testing.assert_close(plain.encode(b), zeroed.encode(b))
    timed = model(time_bias="on", position_bias=False)  # rab^t alone: the time term still counts
    assert timed.blocks[0].rab.time is not None
    torch.testing.assert_close(timed.encode(Batch(history=b.history, timestamps=b.timestamps + 5,
                                                  target_time=b.target_time + 5)), timed.encode(b))
    assert not torch.allclose(timed.encode(Batch(history=b.history, timestamps=b.timestamps * 50,
                                                 target_time=b.target_time * 50)), timed.encode(b))


def test_query_time_and_position_bias_are_validated_and_saved_with_the_checkpoint(tmp_path):
    from recsys.training.checkpoint import load_model, save_checkpoint

    with pytest.raises(ValueError, match=r"model.query_time='target' is not allowed; choose one of"):
        HSTUConfig(query_time="target")
    with pytest.raises(ValueError, match="model.position_bias must be true or false, got 'no'"):
        HSTUConfig(position_bias="no")
    with pytest.raises(ValueError, match="model.position_bias must be true or false"):
        model_config_from_dict({"name": "hstu", "position_bias": "off"})
    m = model(time_bias="on", query_time="last_event", position_bias=False)
    save_checkpoint(tmp_path / "ckpt", m, "hstu")
    loaded = load_model(tmp_path / "ckpt")
    assert (loaded.config.query_time, loaded.config.position_bias) == ("last_event", False)
    torch.testing.assert_close(loaded.eval().encode(batch()), m.encode(batch()))


def test_movielens_timestamps_reach_hstu(tmp_path, monkeypatch):
    """A tiny ML-1M-format directory (ratings.dat out of time order, movies.dat): the times HSTU
    reads in training and evaluation are the files' own, in time order, and the query time of the
    last position is the target's."""
    from recsys.data.readers import load_dataset
    from recsys.data.split import leave_one_out
    from recsys.experiment import load_experiment
    from recsys.training.evaluate import evaluate
    from recsys.training.session import build_trainer

    rng = torch.Generator().manual_seed(0)
    lines, when = [], {}
    for user in range(1, 7):
        movies = (torch.randperm(8, generator=rng)[:6] + 1).tolist()
        for step, movie in enumerate(movies):
            when[user, movie * 10] = 978_300_000 + user * 10 ** 6 + step * 3_600 * (step + 1)
            lines.append(f"{user}::{movie * 10}::{1 + step % 5}::{when[user, movie * 10]}")
    order = torch.randperm(len(lines), generator=rng).tolist()  # the file is not in time order
    (tmp_path / "ratings.dat").write_text("\n".join(lines[i] for i in order) + "\n", encoding="latin-1")
    (tmp_path / "movies.dat").write_text("".join(f"{m * 10}::Movie {m} (2000)::Drama|Comedy\n" for m in range(1, 9)),
                                         encoding="latin-1")
    exp = load_experiment(None, ["model.name=hstu", "model.d_model=8", "model.n_layers=1", "model.time_bias=on",
                                 "model.loss=ce", "data.format=movielens", f"data.path={tmp_path}",
                                 "data.min_interactions=1", "data.max_history=5", "trainer.optim.batch_size=4",
                                 "trainer.data.samples=sliding"])
    data = load_dataset(exp.data)
    raw = dict(zip(data.items["item_id"], data.items["raw_id"].astype(int)))
    user_of = data.sequences["user_id"].astype(int).tolist()
    split = leave_one_out(data, exp.data.max_history)
    trainer = build_trainer(exp, split)
    seen = []
    original = HSTU.time_buckets
    monkeypatch.setattr(HSTU, "time_buckets", lambda self, b: seen.append(b) or original(self, b))
    trainer.train_epoch(0)
    evaluate(trainer.model, split.test, ks=(1,))
    assert len(seen) > 2
    for b in seen:
        for row in range(len(b.history)):
            items, times = b.history[row], b.timestamps[row]
            user = (int(times[-1]) - 978_300_000) // 10 ** 6  # each user's times lie in their own range
            assert user in user_of
            assert [when[user, raw[int(i)]] for i in items[items > 0]] == times[items > 0].tolist()
            assert (times[items > 0].diff() > 0).all()  # sorted by time, though the file was not
            nxt = b.targets[row, -1] if b.targets is not None else b.target[row]
            assert int(b.target_time[row]) == when[user, raw[int(nxt)]]


def test_time_bias_on_with_data_without_timestamps_fails_before_training():
    """The trainer refuses at once, naming the setting, rather than at the first batch (or, under
    Ray Train, in a worker)."""
    from recsys.data import SyntheticConfig, generate_synthetic
    from recsys.data.split import leave_one_out
    from recsys.experiment import load_experiment
    from recsys.training.session import build_trainer

    data = generate_synthetic(SyntheticConfig(n_users=30, n_items=40, n_topics=4))
    data.sequences = data.sequences.drop(columns="timestamps")  # as Beauty's S3-Rec files
    split = leave_one_out(data, 8)
    settings = ["model.name=hstu", "model.d_model=8", "model.loss=ce", "trainer.resources.use_ray=false"]
    with pytest.raises(ValueError, match=r"require event times \(e.g. HSTU's model.time_bias=on\), but the data has no"):
        build_trainer(load_experiment(None, [*settings, "model.time_bias=on"]), split)
    build_trainer(load_experiment(None, [*settings, "model.time_bias=auto"]), split)  # position-only, as documented


def test_a_layer_materialises_only_the_attention_tensors_its_backward_needs():
    """One HSTU layer's forward creates three (.., T, T) tensors: the time bias gathered from its
    buckets (the position term is added into it), q kᵀ (the bias is added in place) and SiLU of
    it (masked in place); 1/n scales the output. Fewer would need a fused kernel: autograd keeps
    SiLU's input and the weights that multiply v."""
    from benchmarks.hstu_throughput import square_tensors_made

    B, T = 3, 7
    block = HSTUBlock(8, 2, 4, dropout=0.1, max_len=T, time_buckets=128).train()
    ts = torch.arange(1, T + 1).repeat(B, 1) * 1000
    buckets = block.rab.buckets(ts, ts + 10)
    x, mask = torch.randn(B, T, 8), causal_mask(torch.ones(B, T, dtype=torch.bool))
    assert square_tensors_made(lambda: block(x, mask, float(T), buckets), T) == ["index", "bmm", "silu"]


def test_separate_output_embeddings_score_and_train_with_their_own_table(tmp_path):
    from recsys.training.checkpoint import load_model, save_checkpoint

    shared, separate = model(time_bias="on"), model(time_bias="on", output_embeddings="separate")
    assert shared.out_emb is None and shared.output_table is shared.item_emb
    b = batch()
    user, items = separate.user_embedding(b), separate.item_embeddings()
    torch.testing.assert_close(items, F.normalize(separate.out_emb.weight[1:], dim=-1))
    torch.testing.assert_close(separate.score_items(b)[:, 1:], user @ items.T)  # the ANN contract holds
    separate.train()
    separate.loss(b).total.backward()
    assert separate.out_emb.weight.grad.abs().sum() > 0 and separate.item_emb.weight.grad.abs().sum() > 0
    save_checkpoint(tmp_path / "ckpt", separate.eval(), "hstu")
    loaded = load_model(tmp_path / "ckpt").eval()
    assert loaded.config.output_embeddings == "separate"
    torch.testing.assert_close(loaded.score_items(b), separate.score_items(b))
    with pytest.raises(ValueError, match=r"model.output_embeddings='tied' is not allowed"):
        HSTUConfig(output_embeddings="tied")
