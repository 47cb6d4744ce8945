"""TIGER: shapes, the teacher-forced path against the beam-search path, causality, checkpoints,
and cold-start items registered after training."""

import json

import pytest
import torch

from recsys.models import IdTable, Batch, Tiger, TigerConfig, build_model, semantic_id_table
from recsys.semantic_ids import SemanticIdIndex
from recsys.training.checkpoint import load_model, save_checkpoint
from windows import tiny_windows

N_ITEMS, MAX_LEN, B = 40, 6, 8
TINY = dict(d_model=32, n_encoder_layers=1, n_decoder_layers=2, n_heads=2, head_dim=24, d_ff=64, dropout=0.1,
            beam_size=10)


def make_index(seed: int = 0) -> SemanticIdIndex:
    codes = torch.randint(0, 4, (N_ITEMS, 3), generator=torch.Generator().manual_seed(seed))
    return SemanticIdIndex(item_ids=torch.arange(1, N_ITEMS + 1), codes=codes, codebook_sizes=[4, 4, 4])


def make_model(seed: int = 0, index: SemanticIdIndex | None = None, **overrides) -> Tiger:
    index = index or make_index()
    sizes = index.level_sizes
    torch.manual_seed(seed)
    return Tiger(TigerConfig(**{**TINY, **overrides}), N_ITEMS, MAX_LEN, ids={"semantic": IdTable(semantic_id_table(index, N_ITEMS), sizes[:-1] + [sizes[-1] + 2])}).eval()  # room for two more collisions


def make_batch(seed: int = 0) -> Batch:
    return tiny_windows(N_ITEMS, MAX_LEN, B, seed)


def test_config_is_validated():
    with pytest.raises(ValueError, match="model.head_dim=0 is out of range"):
        TigerConfig(head_dim=0)
    with pytest.raises(ValueError, match="model.dropout=1.5 is out of range"):
        TigerConfig(dropout=1.5)
    model = Tiger(TigerConfig(), N_ITEMS, MAX_LEN, ids={"semantic": IdTable(semantic_id_table(make_index(), N_ITEMS))})
    attn = model.encoder[0].attn  # the paper's sizes: 6 heads of 64 = 384 wide, d_model 128
    assert attn.q.weight.shape == (384, 128) and attn.out.weight.shape == (128, 384)
    assert len(model.encoder) == len(model.decoder) == 4 and model.encoder[0].mlp[0].out_features == 1024


def test_the_semantic_id_table_is_checked():
    table = semantic_id_table(make_index(), N_ITEMS)
    cfg = TigerConfig(**TINY)
    with pytest.raises(ValueError, match=r"Tiger is built with the ID spaces \['semantic'\], got \[\]"):
        build_model("tiger", cfg, n_items=N_ITEMS, max_len=MAX_LEN)
    with pytest.raises(ValueError, match=r"built with the ID spaces \['semantic'\], got \['behavior', 'semantic'\]"):
        Tiger(cfg, N_ITEMS, MAX_LEN, ids={"semantic": IdTable(table), "behavior": IdTable(table)})
    with pytest.raises(ValueError, match=r"must be integer \(41, L \+ 1 >= 2\)"):
        Tiger(cfg, N_ITEMS, MAX_LEN, ids={"semantic": IdTable(table[:-1])})
    bad = table.clone()
    bad[0, 1] = 2
    with pytest.raises(ValueError, match="row 0"):
        Tiger(cfg, N_ITEMS, MAX_LEN, ids={"semantic": IdTable(bad)})
    bad = table.clone()
    bad[7] = bad[3]
    with pytest.raises(ValueError, match="already belongs to item"):
        Tiger(cfg, N_ITEMS, MAX_LEN, ids={"semantic": IdTable(bad)})
    with pytest.raises(ValueError, match="beyond level_sizes"):
        Tiger(cfg, N_ITEMS, MAX_LEN, ids={"semantic": IdTable(table, [4, 4, 3, 9])})


def test_shapes():
    model, batch = make_model(), make_batch()
    memory, mask = model.encode(batch.history)
    assert memory.shape == (B, MAX_LEN * 4, 32) and mask.shape == (B, 1, 1, MAX_LEN * 4)
    assert not mask[0, 0, 0, :8].any() and mask[0, 0, 0, 8:].all()  # two padded items = 8 tokens
    assert model.decoder_states(batch.history, model.item_codes[batch.target]).shape == (B, 4, 32)
    logp = model.token_log_probs(batch.history, batch.target)
    assert logp.shape == (B, 4) and (logp <= 0).all()
    assert model.loss(batch).total.shape == ()
    rec = model.recommend(batch, 7)
    assert rec.items.shape == rec.scores.shape == (B, 7)


def test_loss_targets_the_item_after_the_history_and_skips_empty_rows():
    model, batch = make_model(), make_batch()
    expected = -model.token_log_probs(batch.history, batch.targets[:, -1]).mean()
    torch.testing.assert_close(model.loss(batch).total, expected)
    torch.testing.assert_close(model.loss(Batch(history=batch.history, target=batch.target)).total, expected)
    targets = batch.targets.clone()
    targets[:2, -1] = 0
    torch.testing.assert_close(model.loss(Batch(history=batch.history, targets=targets)).total,
                               model.loss(Batch(history=batch.history[2:], targets=batch.targets[2:])).total)


def test_beam_scores_are_the_teacher_forced_log_probabilities():
    """The cached, beam-folded decoding path and the training path agree."""
    model, batch = make_model(), make_batch()
    rec = model.recommend(batch, 10)
    assert ((rec.items >= 1) & (rec.items <= N_ITEMS)).all()
    assert (rec.scores[:, :-1] >= rec.scores[:, 1:]).all()
    for j in range(10):
        torch.testing.assert_close(rec.scores[:, j], model.token_log_probs(batch.history, rec.items[:, j]).sum(1))


def test_a_beam_as_wide_as_the_catalogue_ranks_exactly():
    model, batch = make_model(beam_size=N_ITEMS), make_batch()
    assert_beam_is_exhaustive_scoring(model, batch, 15)


def assert_beam_is_exhaustive_scoring(model: Tiger, batch: Batch, k: int) -> None:
    """The top-k of a catalogue-wide beam equals scoring every item by teacher forcing."""
    items = torch.arange(1, N_ITEMS + 1)
    exact = torch.stack([model.token_log_probs(batch.history, items[i].expand(B)).sum(1) for i in range(N_ITEMS)], 1)
    top = exact.topk(k, dim=1)
    rec = model.recommend(batch, k)
    assert torch.equal(rec.items, items[top.indices])
    torch.testing.assert_close(rec.scores, top.values)


def test_the_decoder_never_reads_later_target_tokens():
    model, batch = make_model(), make_batch()
    codes = model.item_codes[batch.target]  # (B, 4)
    states = model.decoder_states(batch.history, codes)
    for j in range(3):  # position p reads BOS and codes[:, :p]
        changed = codes.clone()
        changed[:, j:] = (changed[:, j:] + 1) % torch.tensor(model.level_sizes[j:])
        other = model.decoder_states(batch.history, changed)
        torch.testing.assert_close(states[:, :j + 1], other[:, :j + 1])
        assert not torch.allclose(states[:, j + 1:], other[:, j + 1:])


def test_save_load_round_trip_rebuilds_table_and_trie(tmp_path):
    model, batch = make_model(), make_batch()
    save_checkpoint(tmp_path / "ckpt", model, "tiger")
    meta = json.loads((tmp_path / "ckpt" / "model.json").read_text())
    assert meta["context"] == {"id_spaces": {"semantic": {"shape": [N_ITEMS + 1, 4], "level_sizes": model.level_sizes}}}
    loaded = load_model(tmp_path / "ckpt")
    assert torch.equal(loaded.item_codes, model.item_codes)
    assert all(torch.equal(a, b) for a, b in zip(loaded.vocab.trie.table, model.vocab.trie.table))
    a, b = model.recommend(batch, 10, exclude_history=True), loaded.recommend(batch, 10, exclude_history=True)
    assert torch.equal(a.items, b.items)
    torch.testing.assert_close(a.scores, b.scores)


def test_loading_weights_rebuilds_the_trie_from_the_loaded_table():
    source = make_model()
    shuffled = source.item_codes.clone()
    shuffled[1:] = shuffled[1:][torch.randperm(N_ITEMS, generator=torch.Generator().manual_seed(0))]
    target = Tiger(source.config, N_ITEMS, MAX_LEN, ids={"semantic": IdTable(shuffled, source.level_sizes)})
    assert not torch.equal(target.vocab.trie.table.leaf_item, source.vocab.trie.table.leaf_item)
    target.load_state_dict(source.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(target.vocab.trie.table, source.vocab.trie.table))


def test_cold_start_items_are_decodable_without_retraining(tmp_path):
    index = make_index()
    model, batch = make_model(index=index), make_batch()
    before = {k: v.clone() for k, v in model.state_dict().items() if k != "vocabs.semantic.item_codes"}
    # item 41 reuses the content codes of the model's favourite for row 0; 42 is new content
    favourite = model.recommend(batch, 1).items[0, 0].item()
    new_ids = index.add_many([41, 42], torch.tensor([list(index.id_of(favourite)[:-1]), [3, 3, 3]]))
    assert 41 not in model.recommend(batch, N_ITEMS).items
    model.register_items([42, 41], {"semantic": new_ids.flip(0)})
    assert model.n_items == 42 and torch.equal(model.item_codes[41:], new_ids)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # no weight changed
    everything = model.recommend(batch, 42)  # beam >= catalogue: exhaustive
    assert all(sorted(row) == list(range(1, 43)) for row in everything.items.tolist())
    torch.testing.assert_close(everything.scores[everything.items == 41],
                               model.token_log_probs(batch.history, torch.full((B,), 41)).sum(1))
    with_new = batch.history.clone()
    with_new[:, -1] = 42  # new items can sit in histories too
    assert ((model.recommend(Batch(history=with_new), 5).items >= 1)).all()
    save_checkpoint(tmp_path / "ckpt", model, "tiger")
    assert torch.equal(load_model(tmp_path / "ckpt").recommend(batch, 42).items, everything.items)


def test_bad_registrations_change_nothing():
    model = make_model()
    table = model.item_codes.clone()
    with pytest.raises(ValueError, match="must be exactly 41..41"):
        model.register_items([50], {"semantic": table[1:2] + 1})
    with pytest.raises(ValueError, match="already belongs to item 5"):
        model.register_items([41], {"semantic": table[5:6]})
    with pytest.raises(ValueError, match="beyond level_sizes"):
        model.register_items([41], {"semantic": torch.tensor([[4, 0, 0, 0]])})
    assert model.n_items == N_ITEMS and torch.equal(model.item_codes, table)
    assert len(model.vocab.trie.table.leaf_item[model.vocab.trie.table.leaf_item > 0]) == N_ITEMS


def test_collision_level_has_room_for_cold_items_on_taken_tuples():
    index = make_index()
    observed = index.level_sizes[-1]
    table = semantic_id_table(index, N_ITEMS)
    model = Tiger(TigerConfig(**TINY), N_ITEMS, MAX_LEN, ids={"semantic": IdTable(table)}).eval()
    assert model.level_sizes[-1] == 16 > observed  # collision_vocab, default 16
    # a new item on the most crowded content tuple gets a collision code no training ID used
    crowded = next(i for i in range(1, N_ITEMS + 1) if index.id_of(i)[-1] == observed - 1)
    full = index.add_many([N_ITEMS + 1], [list(index.id_of(crowded)[:-1])])
    assert int(full[0, -1]) == observed
    model.register_items([N_ITEMS + 1], {"semantic": full})
    assert model.n_items == N_ITEMS + 1
    small = Tiger(TigerConfig(**TINY, collision_vocab=1), N_ITEMS, MAX_LEN, ids={"semantic": IdTable(table)})
    assert small.level_sizes[-1] == observed  # never below what the IDs use


def test_content_collision_scoring_ranks_a_registered_item_with_its_siblings():
    index = make_index()
    model = make_model(index=index, collision_scoring="content")
    sibling = 7
    full = index.add_many([N_ITEMS + 1], [list(index.id_of(sibling)[:-1])])  # same content codes, new collision code
    model.register_items([N_ITEMS + 1], {"semantic": full})
    batch = make_batch()
    out = model.recommend(batch, N_ITEMS + 1)  # beam >= catalogue: every item scored exactly
    score = {int(i): float(s) for i, s in zip(out.items[0], out.scores[0])}
    assert score[N_ITEMS + 1] == pytest.approx(score[sibling])
    model.config.collision_scoring = "learned"
    learned = model.recommend(batch, N_ITEMS + 1)
    score = {int(i): float(s) for i, s in zip(learned.items[0], learned.scores[0])}
    assert score[N_ITEMS + 1] != pytest.approx(score[sibling])  # the untrained collision token's own log-prob
    with pytest.raises(ValueError, match="collision_scoring"):
        TigerConfig(collision_scoring="uniform")


def test_the_user_token_conditions_on_the_hashed_user_and_is_required():
    from recsys.models.tiger import user_buckets

    with pytest.raises(ValueError, match="model.user_tokens=-1 is out of range"):
        TigerConfig(user_tokens=-1)
    model, batch = make_model(user_tokens=5), make_batch()
    assert model.user_emb.num_embeddings == 5
    with pytest.raises(ValueError, match=r"model.user_tokens=5\): batch.users must give the user index of each of the 8"):
        model.recommend(batch, 5)
    buckets = user_buckets(torch.arange(1000), 5)
    assert buckets.min() == 0 and buckets.max() == 4 and torch.bincount(buckets).min() > 150  # spread evenly
    same = Batch(history=batch.history[:1].expand(2, -1), target=batch.target[:1].expand(2))
    users = torch.tensor([0, int(torch.nonzero(buckets != buckets[0])[0])])  # two users in different buckets
    logp = model.token_log_probs(same.history, same.target, users)
    assert not torch.allclose(logp[0], logp[1])  # same history, different user: different scores
    twin = torch.tensor([0, int(torch.nonzero(buckets == buckets[0])[1])])  # a hash collision shares the token
    logp = model.token_log_probs(same.history, same.target, twin)
    torch.testing.assert_close(logp[0], logp[1])
    # decoding reads the user too: beam scores are the teacher-forced log-probabilities
    batch.users = torch.arange(B) * 7
    rec = model.recommend(batch, 6)
    for j in range(6):
        torch.testing.assert_close(rec.scores[:, j], model.token_log_probs(batch.history, rec.items[:, j], batch.users).sum(1))
    with pytest.raises(ValueError, match="user indices must be >= 0"):
        model.recommend(Batch(history=batch.history, users=-batch.users - 1), 5)


def test_prefix_embeddings_number_each_distinct_prefix_once():
    from recsys.models.vocabulary import prefix_node_table

    table = torch.tensor([[0, 0, 0], [1, 2, 0], [1, 3, 0], [0, 2, 0], [1, 2, 1]])
    nodes = prefix_node_table(table)
    assert nodes[0].tolist() == [0, 0, 0]  # padding
    # level 0: prefixes (0,), (1,) -> 1, 2; level 1: (0,2), (1,2), (1,3) -> 3, 4, 5; level 2: one node per item
    assert nodes[1:, 0].tolist() == [2, 2, 1, 2]
    assert nodes[1:, 1].tolist() == [4, 5, 3, 4]
    assert sorted(nodes[1:, 2].tolist()) == [6, 7, 8, 9]
    with pytest.raises(ValueError, match="model.prefix_embeddings must be true or false"):
        TigerConfig(prefix_embeddings="yes")


def test_prefix_embeddings_give_each_history_item_its_own_representation():
    index = make_index()
    plain, model = make_model(index=index), make_model(index=index, prefix_embeddings=True)
    assert plain.node_emb is None and model.node_emb.num_embeddings == int(model.vocab.item_nodes.max()) + 1
    # two items whose codes differ only in the collision level: the plain model tells them apart by
    # that one code; with prefix embeddings their last-level nodes differ too
    batch = make_batch()
    with torch.no_grad():
        model.node_emb.weight[1:] = 0
        base = model.encode(batch.history)[0]
        model.node_emb.weight[int(model.vocab.item_nodes[batch.history[0, -1], 1])] = 1.0
        moved = model.encode(batch.history)[0]
    assert not torch.allclose(base[0], moved[0])
    users_without = [r for r in range(B) if (model.vocab.item_nodes[batch.history[r]][:, 1]
                                              != model.vocab.item_nodes[batch.history[0, -1], 1]).all()]
    torch.testing.assert_close(base[users_without], moved[users_without])  # only histories holding it change


def test_prefix_embeddings_survive_registration_and_a_checkpoint(tmp_path):
    index = make_index()
    model, batch = make_model(index=index, prefix_embeddings=True), make_batch()
    nodes = model.vocab.item_nodes.clone()
    sibling = 7  # a new item on item 7's content codes shares its content prefixes, not its full ID
    full = index.add_many([N_ITEMS + 1, N_ITEMS + 2], [list(index.id_of(sibling)[:-1]), [3, 3, 3]])
    model.register_items([N_ITEMS + 1, N_ITEMS + 2], {"semantic": full})
    assert torch.equal(model.vocab.item_nodes[:N_ITEMS + 1], nodes)  # trained items keep their nodes
    new = model.vocab.item_nodes[N_ITEMS + 1]
    assert new[:3].tolist() == nodes[sibling, :3].tolist() and new[3] == 0  # unseen full ID: no embedding
    other = model.vocab.item_nodes[N_ITEMS + 2]
    assert all(n == 0 or n in nodes[1:, l].tolist() for l, n in enumerate(other.tolist()))
    assert model.node_emb.weight[0].abs().sum() == 0
    save_checkpoint(tmp_path / "ckpt", model, "tiger")
    loaded = load_model(tmp_path / "ckpt")
    assert torch.equal(loaded.vocab.item_nodes, model.vocab.item_nodes)
    with_new = batch.history.clone()
    with_new[:, -1] = N_ITEMS + 1
    a, b = model.recommend(Batch(history=with_new), 8), loaded.recommend(Batch(history=with_new), 8)
    assert torch.equal(a.items, b.items)
    torch.testing.assert_close(a.scores, b.scores)


def test_prefix_dropout_drops_whole_items_prefix_embeddings_in_training_only():
    with pytest.raises(ValueError, match="model.prefix_dropout=1.5 is out of range"):
        TigerConfig(prefix_dropout=1.5)
    batch = make_batch()
    model = make_model(prefix_embeddings=True, prefix_dropout=1.0, dropout=0.0)
    plain = make_model(prefix_embeddings=True, dropout=0.0)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        plain.node_emb.weight.zero_()
    model.train()
    torch.testing.assert_close(model.encode(batch.history)[0], plain.encode(batch.history)[0])  # all dropped
    model.eval()
    assert not torch.allclose(model.encode(batch.history)[0], plain.encode(batch.history)[0])  # all read
    half = make_model(prefix_embeddings=True, prefix_dropout=0.5, dropout=0.0).train()
    torch.manual_seed(0)
    a = half.encode(batch.history)[0]
    torch.manual_seed(1)
    assert not torch.allclose(a, half.encode(batch.history)[0])  # a fresh draw per forward pass


def make_output_model(**overrides) -> Tiger:
    """Prefix outputs with node embeddings large enough to move the ranking (init is std 0.02)."""
    model = make_model(prefix_embeddings=True, prefix_outputs=True, **overrides)
    with torch.no_grad():
        model.node_emb.weight.mul_(50)
    return model


def test_prefix_outputs_need_prefix_embeddings_and_are_validated():
    with pytest.raises(ValueError, match="model.prefix_outputs=true .* needs model.prefix_embeddings=true"):
        TigerConfig(prefix_outputs=True)
    with pytest.raises(ValueError, match="model.prefix_outputs must be true or false"):
        TigerConfig(prefix_embeddings=True, prefix_outputs=1)
    with pytest.raises(ValueError, match="model.prefix_output_dropout=2 is out of range"):
        TigerConfig(prefix_output_dropout=2)


def test_prefix_outputs_add_each_childs_own_node_embedding_to_its_logit():
    model, batch = make_output_model(), make_batch()
    codes, nodes = model.item_codes, model.vocab.item_nodes
    h = model.decoder_states(batch.history, codes[batch.target])  # (B, L + 1, D)
    for item in (1, 17, N_ITEMS):
        for level in range(model.n_tokens):
            prefix = codes[item, :level].expand(B, level)
            token, node = int(codes[item, level]), int(nodes[item, level])  # looked up by the item itself
            extra = model.logits(h[:, level], prefix)[:, token] - model.heads[level](h[:, level])[:, token]
            torch.testing.assert_close(extra, h[:, level] @ model.node_emb.weight[node])


def test_prefix_outputs_beam_search_is_exact_and_matches_teacher_forcing():
    model, batch = make_output_model(beam_size=N_ITEMS), make_batch()
    plain = make_model(prefix_embeddings=True, beam_size=N_ITEMS)
    plain.load_state_dict(model.state_dict())
    assert_beam_is_exhaustive_scoring(model, batch, 15)
    assert not torch.equal(model.recommend(batch, 15).items, plain.recommend(batch, 15).items)  # the node term changes the ranking


def test_prefix_outputs_score_registered_items_by_their_codes_and_survive_a_checkpoint(tmp_path):
    index = make_index()
    model, batch = make_output_model(index=index), make_batch()
    full = index.add_many([N_ITEMS + 1], [list(index.id_of(7)[:-1])])  # item 7's content codes, new collision
    model.register_items([N_ITEMS + 1], {"semantic": full})
    codes = model.item_codes[N_ITEMS + 1]
    h = model.decoder_states(batch.history, codes.expand(B, -1))
    last = model.n_tokens - 1
    prefix, token = codes[:last].expand(B, last), int(codes[last])
    torch.testing.assert_close(model.logits(h[:, last], prefix)[:, token], model.heads[last](h[:, last])[:, token])
    save_checkpoint(tmp_path / "ckpt", model, "tiger")
    loaded = load_model(tmp_path / "ckpt")
    a, b = model.recommend(batch, 8), loaded.recommend(batch, 8)
    assert torch.equal(a.items, b.items)
    torch.testing.assert_close(a.scores, b.scores)
    assert N_ITEMS + 1 in model.recommend(batch, N_ITEMS + 1).items  # decodable


def test_separate_prefix_output_table_scores_children_while_the_encoder_reads_the_shared_one(tmp_path):
    with pytest.raises(ValueError, match="model.prefix_output_table=separate .* needs model.prefix_outputs=true"):
        TigerConfig(prefix_embeddings=True, prefix_output_table="separate")
    with pytest.raises(ValueError, match="model.prefix_output_table"):
        TigerConfig(prefix_embeddings=True, prefix_outputs=True, prefix_output_table="tied")
    shared, batch = make_output_model(dropout=0.0), make_batch()
    assert shared.out_node_emb is None and shared.output_nodes is shared.node_emb
    model = make_output_model(prefix_output_table="separate", dropout=0.0)
    assert model.output_nodes is model.out_node_emb and model.out_node_emb.weight.shape == model.node_emb.weight.shape
    torch.testing.assert_close(model.out_node_emb.weight[0], torch.zeros(model.config.d_model))  # no node: no term
    with torch.no_grad():
        model.out_node_emb.weight.mul_(50)
    codes, nodes = model.item_codes, model.vocab.item_nodes
    h = model.decoder_states(batch.history, codes[batch.target])
    for level in range(model.n_tokens):
        prefix = codes[1, :level].expand(B, level)
        token, node = int(codes[1, level]), int(nodes[1, level])
        extra = model.logits(h[:, level], prefix)[:, token] - model.heads[level](h[:, level])[:, token]
        torch.testing.assert_close(extra, h[:, level] @ model.out_node_emb.weight[node])
    # the encoder still reads node_emb: changing the output table leaves the memory as it was
    memory = model.encode(batch.history)[0]
    with torch.no_grad():
        model.out_node_emb.weight.add_(1.0)
    torch.testing.assert_close(model.encode(batch.history)[0], memory)
    model.train()
    model.loss(batch).total.backward()
    assert model.out_node_emb.weight.grad.abs().sum() > 0 and model.node_emb.weight.grad.abs().sum() > 0
    model.eval()
    save_checkpoint(tmp_path / "ckpt", model, "tiger")
    loaded = load_model(tmp_path / "ckpt")
    a, b = model.recommend(batch, 8), loaded.recommend(batch, 8)
    assert torch.equal(a.items, b.items)
    torch.testing.assert_close(a.scores, b.scores)


def test_prefix_output_dropout_leaves_the_code_heads_alone_in_training_only():
    batch = make_batch()
    model = make_output_model(prefix_output_dropout=1.0, dropout=0.0, prefix_dropout=0.0)
    heads_only = make_model(prefix_embeddings=True, dropout=0.0)
    heads_only.load_state_dict(model.state_dict())
    model.train(), heads_only.train()
    torch.testing.assert_close(model.loss(batch).total, heads_only.loss(batch).total)
    model.eval(), heads_only.eval()
    assert not torch.allclose(model.loss(batch).total, heads_only.loss(batch).total)


def test_last_item_start_adds_the_newest_items_own_embedding_to_the_decoder_start():
    with pytest.raises(ValueError, match="model.last_item_start must be true or false"):
        TigerConfig(last_item_start="yes")
    plain = make_model(prefix_embeddings=True, dropout=0.0)
    assert plain.last_item_proj is None
    torch.testing.assert_close(plain.start(make_batch().history).token, plain.bos.expand(B, -1))
    assert plain.start(make_batch().history).output is None
    model, batch = make_model(prefix_embeddings=True, prefix_dropout=1.0, last_item_start=True, dropout=0.0,
                              beam_size=N_ITEMS), make_batch()
    history = batch.history.clone()
    history[0] = 0  # an empty history starts from BOS alone
    start = model.start(history).token
    torch.testing.assert_close(start[0], model.bos)
    torch.testing.assert_close(start[1], model.bos + model.last_item_proj(last_item_embedding(model, history[1, -1])))
    # only the newest item enters the start token; older items reach the decoder through the memory alone
    older = history.clone()
    older[:, :-1] = torch.roll(history[:, :-1], 1, dims=0)
    torch.testing.assert_close(model.start(older).token[1:], start[1:])
    # training: prefix dropout drops the encoder's node embeddings, never the start token's
    model.train()
    torch.testing.assert_close(model.start(history).token, start)
    model.loss(batch).total.backward()
    assert model.last_item_proj.weight.grad.abs().sum() > 0
    model.eval()
    assert_beam_is_exhaustive_scoring(model, batch, 15)


def last_item_embedding(model, item):
    """The sum of an item's token and node embeddings, as the last-item paths read it."""
    codes, nodes = model.item_codes[item], model.vocab.item_nodes[item]
    return model.token_emb(model.vocab.tokens(codes)).sum(0) + model.node_emb(nodes).sum(0)


def test_last_item_output_adds_a_zero_initialised_projection_to_every_output_state():
    with pytest.raises(ValueError, match="model.last_item_output must be true or false"):
        TigerConfig(last_item_output=1)
    plain = make_model(prefix_embeddings=True, prefix_outputs=True, dropout=0.0, beam_size=N_ITEMS)
    model = make_model(prefix_embeddings=True, prefix_outputs=True, last_item_output=True, dropout=0.0,
                       beam_size=N_ITEMS)
    # the same weights but the new projection, which starts at zero: the same states as without it
    missing = model.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["last_item_out.bias", "last_item_out.weight"]
    batch = make_batch()
    model.eval(), plain.eval()
    codes = model.item_codes[batch.target]
    torch.testing.assert_close(model.decoder_states(batch.history, codes), plain.decoder_states(batch.history, codes))
    with torch.no_grad():
        model.last_item_out.weight.normal_(0, 0.1)
        model.last_item_out.bias.normal_(0, 0.1)
    history = batch.history.clone()
    history[0] = 0  # an empty history adds nothing
    skip = model.start(history).output
    torch.testing.assert_close(skip[0], torch.zeros_like(skip[0]))
    torch.testing.assert_close(skip[1], model.last_item_out(last_item_embedding(model, history[1, -1])))
    # every level's output state gains it (the start token does not: last_item_start is off)
    base = model.decoder_states(history, codes) - skip[:, None]
    torch.testing.assert_close(model.start(history).token, model.bos.expand(len(history), -1))
    model.last_item_out.weight.data.zero_(), model.last_item_out.bias.data.zero_()
    torch.testing.assert_close(base, model.decoder_states(history, codes))
    model.last_item_out.weight.data.normal_(0, 0.1)
    model.train()
    model.loss(batch).total.backward()
    assert model.last_item_out.weight.grad.abs().sum() > 0
    model.eval()
    assert_beam_is_exhaustive_scoring(model, batch, 15)
