"""The model contract: named Batch fields, loss parts, declared capabilities, shared losses."""

import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recsys.models import Batch, Capabilities, LossOutput, Ranker, Retriever, get_spec, model_names
from recsys.models.losses import FullSoftmaxLoss, SampledBCELoss, SampledSoftmaxLoss

ROOT = Path(__file__).resolve().parents[1]


def test_batch_fields_are_named_and_all_move_to_a_device():
    with pytest.raises(TypeError):
        Batch(torch.ones(2, 3))  # positional fields are refused
    fields = dict(history=torch.ones(2, 3, dtype=torch.long), targets=torch.ones(2, 3, dtype=torch.long),
                  target=torch.ones(2, dtype=torch.long), users=torch.zeros(2, dtype=torch.long),
                  timestamps=torch.arange(6).view(2, 3), target_time=torch.tensor([7, 8]),
                  candidates=torch.ones(2, 4, dtype=torch.long), labels=torch.zeros(2, 4))
    moved = Batch(**fields).to(torch.device("meta"))
    for name in fields:
        assert getattr(moved, name).device.type == "meta", name
    assert Batch(history=fields["history"]).to("cpu").timestamps is None


@pytest.mark.parametrize("name", model_names())
def test_every_model_declares_its_role_and_capabilities(name):
    cls = get_spec(name).model_cls
    assert cls.role in ("retriever", "ranker")
    assert issubclass(cls, Retriever if cls.role == "retriever" else Ranker)
    assert isinstance(cls.capabilities, Capabilities)
    assert all(isinstance(space, str) and space for space in cls.capabilities.id_spaces)
    if cls.capabilities.registers_items and cls.role == "retriever":  # a ranker registers from content vectors
        assert cls.capabilities.id_spaces, "a retriever registering items needs an ID space to give them IDs in"


def test_nothing_probes_models_for_undeclared_capabilities():
    """The issue's check: serving, training, pipelines and tune read declarations, not attributes."""
    out = subprocess.run(["grep", "-rnE", r"(hasattr|getattr)\((self\.)?model", "serve", "recsys/training",
                          "pipelines", "tune"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout == "", out.stdout


@torch.no_grad()
def _reference_sampled_softmax(h, targets, items, negatives, temperature, log_q=None):
    """One position at a time, as the formula reads."""
    losses = []
    for p in range(len(targets)):
        cands = [int(targets[p])] + [int(n) for n in negatives[p]]
        u = h[p] / h[p].norm()
        logits = []
        for j, item in enumerate(cands):
            v = items.weight[item] / items.weight[item].norm()
            logit = float(u @ v) / temperature - (float(log_q[item]) if log_q is not None else 0.0)
            if j > 0 and item == int(targets[p]):
                logit = -math.inf
            logits.append(logit)
        losses.append(-logits[0] + math.log(sum(math.exp(x) for x in logits if x > -math.inf)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("with_log_q", [False, True])
def test_sampled_softmax_matches_the_formula_masks_the_positive_and_corrects_by_log_q(with_log_q):
    torch.manual_seed(0)
    items, h = nn.Embedding(11, 6), torch.randn(5, 6)
    targets = torch.tensor([1, 2, 3, 4, 5])
    counts = torch.arange(11, dtype=torch.float) + 1
    log_q = (counts / counts[1:].sum()).log() if with_log_q else None
    loss_fn = SampledSoftmaxLoss(n_negatives=7, temperature=0.1, item_log_q=log_q)
    torch.manual_seed(3)
    negatives = loss_fn.sample(5, 10, h.device)
    negatives[0, 0] = targets[0]  # a negative equal to the positive must be masked
    loss_fn.sample = lambda n, n_items, device: negatives  # the draw above, used by forward
    out = loss_fn(h, targets, items)
    assert isinstance(out, LossOutput) and set(out.parts) == {"sampled_softmax"}
    want = _reference_sampled_softmax(h, targets, items, negatives, 0.1, log_q)
    assert out.total.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("rows", [3, 50])
def test_normalized_rows_is_the_same_whether_it_normalises_the_table_or_the_gathered_rows(rows):
    """The sampled softmax normalises the whole table when it has fewer rows than the gather:
    the same values and gradients as normalising what was gathered."""
    from recsys.models.losses import normalized_rows

    torch.manual_seed(0)
    table = torch.randn(rows, 6, requires_grad=True)
    index = torch.randint(0, rows, (4, 5))  # 20 rows gathered: the table path for 3 rows, the gather's for 50
    got = normalized_rows(table, index)
    (got * torch.arange(6.0)).sum().backward()
    want_table = table.detach().clone().requires_grad_()
    want = torch.nn.functional.normalize(want_table[index], dim=-1)
    (want * torch.arange(6.0)).sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(table.grad, want_table.grad)


def test_a_popularity_sampler_draws_by_its_probabilities():
    probs = torch.tensor([0.0, 0.7, 0.2, 0.1])
    loss_fn = SampledSoftmaxLoss(n_negatives=1000, item_log_q=probs.clamp(min=1e-12).log())
    torch.manual_seed(0)
    drawn = loss_fn.sample(20, 3, torch.device("cpu"))
    share = torch.bincount(drawn.ravel(), minlength=4).float() / drawn.numel()
    assert share[0] == 0 and torch.allclose(share[1:], probs[1:], atol=0.01)


def test_full_softmax_and_bce_give_their_named_parts():
    torch.manual_seed(0)
    items, h, targets = nn.Embedding(9, 4), torch.randn(6, 4), torch.randint(1, 9, (6,))
    full = FullSoftmaxLoss()(h, targets, items)
    logits = h @ items.weight[1:].T
    assert full.total.item() == pytest.approx(F.cross_entropy(logits, targets - 1).item(), rel=1e-6)
    assert set(full.parts) == {"ce"}
    bce = SampledBCELoss(3)(h, targets, items)
    assert set(bce.parts) == {"bce_pos", "bce_neg"}
    assert bce.total.item() == pytest.approx(sum(v.item() for v in bce.parts.values()), rel=1e-6)


def test_loss_parts_are_logged_per_epoch_and_plotted(tmp_path):
    from recsys.data import SyntheticConfig, generate_synthetic
    from recsys.data.split import leave_one_out
    from recsys.experiment import load_experiment
    from recsys.reporting import plot_training_curve
    from recsys.training.session import train_in_process

    split = leave_one_out(generate_synthetic(SyntheticConfig(n_users=80, n_items=30, n_topics=3, seed=0)), 6)
    exp = load_experiment(None, ["trainer.resources.use_ray=false", "trainer.optim.epochs=1", "model.d_model=16", "model.n_layers=1",
                                 "model.loss=bce", "model.d_ff=16", "data.max_history=6"])
    history = train_in_process(exp, split, tmp_path).history
    assert {"train_loss", "train_bce_pos", "train_bce_neg"} <= set(history[0])
    assert history[0]["train_loss"] == pytest.approx(history[0]["train_bce_pos"] + history[0]["train_bce_neg"],
                                                     rel=1e-5)
    logged = (tmp_path / "epochs.jsonl").read_text()
    assert re.search(r'"train_bce_neg": [0-9.]+', logged)
    assert plot_training_curve(history, tmp_path / "curve.png", "ndcg@10").stat().st_size > 0


class _TinyRanker(Ranker):
    """A ranker for the dispatch tests: scores candidates by item id."""

    def __init__(self, config, n_items: int, max_len: int):
        super().__init__(n_items, max_len)
        self.config, self.w = config, nn.Parameter(torch.ones(()))

    def loss(self, batch: Batch) -> LossOutput:
        total = (self.w * batch.candidates.float()).mean()
        return LossOutput(total, {"bce": total.detach()})

    def score(self, batch: Batch) -> torch.Tensor:
        return self.w * batch.candidates.float()


def test_evaluation_serving_and_sweeps_dispatch_on_the_role(tmp_path, monkeypatch):
    """A ranker is refused where only a retriever fits, by its role, with a message that says so."""
    from dataclasses import dataclass

    from pipelines.stages import run_evaluate
    from recsys.experiment import load_experiment
    from recsys.models import registry
    from recsys.runs import mark_complete, write_json
    from recsys.training.checkpoint import save_checkpoint
    from serve.app import build_app

    @dataclass
    class TinyRankerConfig:
        width: int = 1

    monkeypatch.setitem(registry._MODELS, "tiny_ranker", registry.ModelSpec("tiny_ranker", TinyRankerConfig,
                                                                            _TinyRanker))
    exp = load_experiment(None, [f"run.root={tmp_path}", "model.name=tiny_ranker", "data.synthetic.n_users=30",
                                 "data.synthetic.n_items=20", "data.synthetic.max_length=10"])
    from pipelines.stages import run_data

    data_dir = run_data(exp)
    assert data_dir.name.endswith("-synthetic")  # no run.name: the format alone
    train_dir = tmp_path / "train" / "r"
    save_checkpoint(train_dir / "checkpoints" / "best", _TinyRanker(TinyRankerConfig(), 20, 5), "tiny_ranker")
    write_json(train_dir / "config.json", {**exp.to_dict(), "data_dir": str(data_dir), "ids_dirs": {}})
    mark_complete(train_dir, "train")
    with pytest.raises(ValueError, match="holds a ranker .* only a retriever does"):
        run_evaluate(train_dir)
    with pytest.raises(ValueError, match="holds a ranker .* serves a retriever"):
        build_app({"run_dir": str(train_dir)})
    from pipelines.stages import run_train

    with pytest.raises(ValueError, match="is a ranker: it trains on a retriever's candidate sets"):
        run_train(exp, data_dir=data_dir)


def test_full_softmax_with_a_temperature_is_cross_entropy_over_cosines():
    torch.manual_seed(0)
    items, h, targets = nn.Embedding(11, 6), torch.randn(5, 6), torch.tensor([1, 2, 3, 4, 10])
    cos = F.normalize(h, dim=-1) @ F.normalize(items.weight, dim=-1).T
    cos[:, 0] = -math.inf
    out = FullSoftmaxLoss(temperature=0.1)(h, targets, items)
    torch.testing.assert_close(out.total, F.cross_entropy(cos / 0.1, targets))
    with pytest.raises(ValueError, match="temperature=0"):
        FullSoftmaxLoss(temperature=0)
