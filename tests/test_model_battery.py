"""One battery over every sequence model (peft's TEST_CASES pattern).

A later model joins by adding a row to CASES: its name, a small config, a causality probe and,
if it needs one, the context ``build_model`` passes it (e.g. TIGER's semantic-ID table).
"""

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from recsys.models import Batch, IdTable, build_model, model_config_from_dict, model_names
from recsys.semantic_ids import SemanticIdIndex
from recsys.training.checkpoint import load_model, save_checkpoint
from windows import fit_until

N_ITEMS, MAX_LEN = 40, 8


@dataclass
class ModelCase:
    id: str
    config: dict
    # model -> (outputs, outputs after changing the input from position `cut` on, cut):
    # outputs before `cut` must not change, those from `cut` on must
    causal_probe: Callable
    context: Callable[[], dict] = field(default=dict)  # () -> extra build_model keyword arguments


def history_probe(positions: Callable) -> Callable:
    """positions: (model, history (B, T)) -> (B, T, D) outputs, position t from items <= t."""
    def probe(model):
        history = tiny_batch().history
        changed = history.clone()
        changed[:, 5:] = torch.randint(1, N_ITEMS + 1, changed[:, 5:].shape)
        return positions(model, history), positions(model, changed), 5
    return probe


def decoder_probe(model):
    """Encoder-decoder: the decoder over the target ID (BOS, c0, c1, c2) must be causal; the
    encoder reads the whole history by design. Changing c2 leaves positions 0..2 alone."""
    batch = tiny_batch()
    codes = model.item_codes[batch.target]  # (B, L + 1)
    changed = codes.clone()
    changed[:, 2:] = (changed[:, 2:] + 1) % torch.tensor(model.level_sizes[2:])
    return (model.decoder_states(batch.history, codes, batch.users),
            model.decoder_states(batch.history, changed, batch.users), 3)


def semantic_id_context() -> dict:
    """A fixed table: 40 items, 3 levels of 4 codes plus the collision level."""
    codes = torch.randint(0, 4, (N_ITEMS, 3), generator=torch.Generator().manual_seed(0))
    index = SemanticIdIndex(item_ids=torch.arange(1, N_ITEMS + 1), codes=codes, codebook_sizes=[4, 4, 4])
    return {"ids": {"semantic": IdTable.from_index(index, N_ITEMS)}}


def eager_probe(model):
    """EAGER's semantic decoder over (BOS, c0, c1, c2, c3, summary) must be causal: changing c2
    leaves positions 0..2 alone and changes the rest, the summary included."""
    batch = tiny_batch()
    vocab = model.vocabulary("semantic")
    codes = vocab.item_codes[batch.target]  # (B, L + 1)
    changed = codes.clone()
    changed[:, 2:] = (changed[:, 2:] + 1) % torch.tensor(vocab.level_sizes[2:])
    return (model.stream_states("semantic", batch.history, codes),
            model.stream_states("semantic", batch.history, changed), 3)


def two_stream_context() -> dict:
    """EAGER's two spaces, each with the vectors its IDs were built from: behaviour IDs of 2 levels
    of 8 codes (vectors of 12 dims), the semantic IDs above (vectors of 20 dims)."""
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 8, (N_ITEMS, 2), generator=g)
    behavior = IdTable.from_index(SemanticIdIndex(item_ids=torch.arange(1, N_ITEMS + 1), codes=codes,
                                                  codebook_sizes=[8, 8]), N_ITEMS)
    semantic = semantic_id_context()["ids"]["semantic"]

    def vectors(dim):
        return torch.cat([torch.zeros(1, dim), torch.randn(N_ITEMS, dim, generator=g)])
    return {"ids": {"behavior": behavior._replace(vectors=vectors(12)),
                    "semantic": semantic._replace(vectors=vectors(20))}}


TINY_EAGER = {"name": "eager", "d_model": 32, "n_heads": 2, "n_decoder_layers": 1, "d_ff": 64, "dropout": 0.1,
              "beam_size": 10, "gct_weight_semantic": 1.0}

CASES = [
    ModelCase("sasrec-ce", {"name": "sasrec", "d_model": 32, "n_heads": 2, "dropout": 0.1, "loss": "ce"},
              history_probe(lambda m, h: m.encode(h))),
    ModelCase("sasrec-bce", {"name": "sasrec", "d_model": 32, "n_layers": 1, "loss": "bce", "n_negatives": 4},
              history_probe(lambda m, h: m.encode(h))),
    ModelCase("sasrec-ce-separate-output", {"name": "sasrec", "d_model": 32, "n_layers": 1, "loss": "ce",
                                            "output_embeddings": "separate"},
              history_probe(lambda m, h: m.encode(h))),
    ModelCase("tiger", {"name": "tiger", "d_model": 32, "n_encoder_layers": 1, "n_decoder_layers": 1,
                        "n_heads": 2, "head_dim": 24, "d_ff": 64, "dropout": 0.1, "beam_size": 10},
              decoder_probe, semantic_id_context),
    ModelCase("tiger-prefix", {"name": "tiger", "d_model": 32, "n_encoder_layers": 1, "n_decoder_layers": 1,
                               "n_heads": 2, "head_dim": 16, "d_ff": 64, "beam_size": 10, "prefix_embeddings": True},
              decoder_probe, semantic_id_context),
    ModelCase("tiger-prefix-outputs", {"name": "tiger", "d_model": 32, "n_encoder_layers": 1, "n_decoder_layers": 1,
                                       "n_heads": 2, "head_dim": 16, "d_ff": 64, "beam_size": 10,
                                       "prefix_embeddings": True, "prefix_outputs": True},
              decoder_probe, semantic_id_context),
    ModelCase("tiger-prefix-outputs-separate", {"name": "tiger", "d_model": 32, "n_encoder_layers": 1,
                                                "n_decoder_layers": 1, "n_heads": 2, "head_dim": 16, "d_ff": 64,
                                                "beam_size": 10, "prefix_embeddings": True, "prefix_outputs": True,
                                                "prefix_output_table": "separate"},
              decoder_probe, semantic_id_context),
    ModelCase("tiger-last-item-start", {"name": "tiger", "d_model": 32, "n_encoder_layers": 1, "n_decoder_layers": 1,
                                        "n_heads": 2, "head_dim": 16, "d_ff": 64, "beam_size": 10,
                                        "prefix_embeddings": True, "prefix_outputs": True, "last_item_start": True},
              decoder_probe, semantic_id_context),
    ModelCase("tiger-last-item-output", {"name": "tiger", "d_model": 32, "n_encoder_layers": 1, "n_decoder_layers": 1,
                                         "n_heads": 2, "head_dim": 16, "d_ff": 64, "beam_size": 10,
                                         "prefix_embeddings": True, "prefix_outputs": True, "last_item_start": True,
                                         "last_item_output": True},
              decoder_probe, semantic_id_context),
    ModelCase("sasrec-sampled-softmax", {"name": "sasrec", "d_model": 32, "n_layers": 1, "loss": "sampled_softmax",
                                         "n_negatives": 16, "temperature": 0.1},
              history_probe(lambda m, h: m.encode(h))),
    ModelCase("hstu-position-only", {"name": "hstu", "d_model": 32, "n_heads": 2, "dropout": 0.1, "n_negatives": 16,
                                     "temperature": 0.1, "time_bias": "off"},
              history_probe(lambda m, h: m.encode(timed(h)))),
    ModelCase("hstu-time", {"name": "hstu", "d_model": 32, "n_heads": 2, "dropout": 0.1, "n_negatives": 16,
                            "temperature": 0.1, "time_bias": "on"},
              history_probe(lambda m, h: m.encode(timed(h)))),
    ModelCase("hstu-auto", {"name": "hstu", "d_model": 32, "n_layers": 1, "n_negatives": 16, "temperature": 0.1},
              history_probe(lambda m, h: m.encode(timed(h)))),
    ModelCase("hstu-ce", {"name": "hstu", "d_model": 32, "n_layers": 1, "loss": "ce", "temperature": 0.1},
              history_probe(lambda m, h: m.encode(timed(h)))),
    ModelCase("hstu-ce-separate-output", {"name": "hstu", "d_model": 32, "n_layers": 1, "loss": "ce",
                                          "temperature": 0.1, "output_embeddings": "separate"},
              history_probe(lambda m, h: m.encode(timed(h)))),
    ModelCase("tiger-user", {"name": "tiger", "d_model": 32, "n_encoder_layers": 1, "n_decoder_layers": 1,
                             "n_heads": 2, "head_dim": 16, "d_ff": 64, "beam_size": 10, "user_tokens": 7},
              decoder_probe, semantic_id_context),
    ModelCase("two-tower", {"name": "two_tower", "d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64,
                            "dropout": 0.1, "log_q": "streaming"},
              history_probe(lambda m, h: m.encode(h))),
    ModelCase("eager", TINY_EAGER, eager_probe, two_stream_context),
    ModelCase("eager-last-item-prefix-outputs",  # configs/beauty-eager.yaml's variant
              {**TINY_EAGER, "last_item_start": True, "last_item_output": True, "prefix_outputs": True},
              eager_probe, two_stream_context),
    ModelCase("two-tower-counts", {"name": "two_tower", "d_model": 32, "n_layers": 1, "d_ff": 64, "log_q": "counts"},
              history_probe(lambda m, h: m.encode(h))),
]


# Rankers score given candidates: their rows check the ranker's half of the contract.
def ranker_context() -> dict:
    return {"item_vectors": torch.randn(N_ITEMS + 1, 6, generator=torch.Generator().manual_seed(0))}


RANKER_CASES = [
    ModelCase("twin", {"name": "twin", "d_model": 16, "n_heads": 2, "top_k": 4, "dropout": 0.0}, None, ranker_context),
    ModelCase("twin-ids-only", {"name": "twin", "d_model": 16, "top_k": 4, "dropout": 0.0}, None),
    ModelCase("twin-v2", {"name": "twin_v2", "d_model": 16, "n_heads": 2, "gamma": 3, "top_k": 3, "dropout": 0.0},
              None, ranker_context),
    ModelCase("twin-v2-vectors-only", {"name": "twin_v2", "d_model": 16, "gamma": 3, "top_k": 3, "dropout": 0.0,
                                       "id_embeddings": False}, None, ranker_context),
    ModelCase("twin-short-only", {"name": "twin", "d_model": 16, "history": "none", "dropout": 0.0}, None),
]


def ranker_batch(seed: int = 0, rows: int = 6, cands: int = 5) -> Batch:
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(1, N_ITEMS + 1, (rows, 3 * MAX_LEN), generator=g)  # longer than max_len: whole histories
    history[:2, :7] = 0
    candidates = torch.randint(1, N_ITEMS + 1, (rows, cands), generator=g)
    labels = torch.zeros(rows, cands)
    labels[torch.arange(rows), torch.arange(rows) % cands] = 1
    return Batch(history=history, candidates=candidates, labels=labels,
                 candidate_ranks=torch.arange(cands).expand(rows, -1).clone(),
                 candidate_scores=torch.randn(rows, cands, generator=g))


@pytest.mark.parametrize("case", RANKER_CASES, ids=lambda c: c.id)
def test_ranker_save_load_round_trip_and_padding(case, tmp_path):
    model, loaded = saved_and_loaded(case, tmp_path)
    batch = ranker_batch()
    batch.candidates[0, -1] = 0
    torch.testing.assert_close(model.score(batch), loaded.score(batch))
    assert torch.isinf(model.score(batch)[0, -1]) and torch.isfinite(model.score(batch)[1:]).all()


@pytest.mark.parametrize("case", RANKER_CASES, ids=lambda c: c.id)
def test_ranker_same_seed_same_result_and_overfits_a_tiny_batch(case):
    def run(seed, steps):
        _, model = make(case, seed)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        batch = model.prepare(ranker_batch())  # once, as training does
        for _ in range(steps):
            loss = model.loss(batch).total
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item(), model

    (l1, _), (l2, _), (l3, _) = run(0, 3), run(0, 3), run(1, 3)
    assert l1 == l2 and l1 != l3
    first, _ = run(0, 1)
    last, model = run(0, 100)
    assert last < 0.2 * first
    model.eval()
    batch = ranker_batch()
    assert (model.score(batch).argmax(1) == batch.labels.argmax(1)).all()  # each row's positive first


def saved_and_loaded(case: ModelCase, tmp_path):
    """The case's model in eval mode, and the same model saved and loaded back."""
    name, model = make(case)
    model.eval()
    save_checkpoint(tmp_path / "ckpt", model, name)
    return model, load_model(tmp_path / "ckpt")


def make(case: ModelCase, seed: int = 0):
    torch.manual_seed(seed)
    name, cfg = model_config_from_dict(case.config)
    return name, build_model(name, cfg, n_items=N_ITEMS, max_len=MAX_LEN, **case.context())


def tiny_batch(seed: int = 0, rows: int = 8) -> Batch:
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, N_ITEMS + 1, (rows, MAX_LEN + 1), generator=g)
    seq[:2, :3] = 0  # some left padding
    targets = seq[:, 1:].clone()
    targets[seq[:, :-1] == 0] = 0
    users = torch.arange(rows) * 3  # models with a user token read them; the others ignore them
    # event times (0 at padding), for models that read them; the others ignore them
    times = torch.randint(60, 10 ** 6, (rows, MAX_LEN + 1), generator=g).cumsum(1) * (seq > 0)
    return Batch(history=seq[:, :-1], targets=targets, target=seq[:, -1], users=users,
                 timestamps=times[:, :-1], target_time=times[:, -1])


def timed(history: torch.Tensor) -> Batch:
    """``history`` with the tiny batch's times: a causality probe changes items, not times."""
    times = tiny_batch(rows=len(history))
    return Batch(history=history, timestamps=times.timestamps, target_time=times.target_time)


def test_every_registered_model_has_a_case():
    assert {c.config["name"] for c in CASES + RANKER_CASES} == set(model_names())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_no_position_attends_to_the_future(case):
    _, model = make(case)
    model.eval()
    with torch.no_grad():
        a, b, cut = case.causal_probe(model)
    torch.testing.assert_close(a[:, :cut], b[:, :cut])
    assert not torch.allclose(a[:, cut:], b[:, cut:])  # the probe is sensitive at all


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_save_load_round_trip_gives_the_same_outputs(case, tmp_path):
    model, loaded = saved_and_loaded(case, tmp_path)
    batch = tiny_batch()
    torch.testing.assert_close(model.recommend(batch, 10).scores, loaded.recommend(batch, 10).scores)
    assert torch.equal(model.recommend(batch, 10).items, loaded.recommend(batch, 10).items)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_same_seed_same_result(case):
    def run(seed):
        _, model = make(case, seed)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(seed)
        for _ in range(3):
            loss = model.loss(tiny_batch()).total
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item(), model.recommend(tiny_batch(), 5).items

    (l1, r1), (l2, r2), (l3, _) = run(0), run(0), run(1)
    assert l1 == l2 and torch.equal(r1, r2)
    assert l1 != l3


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_tiny_batch_can_be_overfit(case):
    """Within 300 Adam steps the loss falls below a fifth of its start and the batch is memorised:
    the next item of at least 90 % of the rows is in their top 3. Checked every 20 steps, so a model
    that gets there sooner stops there (the battery's largest cost on a 2-core machine)."""
    _, model = make(case)
    batch = tiny_batch()
    first = model.loss(batch).total.item()
    query = Batch(history=batch.history, users=batch.users, timestamps=batch.timestamps,
                  target_time=batch.target_time)
    seen = {}

    def overfit(loss: torch.Tensor) -> bool:
        top = model.recommend(query, 3).items
        seen["loss"], seen["memorised"] = loss.item(), (top == batch.targets[:, -1:]).any(dim=1).float().mean().item()
        return seen["loss"] < 0.2 * first and seen["memorised"] >= 0.9

    steps = fit_until(model, batch, 5e-3, overfit, max_steps=300)
    assert steps is not None, f"not overfit after 300 steps: loss {seen['loss']:.4f} from {first:.4f}, " \
                              f"{seen['memorised']:.0%} of rows memorised"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_recommend_returns_only_real_item_ids(case):
    _, model = make(case)
    model.eval()
    batch = tiny_batch()
    rec = model.recommend(batch, N_ITEMS)
    assert rec.items.shape == (8, N_ITEMS)
    assert ((rec.items >= 1) & (rec.items <= N_ITEMS)).all()
    assert all(len(set(row.tolist())) == N_ITEMS for row in rec.items)  # a permutation of the catalogue
    assert (rec.scores[:, :-1] >= rec.scores[:, 1:]).all()
    excl = model.recommend(batch, 5, exclude_history=True).items
    for row, hist in zip(excl.tolist(), batch.history.tolist()):
        assert not set(row) & set(hist)
    for bad_k in (0, N_ITEMS + 1):
        with pytest.raises(ValueError, match=f"k={bad_k} is out of range"):
            model.recommend(batch, bad_k)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_trimming_left_padding_changes_nothing(case):
    """The loop and evaluation drop all-padding left columns (``trim_padding``); positions are
    right-aligned, so losses and rankings must be the same as on the padded batch."""
    from recsys.training.batching import trim_padding

    _, model = make(case)
    model.eval()
    short = tiny_batch(rows=4)
    short.history[:, :3], short.targets[:, :3] = 0, 0  # every row starts with 3 padding columns
    short.timestamps[:, :3] = 0
    history, targets, times = trim_padding(short.history, short.targets, short.timestamps)
    assert history.shape[1] == MAX_LEN - 3
    trimmed = Batch(history=history, targets=targets, target=short.target, users=short.users, timestamps=times,
                    target_time=short.target_time)
    losses = []
    for batch in (short, trimmed):
        torch.manual_seed(0)  # the same sampled negatives (BCE) for both
        losses.append(model.loss(batch).total)
    assert torch.allclose(*losses, atol=1e-5)
    full, cut = model.recommend(short, 5), model.recommend(trimmed, 5)
    assert torch.equal(full.items, cut.items) and torch.allclose(full.scores, cut.scores, atol=1e-5)


def variant(name: str, config: dict) -> tuple:
    """What makes a model variant: its name and its switches (booleans and choices), not its sizes."""
    return (name, *sorted((k, v) for k, v in config.items() if isinstance(v, (bool, str)) and k != "name"))


def test_every_shipped_configs_model_variant_has_a_battery_row():
    from dataclasses import asdict
    from pathlib import Path

    from recsys.experiment import load_experiment

    rows = set()
    for case in CASES + RANKER_CASES:
        name, cfg = model_config_from_dict(case.config)
        rows.add(variant(name, asdict(cfg)))
    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    shipped = [c for c in configs if not c.name.startswith("tune-")]  # sweeps: their base is a shipped config
    assert shipped
    for path in shipped:
        exp = load_experiment(path)
        assert variant(exp.model_name, asdict(exp.model)) in rows, f"configs/{path.name} has no battery row"
