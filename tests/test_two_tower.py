"""The two-tower retriever: its in-batch softmax against the formula, the frequency estimate
behind its logQ correction, its checkpoint, exact ANN scoring, and training to behaviour IDs."""

import json
import math

import numpy as np
import pytest
import torch

from recsys.models import Batch, build_model, model_config_from_dict
from recsys.models.losses import ItemFrequency
from recsys.training.checkpoint import load_model, save_checkpoint

N_ITEMS, MAX_LEN = 12, 6


def make(content_vectors=None, **config):
    torch.manual_seed(0)
    name, cfg = model_config_from_dict({"name": "two_tower", "d_model": 16, "n_layers": 1, "d_ff": 32, **config})
    context = {} if content_vectors is None else {"content_vectors": content_vectors}
    return build_model(name, cfg, n_items=N_ITEMS, max_len=MAX_LEN, **context)


def masked_batch(seed: int = 1) -> Batch:
    """Few items, so targets repeat within the batch and often are in the user's history."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, N_ITEMS + 1, (5, MAX_LEN + 1), generator=g)
    seq[0, :3] = 0
    targets = seq[:, 1:].clone()
    targets[seq[:, :-1] == 0] = 0
    return Batch(history=seq[:, :-1], targets=targets)


@torch.no_grad()
def reference_loss(model, batch: Batch, temperature: float, p: torch.Tensor | None) -> float:
    """As the formula reads, one position at a time: logit = cos(u, v_j) / tau - log p_j over the
    batch's targets; a column other than the row's own is masked when it is the row's positive
    item or an item in the user's history up to the position."""
    states = model.encode(batch.history)
    positions = [(b, t) for b in range(batch.history.shape[0]) for t in range(batch.history.shape[1])
                 if batch.targets[b, t] > 0]
    items = [int(batch.targets[b, t]) for b, t in positions]
    losses = []
    for p_idx, (b, t) in enumerate(positions):
        u = states[b, t] / states[b, t].norm()
        had = set(batch.history[b, :t + 1].tolist())
        logits = []
        for j, item in enumerate(items):
            v = model.item_emb.weight[item] / model.item_emb.weight[item].norm()
            logit = float(u @ v) / temperature - (math.log(float(p[item])) if p is not None else 0.0)
            if j != p_idx and (item == items[p_idx] or item in had):
                logit = -math.inf
            logits.append(logit)
        live = [x for x in logits if x > -math.inf]
        top = max(live)
        losses.append(-logits[p_idx] + top + math.log(sum(math.exp(x - top) for x in live)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("log_q", ["off", "streaming", "counts"])
def test_in_batch_softmax_matches_the_formula_with_its_masks_and_log_q(log_q):
    model = make(log_q=log_q, temperature=0.2)
    batch = masked_batch()
    keep = batch.targets > 0
    targets = batch.targets[keep]
    assert (targets[:, None] == targets[None, :]).sum() > len(targets)  # the batch repeats items
    model.train()
    for seed in (2, 3, 4, 1):  # training steps update the estimate: varied gaps, then EMAs
        model.loss(masked_batch(seed))
    model.eval()  # no dropout, no further update
    p = None if log_q == "off" else model.frequency.probability(torch.arange(N_ITEMS + 1))
    if p is not None:
        assert len(set(p[targets].tolist())) > 1  # the correction is not a constant
    expected = reference_loss(model, batch, 0.2, p)
    out = model.loss(batch)
    assert set(out.parts) == {"in_batch_softmax"}
    assert out.total.item() == pytest.approx(expected, rel=1e-5)
    if log_q != "off":  # the correction changes the loss
        assert reference_loss(model, batch, 0.2, None) != pytest.approx(expected, rel=1e-3)


def test_the_history_mask_matters():
    """Without masking the user's own items the formula gives another loss (the test above is
    sensitive to that mask)."""
    from recsys.models.losses import InBatchSoftmaxLoss, seen_in_history

    model = make(log_q="off").eval()
    batch = masked_batch()
    keep = batch.targets > 0
    targets = batch.targets[keep]
    seen = seen_in_history(batch.history, keep, targets, N_ITEMS)
    assert (seen & (targets[:, None] != targets[None, :])).any()
    h, v = model.encode(batch.history)[keep], model.item_emb(targets)
    loss = InBatchSoftmaxLoss(0.05)
    assert loss(h, v, targets, seen=seen).total.item() != pytest.approx(loss(h, v, targets).total.item())


def test_streaming_estimate_converges_to_the_chance_of_being_in_a_batch():
    rng = np.random.default_rng(0)
    n, batch = 30, 16
    q = 1.0 / np.arange(1, n + 1)
    q /= q.sum()  # Zipf over items 1..30
    estimate = ItemFrequency(n, "streaming", alpha=0.01)
    # 5,000 batches: the rarest item is seen ~600 times, far past the EMA's ~100-sighting memory; the
    # error left is the EMA's own noise (relative error over 4 seeds: mean 0.044-0.049 at 5,000 batches,
    # 0.035-0.057 at 20,000)
    for items in rng.choice(n, (5000, batch), p=q) + 1:
        estimate.update(torch.from_numpy(items))
    truth = 1 - (1 - q) ** batch  # the chance an item is in a batch of 16 draws
    got = estimate.probability(torch.arange(1, n + 1)).numpy()
    error = np.abs(got - truth) / truth
    assert error.mean() < 0.08 and error.max() < 0.25, error
    assert np.corrcoef(np.log(got), np.log(truth))[0, 1] > 0.98


def test_counts_estimate_is_the_targets_frequency():
    estimate = ItemFrequency(5, "counts")
    for items in ([1, 1, 2], [1, 3, 3, 3]):
        estimate.update(torch.tensor(items))
    p = estimate.probability(torch.arange(1, 6))
    torch.testing.assert_close(p, torch.tensor([3, 1, 3, 1, 1], dtype=torch.float64) / 7)  # unseen: one sighting


@pytest.mark.parametrize("log_q", ["streaming", "counts"])
def test_the_estimate_survives_a_checkpoint_and_continues(log_q, tmp_path):
    model = make(log_q=log_q).train()
    for seed in range(3):
        model.loss(masked_batch(seed))
    save_checkpoint(tmp_path / "ckpt", model, "two_tower")
    loaded = load_model(tmp_path / "ckpt").train()
    for name, buffer in model.frequency.named_buffers():
        assert torch.equal(buffer, getattr(loaded.frequency, name)), name
    assert int(loaded.frequency.step) == 3
    model.loss(masked_batch())
    loaded.loss(masked_batch())
    items = torch.arange(N_ITEMS + 1)
    torch.testing.assert_close(model.frequency.probability(items), loaded.frequency.probability(items))


def test_scores_are_user_dot_item_vectors_and_a_flat_index_ranks_exactly():
    from recsys.ann import AnnRetriever

    model = make().eval()
    batch = masked_batch()
    with torch.no_grad():
        users, items = model.user_embedding(batch), model.item_embeddings()
        scores = model.score_items(batch)
    torch.testing.assert_close(scores[:, 1:], users @ items.T)
    torch.testing.assert_close(users.norm(dim=1), torch.ones(len(users)))
    torch.testing.assert_close(items.norm(dim=1), torch.ones(N_ITEMS))
    ann = AnnRetriever(model, index="Flat")
    for exclude in (False, True):
        exact, found = model.recommend(batch, 5, exclude), ann.recommend(batch, 5, exclude)
        assert torch.equal(exact.items, found.items)
        torch.testing.assert_close(exact.scores, found.scores)


@pytest.mark.parametrize("key, value, message", [
    ("temperature", 0.0, r"model.temperature=0.0 is out of range; allowed: > 0"),
    ("temperature", -1.0, r"model.temperature=-1.0 is out of range"),
    ("log_q", "uniform", r"model.log_q='uniform' is not allowed; choose one of \['streaming', 'counts', 'off'\]"),
    ("alpha", 0.0, r"model.alpha=0.0 is out of range"),
])
def test_bad_config_names_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        model_config_from_dict({"name": "two_tower", key: value})


def test_trains_in_process_and_its_item_vectors_give_behaviour_ids(tmp_path):
    from pipelines.stages import run_data, run_ids_stage, run_train
    from recsys.experiment import load_experiment
    from recsys.runs import read_json
    from recsys.semantic_ids import SemanticIdIndex
    from recsys.text import load_embeddings

    common = [f"run.root={tmp_path}", "data.synthetic.n_users=120", "data.synthetic.n_items=40",
              "data.max_history=6", "model.name=two_tower", "model.d_model=16", "model.n_layers=1",
              "model.d_ff=32", "trainer.resources.use_ray=false", "trainer.optim.epochs=2",
              "trainer.optim.batch_size=32", "trainer.resources.threads=1"]
    exp = load_experiment(None, common)
    data_dir = run_data(exp)
    train_dir = run_train(exp, data_dir=data_dir)
    epochs = [json.loads(line) for line in (train_dir / "epochs.jsonl").read_text().splitlines()]
    assert len(epochs) == 2 and epochs[1]["train_in_batch_softmax"] < epochs[0]["train_in_batch_softmax"]
    model = load_model(train_dir / "checkpoints" / "last")
    steps = int(model.frequency.step)
    assert steps > 0 and (model.frequency.last_seen > 0).sum() > 30  # the estimate was kept and saved
    ids_exp = load_experiment(None, [f"run.root={tmp_path}", "ids.method=hkmeans", "ids.use_ray=false",
                                     "ids.hkmeans.branching=4", "ids.hkmeans.max_levels=2"])
    ids_dir = run_ids_stage(ids_exp, train_dir=train_dir)
    assert read_json(ids_dir / "config.json")["train_dir"] == str(train_dir.resolve())
    index = SemanticIdIndex.load(ids_dir / "index")
    assert len(index) == 40
    best = load_model(train_dir / "checkpoints" / "best")
    _, vectors = load_embeddings(ids_dir)  # the ids run holds the vectors it was fitted on
    np.testing.assert_allclose(vectors, best.item_embeddings().detach().numpy(), atol=1e-6)


def test_the_item_tower_adds_a_projection_of_the_content_vector_and_the_checkpoint_keeps_it(tmp_path):
    content = torch.cat([torch.zeros(1, 5), torch.randn(N_ITEMS, 5, generator=torch.Generator().manual_seed(1))])
    model = make(content=True, content_vectors=content)
    plain = make()
    torch.testing.assert_close(model.item_tower()[0], torch.zeros(16))  # padding stays 0
    items = torch.tensor([3, 7])
    expected = model.item_emb(items) + content[items] @ model.content_proj.weight.T
    torch.testing.assert_close(model.item_tower(items), expected)
    batch = masked_batch()
    model.eval()  # no dropout: the two calls see the same user vector
    user = model.user_embedding(batch)
    torch.testing.assert_close(model.score_items(batch)[:, 1:], user @ model.item_embeddings().T)
    model.train()
    model.loss(batch).total.backward()  # the projection learns from the in-batch softmax
    assert model.content_proj.weight.grad.abs().sum() > 0
    save_checkpoint(tmp_path / "ckpt", model, "two_tower")
    again = load_model(tmp_path / "ckpt")
    torch.testing.assert_close(again.content_vectors, content)
    torch.testing.assert_close(again.item_embeddings(), model.eval().item_embeddings())
    assert plain.content_proj is None and "content_vectors" not in plain.state_dict()
    with pytest.raises(ValueError, match="train with --embed"):
        make(content=True)
    with pytest.raises(ValueError, match="model.content=false"):
        make(content_vectors=content)
    with pytest.raises(ValueError, match=r"content_vectors must be \(n_items \+ 1, D\)"):
        make(content=True, content_vectors=content[1:])


def test_train_with_embed_reads_the_embed_runs_vectors_and_refuses_them_where_unread(tmp_path):
    from pipelines.stages import run_data, run_train
    from recsys.experiment import load_experiment
    from recsys.runs import mark_complete, write_json
    from recsys.text import load_embeddings, write_embeddings

    common = [f"run.root={tmp_path}", "data.synthetic.n_users=80", "data.synthetic.n_items=30",
              "data.max_history=6", "model.d_model=16", "model.n_layers=1", "model.d_ff=32",
              "trainer.resources.use_ray=false", "trainer.optim.epochs=1", "trainer.optim.batch_size=32",
              "trainer.resources.threads=1"]
    exp = load_experiment(None, [*common, "model.name=two_tower", "model.content=true"])
    data_dir = run_data(exp)
    embed_dir = tmp_path / "embed"
    embed_dir.mkdir()
    write_embeddings(embed_dir / "embeddings.parquet", np.arange(1, 31),
                     np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32), "fake", [str(i) for i in range(30)])
    write_json(embed_dir / "config.json", {"data_dir": str(data_dir)})
    mark_complete(embed_dir, "embed")
    train_dir = run_train(exp, data_dir=data_dir, embed_dir=embed_dir)
    model = load_model(train_dir / "checkpoints" / "best")
    _, vectors = load_embeddings(embed_dir)
    np.testing.assert_allclose(model.content_vectors[1:].numpy(), vectors)
    assert json.loads((train_dir / "config.json").read_text())["embed_dir"] == str(embed_dir)
    with pytest.raises(ValueError, match="train with --embed"):
        run_train(exp, data_dir=data_dir)
    with pytest.raises(ValueError, match="reads none"):
        run_train(load_experiment(None, [*common, "model.name=sasrec"]), data_dir=data_dir, embed_dir=embed_dir)


def test_a_batch_of_one_is_refused_with_the_minimum_named():
    from recsys.experiment import load_experiment

    with pytest.raises(ValueError, match=r"trainer.optim.batch_size=1 is too small for model.name='two_tower': its "
                                         r"loss needs at least 2 examples per batch"):
        load_experiment(None, ["model.name=two_tower", "trainer.optim.batch_size=1"])
    assert load_experiment(None, ["model.name=two_tower", "trainer.optim.batch_size=2"]).trainer.optim.batch_size == 2
    assert load_experiment(None, ["model.name=sasrec", "trainer.optim.batch_size=1"]).trainer.optim.batch_size == 1
