"""EAGER: shapes, constrained decoding in both streams, beam search against exhaustive scoring,
each loss part training, both GCT variants against their formulas, STT's corruption, the two
fusions, checkpoints, and a pipeline run on synthetic data with behaviour and content IDs."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recsys.models import Batch, Eager, EagerConfig, IdTable
from recsys.models.eager import corrupted, merge_streams
from recsys.semantic_ids import SemanticIdIndex
from recsys.training.checkpoint import load_model, save_checkpoint
from windows import fit, tiny_windows

N_ITEMS, MAX_LEN, B = 40, 6, 8
TINY = dict(d_model=32, n_heads=2, n_decoder_layers=1, d_ff=64, dropout=0.0, beam_size=10)


def id_table(seed: int, sizes: list[int], dim: int, n_used: int | None = None) -> IdTable:
    """Random codes (of the first ``n_used`` codes per level: a sparse trie) and random vectors."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, n_used or sizes[0], (N_ITEMS, len(sizes)), generator=g)
    index = SemanticIdIndex(item_ids=torch.arange(1, N_ITEMS + 1), codes=codes, codebook_sizes=sizes)
    vectors = torch.cat([torch.zeros(1, dim), torch.randn(N_ITEMS, dim, generator=g)])
    return IdTable.from_index(index, N_ITEMS)._replace(vectors=vectors)


def two_spaces() -> dict[str, IdTable]:
    # behaviour: 2 levels of 8 codes of which 3 are used; semantic: 3 levels of 4 (+ collision levels)
    return {"behavior": id_table(0, [8, 8], 12, n_used=3), "semantic": id_table(1, [4, 4, 4], 20)}


LAST_ITEM = dict(last_item_start=True, last_item_output=True)
PREFIX_OUTPUTS = dict(prefix_outputs=True)
VARIANTS = {"plain": {}, "last-item": LAST_ITEM, "prefix-outputs": PREFIX_OUTPUTS}


def make_model(seed: int = 0, **overrides) -> Eager:
    """A tiny EAGER; with the last-item output on, its projections are made non-zero (they start at
    zero), so the tests see the path act."""
    torch.manual_seed(seed)
    model = Eager(EagerConfig(**{**TINY, **overrides}), N_ITEMS, MAX_LEN, ids=two_spaces())
    for decoder in model.decoders.values():
        if decoder.last_output is not None:
            torch.nn.init.normal_(decoder.last_output.weight, std=0.5)
        if decoder.out_nodes is not None:  # node 0 (no node) stays the zero row
            torch.nn.init.normal_(decoder.out_nodes.weight[1:], std=0.5)
    return model


def make_batch(seed: int = 0) -> Batch:
    return tiny_windows(N_ITEMS, MAX_LEN, B, seed)


def test_config_is_validated():
    for bad, message in [(dict(lambda_gct=-1.0), "model.lambda_gct=-1.0 is out of range"),
                         (dict(lambda_stt=2000.0), "model.lambda_stt=2000.0 is out of range"),
                         (dict(gct="l2"), "model.gct"), (dict(fusion="max"), "model.fusion"),
                         (dict(encoder_input="text"), "model.encoder_input"),
                         (dict(last_item_start="yes"), "model.last_item_start must be true or false"),
                         (dict(last_item_output=1), "model.last_item_output must be true or false"),
                         (dict(stt_mask_ratio=0.0), "model.stt_mask_ratio=0.0 is out of range"),
                         (dict(gct_temperature=0.0), "model.gct_temperature=0.0 is out of range"),
                         (dict(fusion_weight=1.5), "model.fusion_weight=1.5 is out of range"),
                         (dict(fusion="confidence", fusion_weight=0.7),
                          "model.fusion_weight=0.7 weighs the streams of the sum fusion, and model.fusion=confidence"),
                         (dict(d_model=30, n_heads=4), "divisible")]:
        with pytest.raises(ValueError, match=message):
            EagerConfig(**bad)
    model = Eager(EagerConfig(), N_ITEMS, MAX_LEN, ids=two_spaces())  # the paper's sizes
    assert len(model.encoder) == 1 and all(len(d.blocks) == 4 for d in model.decoders.values())
    assert model.item_emb.weight.shape == (N_ITEMS + 1, 128)


def test_ids_and_vectors_are_checked():
    ids = two_spaces()
    with pytest.raises(ValueError, match=r"built with the ID spaces \['behavior', 'semantic'\], got \['semantic'\]"):
        Eager(EagerConfig(**TINY), N_ITEMS, MAX_LEN, ids={"semantic": ids["semantic"]})
    no_vectors = {**ids, "semantic": ids["semantic"]._replace(vectors=None)}
    with pytest.raises(ValueError, match="GCT needs the semantic stream's item vectors"):
        Eager(EagerConfig(**TINY), N_ITEMS, MAX_LEN, ids=no_vectors)
    wrong = {**ids, "behavior": ids["behavior"]._replace(vectors=torch.zeros(N_ITEMS, 12))}
    with pytest.raises(ValueError, match=r"behavior stream's item vectors must be \(41, D\)"):
        Eager(EagerConfig(**TINY), N_ITEMS, MAX_LEN, ids=wrong)
    model = Eager(EagerConfig(**TINY, gct="off"), N_ITEMS, MAX_LEN, ids=no_vectors)  # no GCT: no vectors needed
    assert not any(name.startswith("gct") for name in model.loss(make_batch()).parts)


def test_shapes_and_loss_parts():
    model = make_model()
    batch = make_batch()
    for space, n_tokens in (("behavior", 3), ("semantic", 4)):
        codes = model.vocabulary(space).item_codes[batch.target]
        assert model.stream_states(space, batch.history, codes).shape == (B, n_tokens + 2, 32)  # BOS, codes, summary
    out = model.loss(batch)
    assert set(out.parts) == {"gen_behavior", "gen_semantic", "gct_behavior", "gct_semantic", "stt",
                              "stt_reconstruction", "stt_recognition"}
    assert out.total.requires_grad and all(not p.requires_grad for p in out.parts.values())
    parts = out.parts
    expected = (parts["gen_behavior"] + parts["gen_semantic"] + 1.0 * parts["gct_behavior"]
                + 10.0 * parts["gct_semantic"] + parts["stt"])
    torch.testing.assert_close(out.total.detach(), expected)
    model.eval()
    rec = model.recommend_streams(Batch(history=batch.history), 5)
    assert rec.items.shape == rec.scores.shape == rec.streams.shape == (B, 5)
    assert set(rec.streams.unique().tolist()) <= {0, 1, 2}
    assert not any(n.startswith("stt") for n in make_model(stt=False).loss(batch).parts)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("space", ["behavior", "semantic"])
def test_each_stream_decodes_only_existing_ids_and_its_beam_equals_exhaustive_scoring(space, variant):
    model = make_model(beam_size=N_ITEMS, **VARIANTS[variant])
    model.eval()
    history = make_batch().history
    vocab = model.vocabulary(space)
    with torch.no_grad():
        memory, mask = model.encode(history)
        start = model.starts(history)[space]
        found = model.search(space, memory, mask, start, N_ITEMS, None)
        every = model.sequence_log_prob(space, memory, mask, start, torch.arange(1, N_ITEMS + 1).expand(B, -1))
    assert ((found.items >= 1) & (found.items <= N_ITEMS)).all()
    assert torch.equal(found.codes, vocab.item_codes[found.items])  # every decoded ID is an item's ID
    torch.testing.assert_close(found.scores, every.sort(1, descending=True).values, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(found.scores, every.gather(1, found.items - 1), atol=1e-5, rtol=1e-5)


def test_each_loss_part_trains():
    model = make_model()
    batch = make_batch()

    def parts():
        torch.manual_seed(7)  # the same negatives and STT masks each time
        return model.loss(batch).parts

    before = parts()
    fit(model, batch, 40, 3e-3)
    after = parts()
    for name in before:
        assert after[name] < 0.9 * before[name], (name, before[name], after[name])


def test_gct_infonce_over_every_item_is_a_softmax_over_the_catalogue_and_masks_the_positive():
    model = make_model(gct_negatives=4096)  # more than the catalogue: every item is drawn, the positive too
    summary, target = torch.randn(B, 32), torch.randint(1, N_ITEMS + 1, (B,))
    for space in ("behavior", "semantic"):
        z = F.normalize(model.decoders[space].project(summary), dim=-1)
        vectors = F.normalize(model.get_buffer(f"vectors_{space}")[1:], dim=-1)
        expected = F.cross_entropy(z @ vectors.T / 0.3, target - 1, reduction="none")
        torch.testing.assert_close(model.gct_loss(space, summary, target), expected, atol=1e-5, rtol=1e-5)


def test_gct_infonce_samples_the_configured_number_of_negatives():
    model = make_model(gct_negatives=5)
    summary, target = torch.randn(B, 32), torch.randint(1, N_ITEMS + 1, (B,))
    torch.manual_seed(3)
    loss = model.gct_loss("semantic", summary, target)
    torch.manual_seed(3)
    negatives = torch.randperm(N_ITEMS)[:5] + 1
    z = F.normalize(model.decoders["semantic"].project(summary), dim=-1)
    vectors = model.get_buffer("vectors_semantic")
    logits = torch.cat([(z * vectors[target]).sum(-1, keepdim=True), z @ vectors[negatives].T], 1) / 0.3
    logits[:, 1:][negatives[None, :] == target[:, None]] = float("-inf")
    torch.testing.assert_close(loss, -logits.log_softmax(1)[:, 0])


def test_gct_smooth_l1_is_the_summed_smooth_l1_between_unit_vectors():
    model = make_model(gct="smooth_l1")
    summary, target = torch.randn(B, 32), torch.randint(1, N_ITEMS + 1, (B,))
    z = F.normalize(model.decoders["behavior"].project(summary), dim=-1)
    positive = F.normalize(two_spaces()["behavior"].vectors[target], dim=-1)
    diff = (z - positive).abs()
    expected = torch.where(diff < 1, 0.5 * diff ** 2, diff - 0.5).sum(-1)
    torch.testing.assert_close(model.gct_loss("behavior", summary, target), expected)
    assert set(model.loss(make_batch()).parts) >= {"gct_behavior", "gct_semantic"}


def test_stt_corruption_replaces_codes_with_others_of_their_level_at_the_ratio():
    torch.manual_seed(0)
    codes = torch.randint(0, 3, (2000, 3))
    codes[:, 2] = 0  # the last level has one code: it can never be replaced
    out = corrupted(codes, [3, 5, 1], 0.5)
    changed = out != codes
    assert (changed.sum(1) >= 1).all() and not changed[:, 2].any()
    assert (out[:, 0] < 3).all() and (out[:, 1] < 5).all()
    assert 0.5 < changed[:, :2].float().mean() < 0.7  # 0.5 each, plus one where none was drawn
    one = corrupted(codes, [3, 5, 1], 1e-6)  # almost never drawn: exactly one code per row
    assert ((one != codes).sum(1) == 1).all()
    with pytest.raises(ValueError, match="needs a level with more than one code"):
        corrupted(torch.zeros(2, 2, dtype=torch.long), [1, 1], 0.5)


def test_merge_keeps_the_best_copy_of_an_item_and_marks_items_both_streams_found():
    items = torch.tensor([[5, 7, 9, 7, 2, 1]])
    scores = torch.tensor([[-1.0, -2.0, -3.0, -0.5, -4.0, -9.0]])
    streams = torch.tensor([[0, 0, 0, 1, 1, 1]])
    out = merge_streams(items, scores, streams, 4)
    assert out.items.tolist() == [[7, 5, 9, 2]]
    assert out.scores.tolist() == [[-0.5, -1.0, -3.0, -4.0]]
    assert out.streams.tolist() == [[2, 0, 0, 1]]


def fused(fusion: str, **overrides):
    """A tiny model with ``fusion``, its fused top 5 for the tiny batch, the encoded batch and each
    stream's decoder start."""
    model = make_model(fusion=fusion, **overrides)
    model.eval()
    history = make_batch().history
    with torch.no_grad():
        return model, model.recommend_streams(Batch(history=history), 5), *model.encode(history), model.starts(history)


@pytest.mark.parametrize("last_item", [False, True])
@pytest.mark.parametrize("fusion", ["confidence", "sum"])
def test_fusions_rank_by_their_scores(fusion, last_item):
    model, rec, memory, mask, starts = fused(fusion, **(LAST_ITEM if last_item else {}))
    with torch.no_grad():
        logp = {s: model.sequence_log_prob(s, memory, mask, starts[s], rec.items) for s in ("behavior", "semantic")}
        tops = {s: model.search(s, memory, mask, starts[s], 5, None).items for s in ("behavior", "semantic")}
    if fusion == "sum":
        torch.testing.assert_close(rec.scores, logp["behavior"] + logp["semantic"], atol=1e-5, rtol=1e-5)
    else:  # the confidence of the stream that found it: its mean code log-probability
        conf = torch.stack([logp["behavior"] / 3, logp["semantic"] / 4])  # (2, B, k)
        found = torch.stack([(rec.items[:, :, None] == tops[s][:, None, :]).any(2) for s in ("behavior", "semantic")])
        torch.testing.assert_close(rec.scores, conf.masked_fill(~found, float("-inf")).max(0).values,
                                   atol=1e-5, rtol=1e-5)
    for row in range(B):  # each item comes from the stream(s) it says
        for item, stream in zip(rec.items[row].tolist(), rec.streams[row].tolist()):
            in_b, in_s = item in tops["behavior"][row].tolist(), item in tops["semantic"][row].tolist()
            assert stream == (2 if in_b and in_s else 0 if in_b else 1)
    assert (rec.scores[:, :-1] >= rec.scores[:, 1:]).all()


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.5, 1.0])
def test_a_fusion_weight_reranks_the_same_candidates_by_the_weighted_sum(weight):
    """fusion_weight w: the same 2k candidates, scored 2 (w log p_b + (1 - w) log p_s); at 0.5
    exactly the plain sum, and stream_candidates is what each fusion ranks."""
    model, rec, memory, mask, starts = fused("sum", fusion_weight=weight)
    with torch.no_grad():
        logp = {s: model.sequence_log_prob(s, memory, mask, starts[s], rec.items) for s in ("behavior", "semantic")}
        found = model.stream_candidates(Batch(history=make_batch().history), 5)
    torch.testing.assert_close(rec.scores, 2 * (weight * logp["behavior"] + (1 - weight) * logp["semantic"]),
                               atol=1e-5, rtol=1e-5)
    assert set(rec.items.flatten().tolist()) <= set(found.items.flatten().tolist())
    plain = found.log_probs["behavior"] + found.log_probs["semantic"]
    if weight == 0.5:
        assert torch.equal(found.summed(weight), plain)
    for space in ("behavior", "semantic"):  # the stream that found a candidate scores it by its beam score
        mine = found.streams == ("behavior", "semantic").index(space)
        torch.testing.assert_close(found.log_probs[space][mine], found.found_by[space].flatten())
    beams_only = model.stream_candidates(Batch(history=make_batch().history), 5, score_both=False)  # confidence's
    assert torch.equal(beams_only.items, found.items) and beams_only.log_probs is None
    with pytest.raises(ValueError, match="not scored in both streams"):
        beams_only.summed(weight)


def test_a_fusion_weight_is_selected_only_past_two_standard_errors_over_the_plain_sum():
    from benchmarks.eager_fusion_weight import best_weight, parse_weights, selected_weight
    table = {0.3: {"recall@10": 0.101}, 0.5: {"recall@10": 0.100}, 0.7: {"recall@10": 0.101}}
    assert best_weight(table, "recall@10") in (0.3, 0.7)
    assert best_weight({0.4: {"r": 1.0}, 0.9: {"r": 1.0}}, "r") == 0.4  # among equals, the nearest to 0.5
    assert selected_weight(0.3, {"recall@10": {"mean": 0.0021, "se": 0.001}}, "recall@10") == 0.3
    assert selected_weight(0.3, {"recall@10": {"mean": 0.0019, "se": 0.001}}, "recall@10") == 0.5
    assert parse_weights("1,0") == [0.0, 0.5, 1.0]
    for bad in ("0,1.5", "a", ""):
        with pytest.raises(ValueError, match="--weights must be comma-separated numbers in"):
            parse_weights(bad)


@pytest.mark.parametrize("space", ["behavior", "semantic"])
def test_one_stream_fusion_is_that_streams_beam(space):
    model, rec, memory, mask, starts = fused(space)
    assert torch.equal(rec.items, model.search(space, memory, mask, starts[space], 5, None).items)
    assert (rec.streams == ("behavior", "semantic").index(space)).all()


def test_one_stream_alone_trains_and_recommends_without_the_other_decoder(tmp_path):
    for bad, message in [(dict(streams="both_and_more"), "model.streams"),
                         (dict(streams="semantic", fusion="semantic"), "STT needs both .* set model.stt=false"),
                         (dict(streams="semantic", stt=False), "set model.fusion=semantic")]:
        with pytest.raises(ValueError, match=message):
            EagerConfig(**bad)
    batch = make_batch()
    for space, other in (("semantic", "behavior"), ("behavior", "semantic")):
        for encoder_input in ("item_ids", "codes"):
            model = make_model(streams=space, stt=False, fusion=space, encoder_input=encoder_input, **LAST_ITEM)
            assert set(model.decoders) == {space} and model.stt is None
            assert set(model.loss(batch).parts) == {f"gen_{space}", f"gct_{space}"}
            assert model.vector_dims[other] == 0  # no GCT projection for the stream it lacks
            first = model.loss(batch).total.item()
            fit(model, batch, 8, 3e-3)
            assert model.loss(batch).total.item() < 0.95 * first
            model.eval()
            rec = model.recommend_streams(Batch(history=batch.history), 5)
            assert (rec.streams == ("behavior", "semantic").index(space)).all()
            save_checkpoint(tmp_path / f"{space}-{encoder_input}", model, "eager")
            loaded = load_model(tmp_path / f"{space}-{encoder_input}")
            assert torch.equal(loaded.recommend(batch, 5).items, rec.items)
    new = torch.tensor([[3, 3, 3, 15]])
    make_model(streams="semantic", stt=False, fusion="semantic").register_items(torch.tensor([N_ITEMS + 1]),
                                                                                {"semantic": new})
    with pytest.raises(ValueError, match="trained its behavior stream alone .* semantic codes only"):
        make_model(streams="behavior", stt=False, fusion="behavior").register_items(torch.tensor([N_ITEMS + 1]),
                                                                                    {"semantic": new})


def test_code_token_inputs_read_each_item_by_its_codes_in_both_spaces():
    model = make_model(encoder_input="codes")
    assert model.item_emb is None
    history = make_batch().history
    model.eval()
    memory, _ = model.encode(history)
    twin = history.clone()
    twin[twin == 1] = 2  # items with other codes read differently
    assert not torch.allclose(memory, model.encode(twin)[0])
    assert model.loss(make_batch()).total.isfinite()


def test_the_last_item_path_starts_each_decoder_from_the_newest_item_and_is_off_for_an_empty_history():
    model = make_model(**LAST_ITEM)
    model.eval()
    history = make_batch().history
    with torch.no_grad():
        starts = model.starts(history)
        item = model.item_inputs(history[:, -1:])[:, 0]  # the newest item as the encoder reads it
        for space, decoder in model.decoders.items():
            torch.testing.assert_close(starts[space].token, decoder.bos + decoder.last_start(item))
            torch.testing.assert_close(starts[space].output, decoder.last_output(item))
        other = history.clone()
        other[:, -1] = other[:, -1] % N_ITEMS + 1  # another newest item, the rest alike
        assert not torch.allclose(starts["semantic"].token, model.starts(other)["semantic"].token)
        empty = model.starts(torch.zeros(2, MAX_LEN, dtype=torch.long))
        for space, decoder in model.decoders.items():  # nothing to read: BOS, no output term
            torch.testing.assert_close(empty[space].token, decoder.bos.expand(2, -1))
            assert not empty[space].output.any()
    # the output projection starts at zero: an untrained path scores as a model without it
    fresh, plain = Eager(EagerConfig(**TINY, last_item_output=True), N_ITEMS, MAX_LEN, ids=two_spaces()), make_model()
    fresh.load_state_dict(plain.state_dict(), strict=False)
    fresh.eval(), plain.eval()
    batch = make_batch()
    torch.testing.assert_close(fresh.recommend(batch, 5).scores, plain.recommend(batch, 5).scores)
    assert plain.decoders["semantic"].last_start is None and plain.decoders["semantic"].last_output is None
    model.train()
    model.loss(batch).total.backward()  # both projections of both streams learn from the loss
    for decoder in model.decoders.values():
        assert decoder.last_start.weight.grad.abs().sum() > 0 and decoder.last_output.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_checkpoint_recommends_the_same_and_refuses_to_train_without_its_vectors(tmp_path, variant):
    model = make_model(**VARIANTS[variant])
    model.eval()
    save_checkpoint(tmp_path / "ckpt", model, "eager")
    meta = json.loads((tmp_path / "ckpt" / "model.json").read_text())
    assert meta["context"]["vector_dims"] == {"behavior": 12, "semantic": 20}
    loaded = load_model(tmp_path / "ckpt")
    batch = make_batch()
    assert torch.equal(model.recommend(batch, 10).items, loaded.recommend(batch, 10).items)
    with pytest.raises(ValueError, match="GCT .* needs the behavior stream's item vectors"):
        loaded.loss(batch)


def test_a_checkpoint_loads_with_another_fusion_or_beam_and_refuses_any_other_change(tmp_path):
    """Inference settings (``Capabilities.inference_settings``) may change at load, as Serve's
    ``inference`` does; a key that would change what the weights mean may not."""
    model = make_model()
    model.eval()
    save_checkpoint(tmp_path / "ckpt", model, "eager")
    batch = make_batch()
    for fusion in ("behavior", "semantic", "confidence"):
        loaded = load_model(tmp_path / "ckpt", inference={"fusion": fusion, "beam_size": "12"})
        assert loaded.config.fusion == fusion and loaded.config.beam_size == 12
        model.config = dataclasses.replace(model.config, fusion=fusion, beam_size=12)
        assert torch.equal(model.recommend(batch, 10).items, loaded.recommend(batch, 10).items)
    loaded = load_model(tmp_path / "ckpt", inference={"fusion_weight": "0.8"})
    model.config = dataclasses.replace(model.config, fusion="sum", beam_size=10, fusion_weight=0.8)
    assert loaded.config.fusion_weight == 0.8 and torch.equal(model.recommend(batch, 10).scores,
                                                             loaded.recommend(batch, 10).scores)
    with pytest.raises(ValueError, match=r"\['d_model'\] cannot change once model.name='eager' is trained; its "
                                         r"inference settings are \['beam_size', 'fusion', 'fusion_weight', "
                                         r"'collision_scoring'\]"):
        load_model(tmp_path / "ckpt", inference={"d_model": 8})
    with pytest.raises(ValueError, match="model.fusion"):
        load_model(tmp_path / "ckpt", inference={"fusion": "both"})
    save_checkpoint(tmp_path / "behaviour", make_model(streams="behavior", fusion="behavior", stt=False), "eager")
    with pytest.raises(ValueError, match="model.streams=behavior trains one stream"):
        load_model(tmp_path / "behaviour", inference={"fusion": "sum"})


def test_the_behaviour_source_is_a_config_with_item_vectors_trained_without_validation_targets(tmp_path):
    from recsys.experiment import behavior_experiment, load_experiment

    def eager(*overrides):
        return load_experiment(None, ["model.name=eager", f"run.root={tmp_path}", *overrides])

    with pytest.raises(ValueError, match="decodes a behavior ID space: set behavior.config"):
        behavior_experiment(eager())
    for name in ("two_tower", "sasrec", "tiger"):
        (tmp_path / f"{name}.yaml").write_text(f"model:\n  name: {name}\n")
    assert behavior_experiment(eager(f"behavior.config={tmp_path / 'sasrec.yaml'}")).model_name == "sasrec"
    source = behavior_experiment(eager(f"behavior.config={tmp_path / 'two_tower.yaml'}",
                                       "behavior.overrides=[model.d_model=16]"))
    assert source.model_name == "two_tower" and source.model.d_model == 16 and source.run.root == str(tmp_path)
    with pytest.raises(ValueError, match="trains model.name='tiger', which exposes no item vectors"):
        behavior_experiment(eager(f"behavior.config={tmp_path / 'tiger.yaml'}"))
    with pytest.raises(ValueError, match="is a refit .* would leak them"):
        behavior_experiment(eager(f"behavior.config={tmp_path / 'sasrec.yaml'}",
                                  "behavior.overrides=[trainer.selection.refit=true]"))


def test_recsys_pipeline_trains_eager_on_behaviour_ids_from_a_two_tower_and_content_ids(tmp_path, monkeypatch,
                                                                                       capsys):
    """`recsys pipeline` with model.name=eager, in process: data -> embed -> content IDs, data ->
    two-tower -> behaviour IDs, -> EAGER -> evaluate. The sentence encoder is stood in for by fixed
    random content vectors (an embed run of the same shape). Then benchmarks/eager_fusions.py
    scores the checkpoint under every fusion."""
    import benchmarks.record
    import pipelines.stages
    from benchmarks.eager_fusions import main as fusions
    from pipelines.cli import main
    from recsys.runs import mark_complete, read_json, write_json
    from recsys.text import write_embeddings

    def fake_embed(exp, data_dir, parent):
        embed_dir = parent / "embed"
        embed_dir.mkdir()
        write_embeddings(embed_dir / "embeddings.parquet", np.arange(1, 41),
                         np.random.default_rng(0).normal(size=(40, 24)).astype(np.float32), "fake",
                         [str(i) for i in range(40)])
        write_json(embed_dir / "config.json", {"data_dir": str(data_dir)})
        (embed_dir / "summary.md").write_text("# embed (stand-in)\n")
        mark_complete(embed_dir, "embed")
        return embed_dir

    monkeypatch.setattr(pipelines.stages, "run_embed_stage", fake_embed)
    common = [f"run.root={tmp_path}", "data.synthetic.n_users=120", "data.synthetic.n_items=40",
              "data.max_history=6", "trainer.resources.use_ray=false", "trainer.resources.threads=1",
              "trainer.optim.epochs=1", "trainer.optim.batch_size=32"]
    (tmp_path / "two-tower.yaml").write_text("model:\n  name: two_tower\n  d_model: 16\n  n_layers: 1\n")
    tiny_eager = ["model.name=eager", "model.d_model=16", "model.n_heads=2", "model.n_decoder_layers=1",
                  "model.d_ff=32", "model.beam_size=20", "trainer.optim.epochs=2", "ids.method=hkmeans",
                  "ids.use_ray=false", "ids.hkmeans.branching=4", "ids.hkmeans.max_levels=2"]
    assert main(["pipeline", *common, *tiny_eager]) == 2  # no behaviour source: refused before any work
    assert "set behavior.config" in capsys.readouterr().err and not (tmp_path / "pipeline").exists()
    assert main(["pipeline", *common, *tiny_eager, f"behavior.config={tmp_path / 'two-tower.yaml'}",
                 f"behavior.overrides=[{','.join(common)}]"]) == 0
    (run_dir,) = (tmp_path / "pipeline").iterdir()
    stages = read_json(run_dir / "metrics.json")["stages"]
    assert set(stages) == {"data", "embed", "ids", "behavior", "train", "evaluate"}
    data_dir, train_dir = run_dir / "data", run_dir / "train"
    behavior, semantic = run_dir / "behavior" / "ids", run_dir / "ids"
    assert read_json(behavior / "config.json")["train_dir"] == str(run_dir / "behavior" / "train")
    assert all((Path(d) / "COMPLETE").is_file() and (Path(d) / "summary.md").is_file() for d in stages.values())
    assert read_json(run_dir / "behavior" / "train" / "config.json")["model"]["name"] == "two_tower"
    assert read_json(run_dir / "behavior" / "train" / "config.json")["data_dir"] == str(data_dir)
    assert read_json(train_dir / "config.json")["ids_dirs"] == {"semantic": str(semantic), "behavior": str(behavior)}
    epochs = [json.loads(line) for line in (train_dir / "epochs.jsonl").read_text().splitlines()]
    assert {"train_gen_behavior", "train_gct_semantic", "train_stt"} <= set(epochs[-1])
    model = load_model(train_dir / "checkpoints" / "best")
    assert model.vector_dims == {"behavior": 16, "semantic": 24}  # the two-tower's d_model, the content dim
    test = read_json(run_dir / "metrics.json")["test"]
    monkeypatch.setattr(benchmarks.record, "RESULTS", tmp_path / "results")
    fusions([str(train_dir / "checkpoints" / "best"), "--data", str(data_dir), "--name", "tiny", "--max-history", "6",
             "--threads", "1", "--latency-users", "5", "--valid-users", "30"])
    records = {f: read_json(tmp_path / "results" / "eager" / "synthetic" / f"tiny-{f}.json")
               for f in ("confidence", "sum", "behavior", "semantic")}
    for fusion, record in records.items():
        assert record["protocol"] == {"history": "kept", "refit": False, "selected_on": "valid"}
        assert set(record["metrics"]) == {"valid", "test"} and record["config"]["fusion"] == fusion
        assert sum(record["stream_share"]["test"].values()) == pytest.approx(1.0, abs=1e-3)
        assert record["config"]["valid_users"] == 30
        latency = record["latency_one_user"]
        assert latency["users"] == 5 and 0 < latency["p50_ms"] <= latency["p95_ms"]
    assert records["behavior"]["stream_share"]["valid"]["behavior"] == 1.0
    assert records["semantic"]["stream_share"]["valid"]["semantic"] == 1.0
    assert records["sum"]["metrics"]["test"] == {k: round(v, 4) for k, v in test.items()}  # as shipped
    from benchmarks.compare_paired import main as compare_paired  # every checkpoint under one inference setting
    best = str(train_dir / "checkpoints" / "best")
    compare_paired([f"a={best}", f"b={best}", "--data", str(data_dir), "--max-history", "6", "--threads", "1",
                    "--inference", "fusion=behavior", "--name", "tiny-behavior"])
    paired = read_json(tmp_path / "results" / "eager" / "synthetic" / "paired-tiny-behavior-history-kept.json")
    assert paired["config"]["inference"] == {"fusion": "behavior"}
    assert paired["means"]["a"] == paired["means"]["b"] == records["behavior"]["metrics"]["test"]
    with pytest.raises(SystemExit):
        compare_paired([f"a={best}", f"b={best}", "--data", str(data_dir), "--inference", "fusion"])
    from benchmarks.eager_fusion_weight import main as fusion_weight  # the sum's weight, chosen on validation
    fusion_weight([best, "--data", str(data_dir), "--max-history", "6", "--threads", "1", "--name", "tiny-weight",
                   "--weights", "0,0.25,1", "--plot", str(tmp_path / "weight.png")])
    weighed = read_json(tmp_path / "results" / "eager" / "synthetic" / "tiny-weight.json")
    table = {float(w): figures for w, figures in weighed["weights"].items()}
    assert sorted(table) == [0.0, 0.25, 0.5, 1.0] and (tmp_path / "weight.png").is_file()
    best_w, chosen = weighed["config"]["best_weight"], weighed["config"]["fusion_weight"]
    assert table[best_w]["recall@10"] == max(f["recall@10"] for f in table.values())
    gain = weighed["paired"]["valid"]["recall@10"]  # best minus the plain sum: selected only past 2 SE
    assert chosen == (best_w if gain["mean"] > 2 * gain["se"] else 0.5)
    assert weighed["metrics"]["valid"] == table[chosen]
    plain_test = {k: round(v, 4) for k, v in weighed["plain_sum_test"].items()}
    assert plain_test == records["sum"]["metrics"]["test"]  # w = 0.5 is the shipped sum, decoded once
    from recsys.data.schema import InteractionData
    from recsys.data.split import leave_one_out
    from recsys.metrics import per_user_metrics
    from recsys.training.evaluate import target_ranks_of
    valid_set = leave_one_out(InteractionData.load(data_dir), 6).eval_set("valid")
    plain_valid = per_user_metrics(target_ranks_of(load_model(best), valid_set))
    assert table[0.5] == {k: round(float(v.mean()), 5) for k, v in plain_valid.items()}  # recommend() agrees
    if best_w == 0.5:
        assert weighed["paired"]["test"]["recall@10"] == {"mean": 0.0, "se": 0.0}
    with pytest.raises(SystemExit):
        fusion_weight([best, "--data", str(data_dir), "--name", "x", "--weights", "0,2"])
    compare_paired([f"shipped={best}", f"behavior={best}@fusion=behavior", "--data", str(data_dir), "--max-history", "6",
                    "--threads", "1", "--name", "tiny-per-model"])  # one checkpoint under two settings
    paired = read_json(tmp_path / "results" / "eager" / "synthetic" / "paired-tiny-per-model-history-kept.json")
    assert paired["config"]["inference"] == {}
    assert paired["config"]["inference_per_model"] == {"behavior": {"fusion": "behavior"}}
    assert paired["means"]["shipped"] == records["sum"]["metrics"]["test"]
    assert paired["means"]["behavior"] == records["behavior"]["metrics"]["test"]
    for bad in (f"c={best}@fusion", "c=counts@fusion=sum"):
        with pytest.raises(SystemExit):
            compare_paired([f"a={best}", bad, "--data", str(data_dir)])
    compare_paired([f"shipped={best}", f"behavior={best}@fusion=behavior", "--data", str(data_dir), "--max-history", "6",
                    "--threads", "1", "--users", "10", "--users-seed", "3", "--name", "tiny-sample"])  # a user sample
    sample = read_json(tmp_path / "results" / "eager" / "synthetic" / "paired-tiny-sample-history-kept.json")
    assert sample["users"] == 10 and (sample["config"]["users_sample"], sample["config"]["users_seed"]) == (10, 3)
    assert paired["config"]["users_sample"] is None and paired["users"] > 10
    with pytest.raises(SystemExit):
        compare_paired([f"a={best}", f"b={best}", "--data", str(data_dir), "--users", str(paired["users"] + 1)])
    from benchmarks.newest_item_gain import main as newest
    newest([str(train_dir / "checkpoints" / "best"), "--data", str(data_dir), "--users", "40", "--max-history", "6",
            "--threads", "1", "--names", "tiny"])
    gains = read_json(tmp_path / "results" / "eager" / "synthetic" / "newest-tiny.json")["newest_item"]
    for split in ("valid", "test"):  # each gain is the paired difference of the two scorings
        for k in ("recall@10", "ndcg@10"):
            f = gains[split]
            assert f["gain"][k]["mean"] == pytest.approx(f["full"][k] - f["without newest"][k], abs=2e-4)
    assert records["confidence"]["paired"] is None  # the reference
    for fusion in ("sum", "behavior", "semantic"):  # paired against it: the difference of the means, with an SE
        paired = records[fusion]["paired"]
        assert paired["against"] == "confidence"
        for split in ("valid", "test"):
            for k in ("recall@10", "ndcg@10"):
                difference = records[fusion]["metrics"][split][k] - records["confidence"]["metrics"][split][k]
                assert paired[split][k]["mean"] == pytest.approx(difference, abs=2e-4) and paired[split][k]["se"] >= 0
    with pytest.raises(ValueError, match=r"give an ids run for \['behavior'\]"):
        pipelines.stages.run_train(load_experiment_of(train_dir), data_dir=data_dir, ids_dirs={"semantic": semantic})


def load_experiment_of(train_dir: Path):
    from recsys.experiment import experiment_dict_from_run, experiment_from_dict
    from recsys.runs import read_json

    return experiment_from_dict(experiment_dict_from_run(read_json(train_dir / "config.json")))


def test_an_ids_run_built_from_another_item_catalogue_is_refused(tmp_path):
    import shutil

    import pandas as pd

    from pipelines.stages import run_data
    from recsys.experiment import load_experiment
    from recsys.runs import write_json
    from recsys.training.session import check_ids_catalogue

    data = run_data(load_experiment(None, [f"run.root={tmp_path}", "data.synthetic.n_users=60",
                                           "data.synthetic.n_items=40"]))
    twin, other = tmp_path / "twin", tmp_path / "other"
    shutil.copytree(data, twin)  # another data run of the same catalogue
    shutil.copytree(data, other)
    items = pd.read_parquet(other / "items.parquet")
    items.loc[4, "raw_id"] = "someone-else"
    items.to_parquet(other / "items.parquet", index=False)

    def ids_run(name: str, source_data: Path | None, key: str) -> Path:
        source, ids = tmp_path / f"{name}-source", tmp_path / name
        source.mkdir()
        ids.mkdir()
        if source_data is not None:
            write_json(source / "config.json", {"data_dir": str(source_data)})
        write_json(ids / "config.json", {key: str(source)})
        return ids

    check_ids_catalogue({"semantic": ids_run("same", data, "embed_dir"), "behavior": ids_run("from-twin", twin, "train_dir"),
                         "hand-made": ids_run("unrecorded", None, "embed_dir")}, data)
    with pytest.raises(ValueError, match=r"behavior ids run .* item catalogue differs .* \(item 5: 'someone-else' there"):
        check_ids_catalogue({"behavior": ids_run("bad", other, "train_dir")}, data)
    with pytest.raises(ValueError, match="which is gone"):
        check_ids_catalogue({"semantic": ids_run("gone", tmp_path / "nowhere", "embed_dir")}, data)


def test_a_new_item_joins_with_semantic_codes_only_and_each_fusion_ranks_it_by_its_rule(tmp_path):
    model = make_model(fusion="sum")
    model.eval()
    new = torch.tensor([[3, 3, 3, 15]])  # collision code 15: free (the collision level has 16 tokens)
    with pytest.raises(ValueError, match=r"registers items with IDs in \['semantic'\] \(and optionally \['behavior'\]\)"):
        model.register_items(torch.tensor([N_ITEMS + 1]), {"behavior": torch.zeros(1, 3, dtype=torch.long)})
    model.register_items(torch.tensor([N_ITEMS + 1]), {"semantic": new})
    item = torch.tensor([N_ITEMS + 1])
    assert model.n_items == N_ITEMS + 1 and model.trained_items == N_ITEMS
    assert not model.vocabulary("behavior").has_id(item) and model.vocabulary("semantic").has_id(item)
    assert model.item_ids("behavior", item).tolist() == [[-1, -1, -1]]
    history = make_batch().history
    history[0, -1] = N_ITEMS + 1  # in a history too: read by its semantic codes
    memory, mask = model.encode(history)
    starts = model.starts(history)
    assert model.search("behavior", memory, mask, starts["behavior"], N_ITEMS, None).items.max() <= N_ITEMS  # never
    assert (model.search("semantic", memory, mask, starts["semantic"], N_ITEMS + 1, None).items
            == N_ITEMS + 1).any(1).all()
    semantic = model.sequence_log_prob("semantic", memory, mask, starts["semantic"], item.expand(B, 1))[:, 0]
    assert model.sequence_log_prob("behavior", memory, mask, starts["behavior"], item.expand(B, 1)).isinf().all()
    for fusion, expected in (("sum", semantic + semantic / 4 * 3), ("confidence", semantic / 4)):
        model.config = EagerConfig(**{**TINY, "fusion": fusion})
        rec = model.recommend_streams(Batch(history=history), N_ITEMS + 1)
        assert all(sorted(row) == list(range(1, N_ITEMS + 2)) for row in rec.items.tolist())  # the whole catalogue
        at = rec.items == N_ITEMS + 1
        torch.testing.assert_close(rec.scores[at], expected, atol=1e-5, rtol=1e-5)
        assert (rec.streams[at] == 1).all()  # found by the semantic stream alone
    # the encoder reads it by its semantic codes: other codes, other memory at that position
    twin = make_model()
    twin.eval()
    twin.register_items(torch.tensor([N_ITEMS + 1]), {"semantic": torch.tensor([[0, 1, 2, 15]])})
    assert not torch.allclose(model.encode(history)[0][0], twin.encode(history)[0][0])
    torch.testing.assert_close(model.encode(history)[0][1:], twin.encode(history)[0][1:])
    save_checkpoint(tmp_path / "ckpt", model, "eager")
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.trained_items == N_ITEMS and loaded.n_items == N_ITEMS + 1
    assert torch.equal(loaded.recommend(Batch(history=history), 10).items, model.recommend(Batch(history=history), 10).items)


def test_content_collision_scoring_ranks_a_registered_item_beside_the_item_whose_tuple_it_shares():
    """A new item on a taken content tuple takes an untrained collision token. Under
    ``collision_scoring=content`` that token scores 0 in both streams, so the new item ties with
    its sibling in the semantic stream and in every fusion's score of it."""
    model = make_model(collision_scoring="content")
    model.eval()
    sibling = 1
    codes = model.item_ids("semantic", torch.tensor([sibling]))[0].tolist()
    new_id, new = N_ITEMS + 1, torch.tensor([[*codes[:-1], 15]])
    model.register_items(torch.tensor([new_id]), {"semantic": new})
    history = make_batch().history
    memory, mask = model.encode(history)
    starts = model.starts(history)
    pair = torch.tensor([sibling, new_id]).expand(B, 2)
    content = model.sequence_log_prob("semantic", memory, mask, starts["semantic"], pair)
    torch.testing.assert_close(content[:, 0], content[:, 1])  # the same content codes, the collision token ignored
    found = model.search("semantic", memory, mask, starts["semantic"], N_ITEMS + 1, None)
    at = lambda item: found.scores[found.items == item]  # noqa: E731
    torch.testing.assert_close(at(new_id), at(sibling))
    torch.testing.assert_close(at(new_id), content[:, 1])
    # learned: the collision token's head scores it, and 15 was never a target
    model.config = dataclasses.replace(model.config, collision_scoring="learned")
    learned = model.sequence_log_prob("semantic", memory, mask, starts["semantic"], pair)
    assert (learned < content).all() and not torch.allclose(learned[:, 0], learned[:, 1])
    # sum: the stand-in for the behaviour stream counts the codes that carry a score (3 of 4, 2 of 3)
    model.config = dataclasses.replace(model.config, collision_scoring="content", fusion="sum")
    rec = model.recommend_streams(Batch(history=history), N_ITEMS + 1)
    torch.testing.assert_close(rec.scores[rec.items == new_id], content[:, 1] + content[:, 1] / 3 * 2)
    with pytest.raises(ValueError, match="model.collision_scoring"):
        EagerConfig(**{**TINY, "collision_scoring": "uniform"})


def test_prefix_outputs_score_each_child_by_its_own_node_and_a_registered_item_by_its_codes(tmp_path):
    """With ``prefix_outputs`` a level's logit adds h . e(node the token leads to from the prefix):
    one code under two parents scores by two vectors. An item registered later has no node of its
    own (its collision token leads to node 0, the zero row) and scores by its code head alone; a
    checkpoint carries the nodes as trained, so it reloads with the registration and decodes the same."""
    model = make_model(**PREFIX_OUTPUTS)
    model.eval()
    vocab, decoder = model.vocabulary("semantic"), model.decoders["semantic"]
    codes = vocab.item_codes[1:]
    parents = codes[:, 0].unique()
    assert len(parents) >= 2
    prefix = parents[:2, None]  # (2, 1): level 1 under two parents
    h = torch.randn(1, 32).expand(2, -1)
    logits = decoder.logits(vocab, h, prefix)
    child = vocab.child_nodes(prefix)  # (2, V)
    torch.testing.assert_close(logits[:, :child.shape[1]], decoder.heads[1](h)[:, :child.shape[1]]
                               + (decoder.out_nodes(child) * h[:, None]).sum(-1))
    known = (child[0] > 0) & (child[1] > 0)
    assert known.any() and not torch.allclose(logits[0, known], logits[1, known])  # same codes, own nodes
    plain = make_model()
    plain.eval()
    assert plain.decoders["semantic"].out_nodes is None
    new = torch.tensor([[3, 3, 3, 15]])  # collision code 15 was never a target: a new node, 0
    model.register_items(torch.tensor([N_ITEMS + 1]), {"semantic": new})
    assert vocab.item_nodes[N_ITEMS + 1, -1] == 0 and vocab.item_nodes[N_ITEMS + 1, 0] > 0
    h = torch.randn(1, 32)
    last = decoder.logits(vocab, h, new[:, :3])
    torch.testing.assert_close(last[0, 15], decoder.heads[3](h)[0, 15])
    history = make_batch().history
    history[0, -1] = N_ITEMS + 1
    save_checkpoint(tmp_path / "ckpt", model, "eager")
    loaded = load_model(tmp_path / "ckpt")
    for space in ("behavior", "semantic"):
        assert torch.equal(loaded.vocabulary(space).item_nodes, model.vocabulary(space).item_nodes)
    assert loaded.vocabulary("behavior").item_nodes[N_ITEMS + 1].tolist() == [0, 0, 0]  # no behaviour ID, no node
    batch = Batch(history=history)
    assert torch.equal(loaded.recommend(batch, N_ITEMS + 1).items, model.recommend(batch, N_ITEMS + 1).items)
