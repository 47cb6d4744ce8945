"""TWIN / TWIN-V2 ranker: GSU/ESU against references, no leakage of the target, the training
lists, the retriever holdout, and `recsys rank` end to end on a tiny synthetic run."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.candidates import CandidateSet
from recsys.data import SyntheticConfig, generate_synthetic
from recsys.data.split import leave_one_out
from recsys.models import Batch, build_model, model_config_from_dict
from recsys.training.evaluate import ranker_scores
from recsys.training.ranker import random_negatives, training_lists

pytestmark = pytest.mark.usefixtures("one_thread")
N_ITEMS = 50


def make(config: dict, vectors: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    name, cfg = model_config_from_dict(config)
    item_vectors = torch.randn(N_ITEMS + 1, 6, generator=torch.Generator().manual_seed(1)) if vectors else None
    return build_model(name, cfg, n_items=N_ITEMS, max_len=20, **({"item_vectors": item_vectors} if vectors else {}))


def batch(rows: int = 3, length: int = 40, cands: int = 6, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(1, N_ITEMS + 1, (rows, length), generator=g)
    history[0, :length // 2] = 0  # a shorter history
    candidates = torch.randint(1, N_ITEMS + 1, (rows, cands), generator=g)
    return Batch(history=history, candidates=candidates, candidate_ranks=torch.arange(cands).expand(rows, -1),
                 candidate_scores=torch.randn(rows, cands, generator=g))


def reference_alpha(model, b: Batch):
    """TWIN's alpha (B, C, M, H) written out from its parts, and the entries' keys and validity."""
    b = model.prepare(b)
    query = model.embed(b.candidates)
    keys = model.embed(b.long_items, b.long_vectors)
    alpha = model.long_attn.logits(query, keys)
    length = b.long_sizes.sum(1, keepdim=True).float()
    gap = (length - b.long_positions).clamp(min=1).log2().floor().long().clamp(0, model.config.gap_buckets)
    sim = torch.einsum("bcv,bmv->bcm", torch.nn.functional.normalize(model.item_vectors[b.candidates], dim=-1),
                       torch.nn.functional.normalize(b.long_vectors, dim=-1))
    cross = torch.cat([model.gap_emb(gap)[:, None].expand(-1, query.shape[1], -1, -1), sim[..., None]], -1)
    w = torch.cat([model.cross_gap.weight, model.cross_sim.weight], 1)  # (K_c W_c) β as one linear map
    alpha = alpha + cross @ w.T + model.cross_gap.bias
    if model.config.history == "clusters":
        alpha = alpha + b.long_sizes.clamp(min=1).float().log()[:, None, :, None]
    return alpha, keys, b.long_sizes > 0


def full_attention_reference(model, b: Batch) -> torch.Tensor:
    """ESU over every entry (no GSU)."""
    alpha, keys, valid = reference_alpha(model, b)
    return model.long_attn.pool(alpha, model.long_attn.values(keys), valid)


@pytest.mark.parametrize("name", ["twin", "twin_v2"])
def test_gsu_keeping_everything_equals_full_target_attention(name):
    model = make({"name": name, "top_k": 1000, "gamma": 4}).eval()
    b = model.prepare(batch())
    with torch.no_grad():
        torch.testing.assert_close(model.long_interest(b, model.embed(b.candidates)), full_attention_reference(model, b))
        keys, alpha, top = model.gsu(b, model.embed(b.candidates))
        assert top is None  # k covers every entry: ESU attends them in place
        B, C, M, _ = alpha.shape
        every = torch.arange(M).expand(B, C, M)  # the gathered path, keeping all M
        torch.testing.assert_close(model.esu(b, keys, alpha, every), model.esu(b, keys, alpha, None))


def test_gsu_keeps_the_most_relevant_entries():
    model = make({"name": "twin", "top_k": 1}).eval()
    b = model.prepare(batch())
    with torch.no_grad():
        one = model.long_interest(b, model.embed(b.candidates))  # (B, C, D)
        alpha, keys, valid = reference_alpha(model, b)
        best = alpha.mean(-1).masked_fill(~valid[:, None], float("-inf")).argmax(-1)  # (B, C)
        values = model.long_attn.values(keys)  # (B, M, H, hd)
        for row in range(len(b.history)):
            for c in range(b.candidates.shape[1]):  # one entry kept: its softmax weight is 1
                expected = model.long_attn.out(values[row, best[row, c]].flatten())
                torch.testing.assert_close(one[row, c], expected)
        model.config.top_k = 5
        assert not torch.allclose(model.long_interest(b, model.embed(b.candidates)), one)


def test_twin_v2_adds_ln_n_to_the_relevance_of_a_cluster():
    v2 = make({"name": "twin_v2", "gamma": 5, "top_k": 1000}).eval()
    b = v2.prepare(batch())
    assert (b.long_sizes > 1).any()
    twin = make({"name": "twin", "top_k": 1000}).eval()
    twin.load_state_dict(v2.state_dict())
    with torch.no_grad():
        with_ln_n, _, _ = reference_alpha(v2, b)
        without, _, _ = reference_alpha(twin, b)  # the same clusters, scored as TWIN would
        ln_n = b.long_sizes.clamp(min=1).float().log()[:, None, :, None]
        torch.testing.assert_close(with_ln_n - without, ln_n.expand_as(without))
        assert not torch.allclose(v2.long_interest(b, v2.embed(b.candidates)),
                                  twin.long_interest(b, twin.embed(b.candidates)))


def test_clusters_are_of_the_events_before_the_target_only():
    """No leakage: the clusters (and scores) for a validation example depend on s[:n-2] only."""
    data = generate_synthetic(SyntheticConfig(n_users=30, n_items=N_ITEMS, min_length=25, max_length=40, seed=2))
    split = leave_one_out(data, max_history=20)
    seqs = data.item_sequences()
    changed = data.sequences.copy()
    changed["item_ids"] = [np.concatenate([s[:-2], [(s[-2] % N_ITEMS) + 1, (s[-1] % N_ITEMS) + 1]]) for s in seqs]
    other = leave_one_out(type(data)(data.items, changed, data.stats), max_history=20)
    model = make({"name": "twin_v2", "gamma": 4}).eval()
    for split_ in (split, other):
        h = split_.full_histories("valid")
        assert [len(x) for x in h.items] == [len(s) - 2 for s in seqs]
    h, h2 = split.full_histories("valid"), other.full_histories("valid")
    prepared = model.prepare(Batch(history=torch.from_numpy(h.padded(np.arange(len(h)))[0])))
    assert prepared.long_sizes.sum(1).tolist() == [len(s) - 2 for s in seqs]
    members = set(prepared.long_items[prepared.long_sizes > 0].tolist())
    assert members <= set(np.concatenate(h.items).tolist())
    cands = np.tile(np.arange(1, 11), (len(h), 1))
    s1 = ranker_scores(model, CandidateSet(h.user_index, cands, np.zeros(cands.shape, np.float32), h.targets), h)
    s2 = ranker_scores(model, CandidateSet(h2.user_index, cands, np.zeros(cands.shape, np.float32), h2.targets), h2)
    np.testing.assert_array_equal(s1, s2)  # the valid and test targets changed; the scores did not


def test_prepared_batches_score_like_raw_ones_and_padding_is_minus_inf():
    model = make({"name": "twin_v2", "gamma": 3}).eval()
    b = batch()
    b.candidates[1, -2:] = 0
    with torch.no_grad():
        raw, prepared = model.score(b), model.score(model.prepare(b))
    torch.testing.assert_close(raw, prepared)
    assert torch.isinf(raw[1, -2:]).all() and torch.isfinite(raw[0]).all()


def test_a_registered_item_is_scored_by_its_content_vector_and_the_mean_id_row():
    """Cold start in a cascade: new items take their content vectors and the trained rows' mean ID
    embedding; every trained item scores exactly as before, in candidates and in histories."""
    model = make({"name": "twin_v2", "gamma": 3}).eval()
    torch.nn.init.normal_(model.mlp[-1].weight)  # as if trained: an untrained ranker keeps the retriever's order
    b = batch()
    with torch.no_grad():
        before = model.score(b)
        trained_mean = model.item_emb.weight[1:].mean(dim=0)
    new_vectors = torch.randn(2, 6, generator=torch.Generator().manual_seed(7))
    model.register_items(torch.tensor([N_ITEMS + 1, N_ITEMS + 2]), new_vectors)
    assert model.n_items == N_ITEMS + 2
    torch.testing.assert_close(model.item_vectors[N_ITEMS + 1:], new_vectors)
    torch.testing.assert_close(model.item_emb.weight[N_ITEMS + 1:], trained_mean.expand(2, -1))
    model.register_items(torch.tensor([N_ITEMS + 3]), new_vectors[:1])  # a later one: still the trained mean
    torch.testing.assert_close(model.item_emb.weight[N_ITEMS + 3], trained_mean, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model.score(b), before)
        # the new items in a history and among the candidates
        b.history[1, -1], b.candidates[2, 0] = N_ITEMS + 1, N_ITEMS + 2
        scores = model.score(b)
    assert torch.isfinite(scores).all() and not torch.equal(scores[2], before[2])
    with torch.no_grad():  # the new item's score is its vector's: another vector, another score
        model.item_vectors[N_ITEMS + 2] += 1.0
        assert model.score(b)[2, 0] != scores[2, 0]
    with pytest.raises(ValueError, match=f"exactly {N_ITEMS + 4}..{N_ITEMS + 4}"):
        model.register_items(torch.tensor([N_ITEMS + 5]), new_vectors[:1])
    with pytest.raises(ValueError, match=r"must be \(1, 6\) like the ranker's item vectors, got \(1, 5\)"):
        model.register_items(torch.tensor([N_ITEMS + 4]), torch.zeros(1, 5))
    assert model.n_items == N_ITEMS + 3  # refused calls changed nothing
    with pytest.raises(ValueError, match="trained without item vectors"):
        make({"name": "twin"}, vectors=False).register_items(torch.tensor([N_ITEMS + 1]), torch.zeros(1, 6))


@pytest.mark.parametrize("config,match", [
    ({"name": "twin_v2", "gamma": 1}, "model.gamma"),
    ({"name": "twin", "history": "all"}, "model.history"),
    ({"name": "twin", "d_model": 30, "n_heads": 4}, "divisible"),
])
def test_bad_settings_name_their_key(config, match):
    with pytest.raises(ValueError, match=match):
        model_config_from_dict(config)


def test_clusters_need_item_vectors_and_scores_need_retriever_features():
    with pytest.raises(ValueError, match="model.history=clusters clusters behaviours by their item vectors"):
        make({"name": "twin_v2"}, vectors=False)
    model = make({"name": "twin"}, vectors=False)  # TWIN on IDs alone is allowed
    b = batch()
    b.candidate_ranks = None
    with pytest.raises(ValueError, match="candidate_ranks"):
        model.score(b)


def test_training_lists_are_the_whole_list_and_a_missed_target_takes_a_random_place():
    cands = np.array([[5, 6, 7, 8]] * 40)
    scores = np.array([[4, 3, 2, 1]] * 40, dtype=np.float32)
    targets = np.array([6, 8] + [9] * 38)
    lists = training_lists(CandidateSet(np.arange(40), cands, scores, targets))
    assert lists.items[:2].tolist() == [[5, 6, 7, 8]] * 2  # found targets stay where the retriever put them
    assert lists.ranks.tolist() == [[0, 1, 2, 3]] * 40 and lists.scores.tolist() == scores.tolist()
    assert ((lists.items[2:] == 9).sum(1) == 1).all()  # the missed target replaces one candidate
    places = (lists.items[2:] == 9).argmax(1)
    assert len(set(places.tolist())) == 4  # anywhere in the list, not always at its end
    np.testing.assert_array_equal(lists.items, training_lists(CandidateSet(np.arange(40), cands, scores, targets)).items)
    randoms = random_negatives(np.random.default_rng(0), 12, lists.items, 6)
    for row, taken in zip(randoms, lists.items):
        real = row[row > 0]
        assert len(set(real)) == len(real) and not set(real) & set(taken) and (real <= 12).all()


def test_skipping_missed_targets_trains_only_on_the_lists_that_hold_their_target(monkeypatch):
    import recsys.training.ranker as ranker
    from recsys.experiment import load_experiment

    data = generate_synthetic(SyntheticConfig(n_users=30, n_items=N_ITEMS, min_length=6, max_length=12, seed=4))
    split = leave_one_out(data, max_history=20)
    train_h, valid_h = split.full_histories("train"), split.full_histories("valid")

    def lists(h, holds):  # 20 candidates per row, the target among them only where ``holds``
        rows = []
        for i, target in enumerate(h.targets):
            others = [x for x in range(1, N_ITEMS + 1) if x != target][i % 5:][:20]
            rows.append([target, *others[:19]] if holds(i) else others)
        return CandidateSet(h.user_index, np.array(rows), np.zeros((len(h), 20), np.float32), h.targets)

    train, valid = lists(train_h, lambda i: i % 3 == 0), lists(valid_h, lambda i: True)
    cfg = load_experiment(None, ["trainer.optim.epochs=1", "trainer.optim.batch_size=8"]).trainer
    seen = []
    real = ranker.fixed_batches
    monkeypatch.setattr(ranker, "fixed_batches", lambda model, h, size: seen.append(h) or real(model, h, size))
    for missed in ("skip", "insert"):
        ranker.train_ranker(make({"name": "twin"}), train, train_h, valid, valid_h, cfg, random_negatives_n=2,
                            missed_targets=missed, log=lambda line: None)
    held = train_h.user_index[train.target_in_set]
    assert 0 < len(held) < len(train_h)
    assert sorted(seen[0].user_index.tolist()) == sorted(held.tolist())  # skip: the lists that hold it
    assert sorted(seen[1].user_index.tolist()) == sorted(train_h.user_index.tolist())  # insert: every list
    with pytest.raises(ValueError, match="missed_targets"):
        ranker.train_ranker(make({"name": "twin"}), train, train_h, valid, valid_h, cfg, random_negatives_n=2,
                            missed_targets="drop")
    with pytest.raises(ValueError, match="model.missed_targets"):
        model_config_from_dict({"name": "twin", "missed_targets": "drop"})


def test_ranker_holdout_never_trains_on_the_rankers_transition():
    from recsys.experiment import load_experiment
    from recsys.training.loop import Trainer

    data = generate_synthetic(SyntheticConfig(n_users=40, n_items=N_ITEMS, min_length=6, max_length=12, seed=3))
    split = leave_one_out(data, max_history=20)
    exp = load_experiment(None, ["trainer.data.ranker_holdout=true", "trainer.data.samples=sliding"])
    model = build_model("sasrec", exp.model, n_items=N_ITEMS, max_len=20)
    trainer = Trainer(model, split, exp.trainer, exp.eval)
    for row, seq in enumerate(split.train):
        targets = trainer.targets[trainer.users == split.train_users[row]]
        assert sorted(targets[targets > 0].tolist()) == sorted(seq[1:-1].tolist())  # s[n-3] never a target
    with pytest.raises(ValueError, match="ranker_holdout and trainer.selection.refit exclude each other"):
        load_experiment(None, ["trainer.data.ranker_holdout=true", "trainer.selection.refit=true"])


@pytest.fixture(scope="module")
def retriever_run(tmp_path_factory):
    from pipelines.stages import run_train
    from recsys.experiment import load_experiment

    root = tmp_path_factory.mktemp("runs")
    common = [f"run.root={root}", "data.synthetic.n_users=120", "data.synthetic.n_items=40",
              "data.synthetic.min_length=8", "data.synthetic.max_length=40", "data.max_history=10",
              "model.d_model=16", "model.n_layers=1", "model.d_ff=32", "trainer.optim.epochs=2",
              "trainer.selection.patience=0", "trainer.resources.use_ray=false"]
    held = run_train(load_experiment(None, [*common, "trainer.data.ranker_holdout=true"]))
    plain = root / "plain"  # the same run, as if trained on every transition
    shutil.copytree(held, plain)
    config = json.loads((plain / "config.json").read_text())
    config["trainer"]["data"]["ranker_holdout"] = False
    (plain / "config.json").write_text(json.dumps(config))
    return root, held, plain


def test_rank_verb_trains_the_cascade_and_reports_it_beside_the_retriever(retriever_run, capsys):
    from pipelines.cli import main

    root, held, plain = retriever_run
    args = ["rank", f"run.root={root}", "model.name=twin_v2", "model.gamma=3", "model.d_model=16",
            "model.random_negatives=5", "trainer.optim.epochs=2",
            "trainer.optim.batch_size=32", "trainer.selection.patience=0", "--top-n", "20"]
    assert main([*args, "--retriever", str(held)]) == 2  # use_ray defaults to true
    assert "rankers train in-process" in capsys.readouterr().err
    args.insert(1, "trainer.resources.use_ray=false")
    assert main([*args, "--retriever", str(plain)]) == 2
    assert "trainer.data.ranker_holdout=true" in capsys.readouterr().err
    assert main([*args, "--retriever", str(held)]) == 0
    run_dir = next((root / "rank").iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    test, alone = metrics["test"], metrics["retriever"]["test"]
    assert {"auc", "gauc", "recall@10", "ndcg@10"} <= set(test) and set(test) == set(alone)
    assert test["target_in_set"] == alone["target_in_set"] == metrics["candidates"]["test"]["target_in_set"]
    assert test["recall@20"] == pytest.approx(alone["recall@20"])  # top-20 of 20 candidates: only order changes
    # the retriever alone on its own candidates = its full-catalogue figures (top-10 of the top-20)
    from recsys.training.checkpoint import load_model
    from recsys.training.evaluate import evaluate
    from recsys.data import InteractionData

    saved = json.loads((held / "config.json").read_text())
    split = leave_one_out(InteractionData.load(saved["data_dir"]), 10)
    full = evaluate(load_model(held / "checkpoints" / "best"), split.test)
    assert alone["recall@10"] == pytest.approx(full["recall@10"]) and alone["ndcg@10"] == pytest.approx(full["ndcg@10"])
    assert (run_dir / "COMPLETE").is_file() and "retriever + ranker" in (run_dir / "summary.md").read_text()

    # an interrupted cascade continues with the inputs it was started with: the finished candidates
    # are reused, the ranker that did not finish trains again (the same seed gives the same figures)
    (run_dir / "COMPLETE").unlink()
    (run_dir / "train" / "COMPLETE").unlink()
    made = (run_dir / "candidates" / "COMPLETE").read_text()
    capsys.readouterr()
    assert main(["rank", "--resume", str(run_dir), "model.d_model=8"]) == 2
    assert "give it alone" in capsys.readouterr().err
    assert main(["rank", "--resume", str(run_dir)]) == 0
    assert "train: an unfinished train run from an earlier attempt; starting it over" in capsys.readouterr().out
    assert (run_dir / "candidates" / "COMPLETE").read_text() == made and (run_dir / "COMPLETE").is_file()
    assert json.loads((run_dir / "metrics.json").read_text())["test"] == pytest.approx(test)
    assert main(["rank", "--resume", str(run_dir)]) == 2
    assert "is a finished rank run; nothing to resume" in capsys.readouterr().err
    assert main(args) == 2
    assert "give the retriever's train run" in capsys.readouterr().err


def test_a_validation_cache_prepares_each_batch_once_and_scores_the_same():
    data = generate_synthetic(SyntheticConfig(n_users=20, n_items=N_ITEMS, min_length=10, max_length=30, seed=5))
    h = leave_one_out(data, max_history=20).full_histories("valid")
    cands = np.tile(np.arange(1, 9), (len(h), 1))
    found = CandidateSet(h.user_index, cands, np.zeros(cands.shape, np.float32), h.targets)
    model = make({"name": "twin_v2", "gamma": 3}).eval()
    calls = []
    prepare = model.prepare
    model.prepare = lambda b: calls.append(1) or prepare(b)
    cache: dict = {}
    first = ranker_scores(model, found, h, batch_size=8, cache=cache)
    again = ranker_scores(model, found, h, batch_size=8, cache=cache)
    assert len(cache) == 3 and len(calls) == 3 + 2 * 3  # 3 cached prepares; score's own returns at once
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(first, ranker_scores(model, found, h, batch_size=8), rtol=1e-6)


def test_train_verb_trains_a_ranker_from_a_candidates_run(retriever_run):
    from pipelines.cli import main
    from pipelines.stages import run_candidates

    root, held, _ = retriever_run
    cand_dir, _ = run_candidates(held, 20)
    args = ["train", f"run.root={root}", "run.name=from-candidates", "model.name=twin", "model.d_model=16",
            "model.random_negatives=3", "trainer.optim.epochs=1",
            "trainer.resources.use_ray=false", "--candidates", str(cand_dir)]
    assert main(args) == 0
    run_dir = next(p for p in (root / "train").iterdir() if p.name.endswith("from-candidates"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best_epoch"] == 1 and {"auc", "gauc", "ndcg@10"} <= set(metrics["valid"])
    assert (run_dir / "checkpoints" / "best" / "model.safetensors").is_file() and (run_dir / "COMPLETE").is_file()


def test_user_folds_hash_ids_alone_and_fold_retrievers_never_train_on_their_folds_users():
    from recsys.data.split import user_folds
    from recsys.experiment import load_experiment
    from recsys.training.loop import Trainer

    folds = user_folds(np.arange(3000), 3)
    assert set(folds.tolist()) == {0, 1, 2} and np.bincount(folds).min() > 900
    np.testing.assert_array_equal(user_folds(np.array([2999, 7, 7]), 3), folds[[2999, 7, 7]])  # the id alone
    data = generate_synthetic(SyntheticConfig(n_users=40, n_items=N_ITEMS, min_length=6, max_length=12, seed=3))
    split = leave_one_out(data, max_history=20)
    fold_of = dict(zip(split.train_users.tolist(), user_folds(split.train_users, 2).tolist()))
    for fold in (0, 1):
        exp = load_experiment(None, ["trainer.data.folds=2", f"trainer.data.fold={fold}", "trainer.data.samples=sliding"])
        trainer = Trainer(build_model("sasrec", exp.model, n_items=N_ITEMS, max_len=20), split, exp.trainer, exp.eval)
        trained = set(trainer.users.tolist())
        assert trained == {u for u, f in fold_of.items() if f != fold}  # every other user, none of this fold
        for row, seq in enumerate(split.train):  # the kept users' every training transition
            if fold_of[int(split.train_users[row])] != fold:
                targets = trainer.targets[trainer.users == split.train_users[row]]
                assert sorted(targets[targets > 0].tolist()) == sorted(seq[1:].tolist())
    for bad, message in ((["trainer.data.folds=1"], "trainer.data.folds=1 is out of range"),
                         (["trainer.data.folds=3", "trainer.data.fold=3"], "trainer.data.fold=3 is out of range"),
                         (["trainer.data.folds=2", "trainer.data.ranker_holdout=true"], "exclude each other"),
                         (["trainer.data.folds=2", "trainer.selection.refit=true"], "exclude each other")):
        with pytest.raises(ValueError, match=message):
            load_experiment(None, bad)


def test_training_transitions_are_each_users_last_ones_before_validation():
    data = generate_synthetic(SyntheticConfig(n_users=12, n_items=N_ITEMS, min_length=4, max_length=9, seed=2))
    split = leave_one_out(data, max_history=20)
    h = split.training_transitions(3)
    last = split.full_histories("train")
    row = 0
    for user, seq in zip(split.train_users, split.train):
        for j in range(max(1, len(seq) - 3), len(seq)):
            assert h.user_index[row] == user and h.targets[row] == seq[j]
            np.testing.assert_array_equal(h.items[row], seq[:j])
            row += 1
    assert row == len(h)
    ends = np.flatnonzero(np.append(h.user_index[1:] != h.user_index[:-1], True))  # each user's last row
    np.testing.assert_array_equal(h.targets[ends], last.targets)  # = the holdout's one example
    with pytest.raises(ValueError, match="last=0"):
        split.training_transitions(0)


def test_rank_with_folds_scores_each_users_examples_by_the_retriever_that_never_saw_them(retriever_run):
    from pipelines.rank_stage import run_rank
    from recsys.candidates import CandidateSet, candidates_file, histories_inputs, retrieve
    from recsys.data import InteractionData
    from recsys.data.split import user_folds
    from recsys.experiment import load_experiment
    from recsys.training.checkpoint import load_model

    root, held, plain = retriever_run
    exp = load_experiment(None, [f"run.root={root}", "trainer.resources.use_ray=false", "model.name=twin_v2",
                                 "model.gamma=3", "model.d_model=16", "model.random_negatives=3",
                                 "trainer.optim.epochs=1", "trainer.optim.batch_size=32", "run.name=folds"])
    with pytest.raises(ValueError, match="--folds 1 is out of range"):
        run_rank(exp, plain, 20, folds=1)
    run_dir, metrics = run_rank(exp, plain, 20, folds=2, fold_examples=3)  # plain: every transition trained
    config = json.loads((run_dir / "config.json").read_text())
    assert config["ranker_examples"] == {"folds": 2, "last": 3}
    cand_config = json.loads((run_dir / "candidates" / "config.json").read_text())
    fold_dirs = [Path(d) for d in cand_config["train_examples"]["fold_train_dirs"]]
    assert [json.loads((d / "config.json").read_text())["trainer"]["data"]["fold"] for d in fold_dirs] == [0, 1]
    split = leave_one_out(InteractionData.load(cand_config["data_dir"]), 10)
    examples = split.training_transitions(3)
    train = CandidateSet.load(run_dir / "candidates" / candidates_file("train"))
    np.testing.assert_array_equal(train.user_index, examples.user_index)
    assert len(train) > len(split.train)  # more than one example per user
    fold = user_folds(train.user_index, 2)
    for f, fold_dir in enumerate(fold_dirs):
        rows = np.flatnonzero(fold == f)
        again = retrieve(load_model(fold_dir / "checkpoints" / "best"), histories_inputs(examples.subset(rows), 10), 20)
        np.testing.assert_array_equal(train.candidates[rows], again.candidates)
    test = CandidateSet.load(run_dir / "candidates" / candidates_file("test"))
    again = retrieve(load_model(plain / "checkpoints" / "best"), split.eval_set("test"), 20)
    np.testing.assert_array_equal(test.candidates, again.candidates)  # test lists: the retriever served
    assert metrics["candidates"]["train"]["users"] == len(train) and "ndcg@10" in metrics["test"]


def test_drop_last_transitions_leaves_each_users_last_ones_out_of_training():
    from recsys.experiment import load_experiment
    from recsys.training.loop import Trainer

    data = generate_synthetic(SyntheticConfig(n_users=40, n_items=N_ITEMS, min_length=6, max_length=12, seed=3))
    split = leave_one_out(data, max_history=20)
    exp = load_experiment(None, ["trainer.data.drop_last_transitions=3", "trainer.data.samples=sliding"])
    trainer = Trainer(build_model("sasrec", exp.model, n_items=N_ITEMS, max_len=20), split, exp.trainer, exp.eval)
    for row, seq in enumerate(split.train):
        targets = trainer.targets[trainer.users == split.train_users[row]]
        assert sorted(targets[targets > 0].tolist()) == sorted(seq[1:-3].tolist())  # the last 3 never targets
    for bad, message in ((["trainer.data.drop_last_transitions=-1"], "drop_last_transitions=-1 is out of range"),
                         (["trainer.data.drop_last_transitions=2", "trainer.data.folds=2"], "excludes"),
                         (["trainer.data.drop_last_transitions=2", "trainer.data.ranker_holdout=true"], "excludes"),
                         (["trainer.data.drop_last_transitions=2", "trainer.selection.refit=true"], "exclude each other")):
        with pytest.raises(ValueError, match=message):
            load_experiment(None, bad)


@pytest.fixture(scope="module")
def vectors_run(retriever_run):
    """The held retriever's settings and data, trained without each user's last 3 transitions."""
    from pipelines.stages import run_train
    from recsys.experiment import experiment_dict_from_run, experiment_from_dict

    _, held, _ = retriever_run
    saved = json.loads((held / "config.json").read_text())
    vexp = experiment_from_dict(experiment_dict_from_run(saved))
    data = replace(vexp.trainer.data, ranker_holdout=False, drop_last_transitions=3)
    vexp = replace(vexp, trainer=replace(vexp.trainer, data=data), run=replace(vexp.run, name="vectors"))
    return run_train(vexp, data_dir=Path(saved["data_dir"]))


def test_rank_takes_item_vectors_from_a_run_that_never_saw_the_rankers_examples(retriever_run, vectors_run):
    from pipelines.rank_stage import run_rank
    from recsys.training.checkpoint import load_model

    root, held, plain = retriever_run
    vectors = vectors_run
    exp = load_experiment_for_rank(root, "vectors-from")
    with pytest.raises(ValueError, match="left each user's last 0 training transitions out"):
        run_rank(exp, held, 20, vectors_from=held)
    with pytest.raises(ValueError, match="left each user's last 3 .* the last 5"):
        run_rank(exp, plain, 20, folds=2, fold_examples=5, vectors_from=vectors)
    with pytest.raises(ValueError, match="same catalogue"):
        run_rank(exp, held, 20, vectors_from=copy_naming_another_data_run(vectors, root / "vectors-elsewhere"))
    assert not any(p.name.endswith("vectors-from") for p in root.glob("rank/*"))  # refused before any training
    run_dir, metrics = run_rank(exp, held, 20, vectors_from=vectors)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["item_vectors_dir"] == str(vectors) and "ndcg@10" in metrics["test"]
    ranker = load_model(Path(config["train_dir"]) / "checkpoints" / "best")
    with torch.no_grad():
        table = load_model(vectors / "checkpoints" / "best").item_embeddings().float()
        served = load_model(held / "checkpoints" / "best").item_embeddings().float()
    torch.testing.assert_close(ranker.item_vectors[1:], table)
    assert not torch.allclose(ranker.item_vectors[1:], served)


def copy_naming_another_data_run(run_dir: Path, to: Path) -> Path:
    """A copy of ``run_dir`` whose config.json names a data run of another catalogue."""
    shutil.copytree(run_dir, to)
    config = json.loads((to / "config.json").read_text())
    (to / "config.json").write_text(json.dumps({**config, "data_dir": str(to.parent / "another-data-run")}))
    return to


def load_experiment_for_rank(root: Path, name: str):
    from recsys.experiment import load_experiment

    return load_experiment(None, [f"run.root={root}", "trainer.resources.use_ray=false", "model.name=twin_v2",
                                  "model.gamma=3", "model.d_model=16", "model.random_negatives=3",
                                  "trainer.optim.epochs=1", "trainer.optim.batch_size=32", f"run.name={name}"])


def test_compare_rankers_pairs_rankers_on_the_same_lists_and_refuses_other_lists(retriever_run, capsys):
    from benchmarks.compare_rankers import main as compare
    from pipelines.rank_stage import run_rank
    from recsys.candidates import candidates_file
    from recsys.data import InteractionData

    root, held, plain = retriever_run
    first, metrics = run_rank(load_experiment_for_rank(root, "pair-a"), held, 20)
    second, _ = run_rank(load_experiment_for_rank(root, "pair-b"), held, 20)  # the same lists, made again
    compare([f"a={first}", f"b={second}", "alone=retriever"])
    table = capsys.readouterr().out
    row = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert f"{metrics['test']['ndcg@10']:.4f}" in row["a"]
    assert f"{metrics['retriever']['test']['ndcg@10']:.4f}" in row["alone"]
    assert "(+0.0000 ± 0.0000)" in row["b"]  # the same settings and seed: the same ranker
    config = json.loads((first / "config.json").read_text())
    test_lists = CandidateSet.load(Path(config["candidates_dir"]) / candidates_file("test"))
    cand_config = json.loads((Path(config["candidates_dir"]) / "config.json").read_text())
    histories = leave_one_out(InteractionData.load(cand_config["data_dir"]),
                              cand_config["max_history"]).full_histories("test")
    length = dict(zip(histories.user_index.tolist(), map(len, histories.items)))
    lengths = np.array([length[int(u)] for u in test_lists.user_index])
    cut = int(np.median(lengths))
    longer = int((lengths > cut).sum())
    assert 2 <= longer < len(test_lists)  # a real slice of this data
    compare([f"a={first}", "alone=retriever", "--longer-than", str(cut)])
    sliced = capsys.readouterr().out
    assert f"the {longer} users with more than {cut} prior items" in sliced
    assert sliced != table
    with pytest.raises(SystemExit, match="too few to pair"):
        compare([f"a={first}", "alone=retriever", "--longer-than", str(int(lengths.max()))])
    # retriever seeds: LABEL=RUN,RUN pairs each user's figures averaged over the seeds
    compare([f"a={first},{second}", f"b={second},{first}", "alone=retriever"])
    seeds = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in seeds.splitlines() if line.startswith("| ")}
    assert "averaged over 2 retriever seeds" in seeds and rows["alone"] == row["alone"]
    assert "(+0.0000 ± 0.0000)" in rows["b"] and "b: NDCG@10 difference per seed +0.0000, +0.0000" in seeds
    with pytest.raises(SystemExit):
        compare([f"a={first},{second}", f"b={second}"])
    assert "the same number of runs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare([f"a={first}", f"b=retriever,{second}"])
    assert "'retriever' stands alone" in capsys.readouterr().err
    other = root / "pair-other-lists"  # the second run, its test lists in another order
    shutil.copytree(second, other)
    config = json.loads((second / "config.json").read_text())
    lists = CandidateSet.load(Path(config["candidates_dir"]) / candidates_file("test"))
    shutil.copytree(config["candidates_dir"], other / "other-candidates")
    CandidateSet(lists.user_index, lists.candidates[:, ::-1].copy(), lists.scores, lists.targets).save(
        other / "other-candidates" / candidates_file("test"))
    (other / "config.json").write_text(json.dumps({**config, "candidates_dir": str(other / "other-candidates")}))
    with pytest.raises(ValueError, match="re-ranks other test lists"):
        compare([f"a={first}", f"c={other}"])


def test_twin_cascade_reuses_a_candidates_run_and_takes_vectors_from_another_run(retriever_run, vectors_run,
                                                                                 tmp_path, monkeypatch):
    import benchmarks.record
    from benchmarks.twin_cascade import main as cascade
    from pipelines.stages import run_candidates

    monkeypatch.setattr(benchmarks.record, "RESULTS", tmp_path / "results")
    root, held, _ = retriever_run
    cand_dir, _ = run_candidates(held, 20)
    args = [str(held), "--config", str(Path(__file__).parent.parent / "configs" / "lastfm-twin_v2.yaml"),
            "--name", "reuse", "--variants", "twin_v2", "--top-n", "20", "--candidates", str(cand_dir),
            f"run.root={root}", "model.gamma=3", "model.d_model=16", "model.random_negatives=3",
            "trainer.optim.epochs=1", "trainer.optim.batch_size=32"]
    with pytest.raises(SystemExit, match="without --folds"):
        cascade([*args, "--folds", "2"])
    with pytest.raises(SystemExit, match="give --folds too"):
        cascade([*args, "--resume-folds", str(tmp_path)])
    with pytest.raises(ValueError, match="left each user's last 0 training transitions out"):
        cascade([*args, "--vectors-from", str(held)])  # refused before any ranker trains
    assert not (tmp_path / "results").exists()
    cascade([*args, "--vectors-from", str(vectors_run)])
    record = json.loads((tmp_path / "results" / "twin_v2" / "synthetic" / "reuse.json").read_text())
    rank_config = json.loads((Path(record["rank_run"]) / "config.json").read_text())
    assert rank_config["candidates_dir"] == str(cand_dir) and rank_config["item_vectors_dir"] == str(vectors_run)
    assert record["item_vectors_run"] == str(vectors_run) and record["ranker_examples"] == "holdout"


def test_a_cascade_over_tiger_ranks_with_the_content_vectors_behind_its_ids(tiger_pipeline, tiger_cascade, tmp_path):
    """TIGER has no item table: its ranker takes the embed run its semantic IDs were built from, the
    fold retrievers are TIGERs on the same IDs, and their lists come from constrained beam search."""
    from pipelines.rank_stage import run_rank
    from recsys.text.store import load_embeddings
    from recsys.training.checkpoint import load_model

    tiger, embed = tiger_pipeline["tiger"], tiger_pipeline["embed"]
    exp = load_experiment_for_rank(tmp_path, "over-tiger")
    with pytest.raises(ValueError, match="is a tiger run, which has no item table"):
        run_rank(exp, tiger, 20, folds=2, fold_examples=2, vectors_from=tiger)
    with pytest.raises(ValueError, match="same catalogue"):
        run_rank(exp, tiger, 20, folds=2, fold_examples=2,
                 vectors_from=copy_naming_another_data_run(embed, tmp_path / "embed-elsewhere"))
    assert not (tmp_path / "rank").exists()  # refused before any fold retriever trains

    run_dir, metrics = tiger_cascade["rank"], tiger_cascade["metrics"]  # the same run_rank, shared with test_serve
    config = json.loads((run_dir / "config.json").read_text())
    assert Path(config["item_vectors_dir"]).resolve() == embed.resolve()
    ranker = load_model(Path(config["train_dir"]) / "checkpoints" / "best")
    torch.testing.assert_close(ranker.item_vectors[1:], torch.from_numpy(load_embeddings(embed)[1]))
    served = json.loads((tiger / "config.json").read_text())
    cand_config = json.loads((run_dir / "candidates" / "config.json").read_text())
    for fold_dir in cand_config["train_examples"]["fold_train_dirs"]:
        fold = json.loads((Path(fold_dir) / "config.json").read_text())
        assert (fold["model"]["name"], fold["ids_dirs"]) == ("tiger", served["ids_dirs"])
    train = CandidateSet.load(run_dir / "candidates" / "candidates-train.parquet")
    assert (train.candidates > 0).all() and all(len(set(row)) == 20 for row in train.candidates)  # existing IDs
    assert metrics["candidates"]["train"]["users"] == len(train) and "ndcg@10" in metrics["test"]


def test_fold_retrievers_decode_behaviour_ids_whose_source_never_saw_the_fold(tiger_pipeline, tmp_path, capsys):
    """EAGER's behaviour IDs cluster a SASRec's item vectors, which trained on the fold's users: each
    fold retriever gets IDs from that SASRec retrained without the fold, while content IDs are
    shared. A source that left the examples out is shared; with the holdout, a source that trained
    on the ranker's transition is refused."""
    from pipelines.rank_stage import fold_refit_sources, require_holdout, run_fold_retrievers
    from pipelines.stages import run_ids_stage, run_train
    from recsys.experiment import load_experiment

    data, semantic = tiger_pipeline["data"], tiger_pipeline["tiger"].parent / "ids"
    root = tmp_path / "runs"
    tiny = [f"run.root={root}", "trainer.optim.epochs=1", "trainer.optim.batch_size=128",
            "trainer.selection.patience=0", "trainer.resources.use_ray=false"]
    sasrec = run_train(load_experiment(None, [*tiny, "model.name=sasrec", "model.d_model=16", "model.n_layers=1",
                                              "model.d_ff=32"]), data_dir=data)
    ids_exp = load_experiment(None, [f"run.root={root}", "ids.method=hkmeans", "ids.use_ray=false",
                                     "ids.hkmeans.branching=6"])
    behavior = run_ids_stage(ids_exp, train_dir=sasrec)
    eager = run_train(load_experiment(None, [*tiny, "model.name=eager", "model.d_model=16", "model.n_heads=2",
                                             "model.n_decoder_layers=1", "model.d_ff=32", "model.beam_size=10",
                                             "trainer.data.samples=prefixes"]),
                      data_dir=data, ids_dirs={"behavior": behavior, "semantic": semantic})
    saved = json.loads((eager / "config.json").read_text())
    assert fold_refit_sources(saved, 2) == {"behavior": sasrec}

    (tmp_path / "folds").mkdir()
    fold_dirs = run_fold_retrievers(eager, 2, parent=tmp_path / "folds", examples_last=2)
    for f, fold_dir in enumerate(fold_dirs):
        fold = json.loads((fold_dir / "config.json").read_text())
        assert (fold["trainer"]["data"]["folds"], fold["trainer"]["data"]["fold"]) == (2, f)
        assert fold["ids_dirs"]["semantic"] == saved["ids_dirs"]["semantic"]
        assert fold["ids_dirs"]["behavior"] != saved["ids_dirs"]["behavior"]
        source = Path(json.loads((Path(fold["ids_dirs"]["behavior"]) / "config.json").read_text())["train_dir"])
        trained = json.loads((source / "config.json").read_text())
        assert trained["model"]["name"] == "sasrec"
        assert (trained["trainer"]["data"]["folds"], trained["trainer"]["data"]["fold"]) == (2, f)
        assert source.is_relative_to(tmp_path / "folds" / f"fold{f}")

    # an interrupted attempt continues: fold 0's behaviour IDs and fold 1's retriever were cut short
    folds = tmp_path / "folds"
    (folds / "fold0" / "behavior-behavior" / "ids" / "COMPLETE").unlink()
    (folds / "fold1" / "train" / "COMPLETE").unlink()
    kept = (folds / "fold0" / "train" / "COMPLETE").read_text()
    epochs = (folds / "fold1" / "train" / "epochs.jsonl").read_text()
    with pytest.raises(ValueError, match="made for .*'examples_last': 3"):
        run_fold_retrievers(eager, 2, parent=folds, examples_last=3, resume=True)
    again = run_fold_retrievers(eager, 2, parent=folds, examples_last=2, resume=True)
    assert again == fold_dirs and (folds / "fold0" / "train" / "COMPLETE").read_text() == kept  # reused, not retrained
    assert (folds / "fold0" / "behavior-behavior" / "ids" / "COMPLETE").is_file()  # made again
    # fold 1 continued from its checkpoint (its one epoch was already done), and finished again
    assert (fold_dirs[1] / "COMPLETE").is_file() and (fold_dirs[1] / "epochs.jsonl").read_text() == epochs
    assert "fold1/train: resuming from its last checkpoint" in capsys.readouterr().out
    with pytest.raises(FileExistsError):  # a new attempt never writes into an old one
        run_fold_retrievers(eager, 2, parent=folds, examples_last=2)

    # a source that never saw the last 2 transitions of any user: its IDs are shared
    dropped = tmp_path / "sasrec-dropped"
    shutil.copytree(sasrec, dropped)
    config = json.loads((dropped / "config.json").read_text())
    config["trainer"]["data"]["drop_last_transitions"] = 2
    (dropped / "config.json").write_text(json.dumps(config))
    ids_dropped = tmp_path / "ids-dropped"
    shutil.copytree(behavior, ids_dropped)
    ids_config = json.loads((ids_dropped / "config.json").read_text())
    (ids_dropped / "config.json").write_text(json.dumps({**ids_config, "train_dir": str(dropped)}))
    shared = {**saved, "ids_dirs": {**saved["ids_dirs"], "behavior": str(ids_dropped)}}
    assert fold_refit_sources(shared, 2) == {} and fold_refit_sources(shared, 3) == {"behavior": dropped}

    # the holdout: the EAGER held the ranker's transition out, its behaviour source did not
    held = tmp_path / "eager-held"
    shutil.copytree(eager, held)
    held_config = json.loads((held / "config.json").read_text())
    held_config["trainer"]["data"]["ranker_holdout"] = True
    (held / "config.json").write_text(json.dumps(held_config))
    with pytest.raises(ValueError, match="decodes behavior IDs clustered from .*ranker_holdout=true"):
        require_holdout(held)
    (held / "config.json").write_text(json.dumps({**held_config, "ids_dirs": shared["ids_dirs"]}))
    require_holdout(held)  # its source left the last 2 transitions out
