"""The training loop without Ray: learning, selection on validation, checkpoints, resume."""

import json
import warnings

import numpy as np
import pytest
import torch

from recsys.data import SyntheticConfig, generate_synthetic
from recsys.data.split import leave_one_out
from recsys.experiment import load_experiment
from recsys.training.checkpoint import load_model, load_train_state
from recsys.training.evaluate import evaluate
from recsys.training.batching import epoch_batches
from recsys.training.session import build_trainer, train_in_process


@pytest.fixture(scope="module")
def split():
    data = generate_synthetic(SyntheticConfig(n_users=400, n_items=100, n_topics=5, seed=1))
    return leave_one_out(data, 10)


def exp_for(*overrides):
    return load_experiment(None, ["trainer.resources.use_ray=false", "model.d_model=32", "model.n_layers=1",
                                  "trainer.optim.batch_size=64", "data.max_history=10", *overrides])


def test_training_learns_the_synthetic_structure(split):
    exp = exp_for("trainer.optim.epochs=15", "trainer.selection.patience=0", "trainer.optim.lr=0.005")
    trainer = build_trainer(exp, split)
    before = trainer.validate()
    state = trainer.fit(lambda metrics, improved, t: None)
    after = trainer.validate()
    assert state.epoch == 15
    assert state.history[-1]["train_loss"] < state.history[0]["train_loss"]
    # random ranking of 100 items gives recall@10 ~ 0.1; the synthetic structure is learnable
    assert after["recall@10"] > max(0.2, 1.5 * before["recall@10"])


def test_epoch_batches_are_equal_per_rank_and_cover_disjoint_rows():
    inputs = np.arange(103).reshape(103, 1)
    shards = [list(epoch_batches(inputs, inputs, 10, seed=0, epoch=0, rank=r, world_size=2)) for r in (0, 1)]
    rows = [torch.cat([b.history for b in s]).ravel().tolist() for s in shards]
    assert len(shards[0]) == len(shards[1]) and len(rows[0]) == len(rows[1]) == 51
    assert not set(rows[0]) & set(rows[1])
    again = list(epoch_batches(inputs, inputs, 10, seed=0, epoch=0))
    other = list(epoch_batches(inputs, inputs, 10, seed=0, epoch=1))
    assert torch.equal(again[0].history, list(epoch_batches(inputs, inputs, 10, 0, 0))[0].history)
    assert not torch.equal(again[0].history, other[0].history)


def test_batches_carry_the_user_of_every_row(split):
    inputs = np.arange(1, 104).reshape(103, 1)
    users = inputs[:, 0] * 10
    for batch in epoch_batches(inputs, inputs, 10, seed=0, epoch=0, bucket=3, users=users):
        assert torch.equal(batch.users, batch.history[:, -1] * 10)
    trainer = build_trainer(exp_for("trainer.data.samples=prefixes"), split)
    assert len(trainer.users) == len(trainer.inputs) and set(trainer.users) <= set(split.train_users)


def test_bucketed_batches_cover_every_row_once_with_little_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 21, 1000)
    inputs = np.zeros((1000, 20), dtype=np.int64)
    for row, n in enumerate(lengths):
        inputs[row, 20 - n:] = row + 1  # left-padded; the value names the row
    plain = list(epoch_batches(inputs, inputs, 32, seed=0, epoch=0))
    bucketed = list(epoch_batches(inputs, inputs, 32, seed=0, epoch=0, bucket=8))
    rows = [int(b.history[i].max()) - 1 for b in bucketed for i in range(len(b.history))]
    assert sorted(rows) == list(range(1000))  # every row exactly once
    for batch in bucketed:  # trimmed to the longest history in the batch
        assert batch.history.shape[1] == int((batch.history > 0).sum(1).max())
    width = lambda batches: sum(b.history.numel() for b in batches)  # noqa: E731
    assert width(bucketed) < 0.7 * width(plain)
    first = [int(lengths[int(b.history[0].max()) - 1]) for b in bucketed]
    assert first != sorted(first) and first != sorted(first, reverse=True)  # batch order stays random


def test_validation_on_a_fixed_sample_of_users(split):
    exp = exp_for("trainer.selection.valid_users=50")
    a, b = build_trainer(exp, split), build_trainer(exp, split)
    assert len(a.valid_set) == 50 < len(split.valid)
    np.testing.assert_array_equal(a.valid_set.user_index, b.valid_set.user_index)  # the same users every time
    assert len(build_trainer(exp_for(), split).valid_set) == len(split.valid)
    # the sample follows trainer.data.seed unless trainer.selection.valid_seed fixes it, so seeds can share one
    other_seed = build_trainer(exp_for("trainer.selection.valid_users=50", "trainer.data.seed=1"), split).valid_set.user_index
    shared = build_trainer(exp_for("trainer.selection.valid_users=50", "trainer.data.seed=1", "trainer.selection.valid_seed=0"), split)
    assert set(other_seed) != set(a.valid_set.user_index)
    np.testing.assert_array_equal(shared.valid_set.user_index, a.valid_set.user_index)
    with pytest.raises(ValueError, match="trainer.selection.valid_seed"):
        exp_for("trainer.selection.valid_seed=-1")
    exp = exp_for("trainer.selection.valid_users=50", "trainer.optim.epochs=1")
    state = build_trainer(exp, split).fit(lambda metrics, improved, t: None)
    assert state.history[0]["validated_users"] == 50  # every epoch says what selection saw


def test_inverse_sqrt_schedule_warms_up_then_decays(split):
    exp = exp_for("trainer.optim.schedule=inverse_sqrt", "trainer.optim.warmup_steps=100", "trainer.optim.lr=0.01")
    scheduler = build_trainer(exp, split).scheduler
    factor = scheduler.lr_lambdas[0]
    assert factor(49) == pytest.approx(0.5) and factor(99) == pytest.approx(1.0)
    assert factor(399) == pytest.approx(0.5) and factor(9999) == pytest.approx(0.1)


def test_early_stopping_selects_best_and_checkpoints_hold_config(split, tmp_path):
    # lr=0 cannot improve after epoch 1, so patience 2 stops at epoch 3
    exp = exp_for("trainer.optim.epochs=20", "trainer.selection.patience=2", "trainer.optim.lr=1e-9")
    state = train_in_process(exp, split, tmp_path)
    assert state.epoch == 3 and state.best_epoch == 1
    lines = [json.loads(x) for x in (tmp_path / "epochs.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3]
    meta = json.loads((tmp_path / "checkpoints" / "best" / "model.json").read_text())
    assert meta["name"] == "sasrec" and meta["config"]["d_model"] == 32 and meta["n_items"] == 100
    model = load_model(tmp_path / "checkpoints" / "best")
    assert evaluate(model, split.valid)["recall@10"] == pytest.approx(lines[0]["valid_recall@10"])


def test_resume_continues_to_the_same_epoch_count(split, tmp_path):
    train_in_process(exp_for("trainer.optim.epochs=2", "trainer.selection.patience=0"), split, tmp_path)
    state = train_in_process(exp_for("trainer.optim.epochs=4", "trainer.selection.patience=0"), split, tmp_path, resume=True)
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "epochs.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4] and state.epoch == 4
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train_in_process(exp_for(), split, tmp_path / "empty", resume=True)


def test_bf16_autocast_trains(split, forced_bf16):
    with forced_bf16():
        trainer = build_trainer(exp_for("trainer.data.precision=bf16", "trainer.optim.epochs=1"), split)
    loss = trainer.train_epoch(0)["train_loss"]
    assert np.isfinite(loss)


def test_bf16_on_a_cpu_without_native_bf16_warns_and_names_the_fix(split, monkeypatch):
    from recsys import hardware
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="trainer.data.precision=fp32"):
        build_trainer(exp_for("trainer.data.precision=bf16", "trainer.optim.epochs=1"), split)
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_trainer(exp_for("trainer.data.precision=bf16", "trainer.optim.epochs=1"), split)
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_trainer(exp_for("trainer.data.precision=fp32", "trainer.optim.epochs=1"), split)  # fp32: nothing to say


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32"), (None, "fp32")])
def test_auto_precision_autocasts_to_bf16_only_where_native_and_the_run_records_what_it_used(
        split, monkeypatch, tmp_path, native, expected):
    from recsys import hardware
    from recsys.training import loop
    from recsys.training.config import with_resolved_precision

    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: native)
    exp = exp_for("trainer.optim.epochs=1")
    assert exp.trainer.data.precision == "auto"  # the default
    assert with_resolved_precision(exp.trainer).data.precision == expected
    assert with_resolved_precision(exp_for("trainer.data.precision=fp32").trainer).data.precision == "fp32"
    seen = []
    real = torch.autocast

    def autocast(device_type, dtype=None, enabled=True, **kwargs):
        seen.append((dtype, enabled))
        return real(device_type, dtype=dtype, enabled=enabled, **kwargs)

    monkeypatch.setattr(loop.torch, "autocast", autocast)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto never picks an emulated bf16, so never warns
        train_in_process(exp, split, tmp_path)
    assert seen and set(seen) == {(torch.bfloat16, expected == "bf16")}


def test_a_train_run_records_auto_precision_resolved_and_resumes_with_it(monkeypatch, tiny_overrides, tmp_path):
    from pipelines.cli import main
    from recsys import hardware
    from recsys.runs import read_json

    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: True)
    assert main(["train", *tiny_overrides, "trainer.resources.use_ray=false", "trainer.optim.epochs=1"]) == 0
    (run_dir,) = (tmp_path / "runs" / "train").iterdir()
    assert read_json(run_dir / "config.json")["trainer"]["data"]["precision"] == "bf16"
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: False)  # resumed elsewhere: what it trained in,
    with pytest.warns(RuntimeWarning, match="emulated"):  # saying that bf16 is emulated there
        assert main(["train", "--resume", str(run_dir), "trainer.optim.epochs=2"]) == 0
    assert read_json(run_dir / "config.json")["trainer"]["data"]["precision"] == "bf16"


def test_weight_average_follows_the_decay_and_swaps_back():
    from recsys.training.loop import WeightAverage

    layer = torch.nn.Linear(3, 2)
    start = layer.weight.detach().clone()
    average = WeightAverage(layer, decay=0.5)
    expected = start.clone()
    for step in range(1, 6):
        with torch.no_grad():
            layer.weight.add_(1.0)
        average.update()
        weight = 1 - min(0.5, step / (9 + step))  # the decay warms up
        expected = expected + weight * (layer.weight.detach() - expected)
    torch.testing.assert_close(average.average["weight"], expected)
    trained = layer.weight.detach().clone()
    with average.swapped_in():
        torch.testing.assert_close(layer.weight.detach(), expected)
        assert not torch.equal(layer.weight.detach(), trained)
        torch.testing.assert_close(average.state_dict()["training_weights"]["weight"], trained)
        with pytest.raises(RuntimeError, match="swapped in"):
            average.update()
    assert torch.equal(layer.weight.detach(), trained)  # training weights back, bit for bit


def test_ema_validates_and_saves_the_average_and_resumes_from_training_weights(split, tmp_path):
    from safetensors.torch import load_file

    from recsys.training.checkpoint import load_train_state

    exp = exp_for("trainer.optim.epochs=2", "trainer.selection.patience=0", "trainer.optim.ema=0.9", "trainer.optim.lr=0.005")
    state = train_in_process(exp, split, tmp_path)
    last = tmp_path / "checkpoints" / "last"
    saved = load_file(str(last / "model.safetensors"))
    train_state = load_train_state(last)["weight_average"]
    name = "item_emb.weight" if "item_emb.weight" in saved else next(iter(train_state["average"]))
    torch.testing.assert_close(saved[name], train_state["average"][name])  # the file holds the average
    assert not torch.allclose(saved[name], train_state["training_weights"][name])
    model = load_model(last)
    assert evaluate(model, split.valid)["recall@10"] == pytest.approx(state.history[-1]["valid_recall@10"])
    # resuming continues from the training weights, not from the average
    trainer = build_trainer(exp, split)
    from recsys.training.session import restore
    restore(trainer, last)
    params = dict(trainer.model.named_parameters())
    torch.testing.assert_close(params[name].detach(), train_state["training_weights"][name])
    torch.testing.assert_close(trainer.average.average[name], train_state["average"][name])
    with pytest.raises(ValueError, match="trainer.optim.ema=0.0.*with a weight average"):
        restore(build_trainer(exp_for("trainer.optim.epochs=2"), split), last)
    with pytest.raises(ValueError, match="trainer.optim.ema=1.0 is out of range"):
        exp_for("trainer.optim.ema=1.0")


def test_refit_learns_the_validation_targets_without_validating_and_stops_at_stop_epoch(split, tmp_path):
    plain = build_trainer(exp_for("trainer.optim.epochs=2"), split)
    # one window per user (samples=last): the newest target is s[n-3] plainly, s[n-2] in a refit
    assert np.array_equal(plain.targets[:, -1], [seq[-1] for seq in split.train])
    exp = exp_for("trainer.optim.epochs=6", "trainer.optim.stop_epoch=3", "trainer.selection.refit=true", "trainer.optim.schedule=cosine",
                  "trainer.selection.patience=1", "trainer.optim.lr=0.01")
    refit = build_trainer(exp, split)
    assert np.array_equal(refit.targets[:, -1], split.valid.targets)
    assert np.array_equal(refit.targets[:, -2], plain.targets[:, -1])

    state = train_in_process(exp, split, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "epochs.jsonl").read_text().splitlines()]
    assert state.epoch == 3 and state.best_epoch == 3  # patience cannot stop what is never validated
    assert not any(key.startswith("valid_") for line in lines for key in line)
    saved = load_train_state(tmp_path / "checkpoints" / "best")
    assert saved["loop"]["epoch"] == 3  # the test model is the last epoch
    # stopped half way through a schedule sized for 6 epochs: the cosine rate is at half its peak
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.005, rel=0.05)


def test_stop_epoch_beyond_the_schedule_is_refused():
    with pytest.raises(ValueError, match=r"trainer.optim.stop_epoch=7 is out of range.*trainer.optim.epochs=6"):
        exp_for("trainer.optim.epochs=6", "trainer.optim.stop_epoch=7")


def test_target_ranks_of_gives_each_users_rank_in_row_order(split):
    """Per-user ranks, in the eval set's row order whatever the batching, agree with a direct
    top-k of each row and average to evaluate's figures."""
    from recsys.metrics import per_user_metrics, target_ranks
    from recsys.models import Batch
    from recsys.models.registry import build_model, model_config_from_dict
    from recsys.training.evaluate import target_ranks_of

    torch.manual_seed(0)
    name, config = model_config_from_dict({"name": "sasrec", "d_model": 16, "n_layers": 1, "n_heads": 1})
    model = build_model(name, config, split.n_items, 10).eval()
    es = split.eval_set("test")
    ranks = target_ranks_of(model, es, batch_size=7)
    assert ranks.shape == (len(es),) and (ranks >= 0).any() and (ranks == -1).any()
    for row in (0, 5, len(es) - 1):
        top = model.recommend(Batch(history=torch.tensor(es.histories[row:row + 1]),
                                    target=torch.tensor(es.targets[row:row + 1])), k=20)
        assert ranks[row] == int(target_ranks(top.items, torch.tensor(es.targets[row:row + 1]))[0])
    figures = evaluate(model, es, batch_size=5)
    for name, values in per_user_metrics(ranks).items():
        assert values.mean() == pytest.approx(figures[name])
