"""The rankers' data path: ranking metrics against brute force, candidate sets (a run directory
and its CLI verb), and evaluate_ranker with hand-written rankers."""

import json
import math

import numpy as np
import pytest
import torch

from pipelines.cli import main
from recsys.candidates import CandidateSet, retrieve, retriever_inputs
from recsys.data import SyntheticConfig, generate_synthetic
from recsys.data.split import leave_one_out
from recsys.metrics import auc_per_user, gauc, pooled_auc, ranks_to_sums, reranked_ranks
from recsys.models.base import AtomicIdModel, Ranker
from recsys.training.evaluate import evaluate, evaluate_ranker


# --- metrics against slow references ---------------------------------------------------------
def brute_auc(pos: list[float], neg: list[float]) -> float:
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def random_case(seed, users=40, c=12):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, (users, c)).astype(float)  # few distinct values: many ties
    labels = rng.random((users, c)) < 0.2
    valid = rng.random((users, c)) < 0.85
    labels[0], labels[1] = False, True  # one user without a positive, one without a negative
    return scores, labels, valid


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_user_pooled_and_grouped_auc_match_pair_counting(seed):
    scores, labels, valid = random_case(seed)
    per_user = auc_per_user(scores, labels, valid, chunk_pairs=500)  # several chunks
    expected, weighted, weights, excluded = [], 0.0, 0, 0
    for s, y, v in zip(scores, labels, valid):
        pos, neg = list(s[y & v]), list(s[~y & v])
        if pos and neg:
            expected.append(brute_auc(pos, neg))
            weighted, weights = weighted + expected[-1] * v.sum(), weights + v.sum()
        else:
            expected.append(math.nan)
            excluded += 1
    np.testing.assert_allclose(per_user, expected, equal_nan=True)
    assert excluded >= 2
    value, counted, left_out = gauc(scores, labels, valid)
    assert value == pytest.approx(weighted / weights) and (counted, left_out) == (len(scores) - excluded, excluded)
    pooled = brute_auc(list(scores[labels & valid]), list(scores[~labels & valid]))
    assert pooled_auc(scores, labels, valid) == pytest.approx(pooled)
    assert math.isnan(pooled_auc(scores, np.zeros_like(labels), valid))


def test_reranked_recall_and_ndcg_match_sorting_by_hand():
    rng = np.random.default_rng(3)
    candidates = torch.from_numpy(np.stack([rng.permutation(np.arange(1, 30))[:10] for _ in range(50)]))
    scores = torch.from_numpy(rng.random((50, 10)))
    targets = torch.where(torch.arange(50) % 4 == 0, torch.tensor(99), candidates[:, 3])  # 99: not in the set
    ranks = reranked_ranks(scores, candidates, targets).numpy()
    for row in range(50):
        ordered = [int(candidates[row, j]) for j in sorted(range(10), key=lambda j: -float(scores[row, j]))]
        expected = ordered.index(int(targets[row])) if int(targets[row]) in ordered else -1
        assert ranks[row] == expected
    sums = ranks_to_sums(ranks, (5,))
    assert sums["recall@5"] == sum(0 <= r < 5 for r in ranks)
    assert sums["ndcg@5"] == pytest.approx(sum(1 / math.log2(r + 2) for r in ranks if 0 <= r < 5))


# --- candidate sets and evaluate_ranker -------------------------------------------------------
class ById(AtomicIdModel):
    """A retriever that prefers high item ids, whatever the history."""

    def score_items(self, batch):
        return torch.arange(self.n_items + 1.0).expand(len(batch.history), -1).clone()


class Oracle(Ranker):
    """Knows each user's target (from a table) and records the batches it scores."""

    def __init__(self, n_items, target_of_user):
        super().__init__(n_items, 1)
        self.target_of_user, self.batches = target_of_user, []

    def score(self, batch):
        self.batches.append(batch)
        target = self.target_of_user[batch.users]
        return (batch.candidates == target[:, None]).float()


class LowIdsFirst(Ranker):
    def score(self, batch):
        return -batch.candidates.float()


@pytest.fixture(scope="module")
def split():
    data = generate_synthetic(SyntheticConfig(n_users=80, n_items=60, min_length=5, max_length=30, seed=4))
    return leave_one_out(data, max_history=5)


def test_candidates_are_the_retrievers_top_n_without_inserting_the_target(split):
    model = ById(split.n_items, 5)
    for name in ("valid", "test"):
        found = retrieve(model, retriever_inputs(split, name), 15)
        assert found.candidates.tolist() == [list(range(60, 45, -1))] * len(found)  # as retrieved, never altered
        recall = evaluate(model, split.eval_set(name), ks=(15,))["recall@15"]
        assert found.target_in_set.mean() == pytest.approx(recall) and recall < 1.0
    train = retrieve(model, retriever_inputs(split, "train"), 15)
    assert train.targets.tolist() == [s[-1] for s in split.train if len(s) >= 2]  # the last training transition
    with pytest.raises(ValueError, match=r"--top-n 61 is out of range; allowed: 1 <= top-n <= 60"):
        retrieve(model, split.test, 61)


def test_evaluate_ranker_scores_whole_histories_and_reports_beside_the_ceiling(split, tmp_path):
    found = retrieve(ById(split.n_items, 5), retriever_inputs(split, "test"), 20)
    found.save(tmp_path / "c.parquet")
    found = CandidateSet.load(tmp_path / "c.parquet")
    histories = split.full_histories("test")
    target_of_user = torch.zeros(int(split.train_users.max()) + 1, dtype=torch.long)
    target_of_user[split.test.user_index] = torch.from_numpy(split.test.targets)
    oracle = Oracle(split.n_items, target_of_user)
    figures = evaluate_ranker(oracle, found, histories, batch_size=16)
    ceiling = found.target_in_set.mean()
    assert figures["target_in_set"] == pytest.approx(ceiling) and 0 < ceiling < 1
    assert figures["recall@5"] == figures["ndcg@5"] == pytest.approx(ceiling)  # target first whenever it is there
    assert figures["gauc"] == 1.0 and figures["auc"] == 1.0
    assert figures["gauc_users"] == found.target_in_set.sum()
    assert figures["gauc_excluded_users"] == (~found.target_in_set).sum()  # no positive in their set
    longest = max(b.history.shape[1] for b in oracle.batches)
    assert longest > split.max_history  # whole histories, not the retriever's last 5
    assert all(torch.equal(b.timestamps > 0, b.history > 0) and b.target_time is not None for b in oracle.batches)
    # a ranker that reverses the retriever: its recall@5 is the share of targets among the 5 lowest ids
    low = evaluate_ranker(LowIdsFirst(split.n_items, 1), found, histories)
    lowest = np.sort(found.candidates, 1)[:, :5]
    assert low["recall@5"] == pytest.approx((lowest == found.targets[:, None]).any(1).mean())


def test_a_ranker_without_candidates_is_refused_by_name(split):
    with pytest.raises(ValueError, match="evaluate_ranker needs candidate sets.*recsys candidates"):
        evaluate_ranker(LowIdsFirst(split.n_items, 1), None, split.full_histories("test"))
    found = retrieve(ById(split.n_items, 5), retriever_inputs(split, "valid"), 20)
    with pytest.raises(ValueError, match="targets differ"):
        evaluate_ranker(LowIdsFirst(split.n_items, 1), found, split.full_histories("test"))


# --- the run directory and the CLI verb -------------------------------------------------------
@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    """A complete train run of an untrained SASRec over a small synthetic data run."""
    from pipelines.stages import run_data
    from recsys.experiment import load_experiment
    from recsys.models import build_model
    from recsys.runs import mark_complete, write_json
    from recsys.training.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("runs")
    exp = load_experiment(None, [f"run.root={root}", "model.name=sasrec", "data.synthetic.n_users=40",
                                 "data.synthetic.n_items=30", "data.max_history=5"])
    data_dir = run_data(exp)
    train_dir = root / "train" / "x"
    torch.manual_seed(0)
    model = build_model("sasrec", exp.model, n_items=30, max_len=5)
    save_checkpoint(train_dir / "checkpoints" / "best", model, "sasrec")
    write_json(train_dir / "config.json", {**exp.to_dict(), "data_dir": str(data_dir), "ids_dir": None})
    mark_complete(train_dir, "train")
    return train_dir


def test_candidates_verb_writes_a_complete_run(train_run, capsys):
    assert main(["candidates", str(train_run), "--top-n", "7", "--splits", "train,test"]) == 0
    run_dir = next((train_run.parent.parent / "candidates").iterdir())
    assert {p.name for p in run_dir.iterdir()} >= {"candidates-train.parquet", "candidates-test.parquet",
                                                    "metrics.json", "config.json", "summary.md", "COMPLETE"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    test = CandidateSet.load(run_dir / "candidates-test.parquet")
    assert test.candidates.shape[1] == 7 and metrics["test"]["users"] == len(test)
    assert metrics["test"]["target_in_set"] == pytest.approx(test.target_in_set.mean())
    assert json.loads((run_dir / "config.json").read_text())["top_n"] == 7
    assert "valid" not in metrics


@pytest.mark.parametrize("argv, message", [
    (["--top-n", "0"], "--top-n 0 is out of range; allowed: 1 <= top-n <= 30"),
    (["--top-n", "31"], "--top-n 31 is out of range"),
    (["--top-n", "5", "--splits", "dev"], "--splits dev is not allowed"),
])
def test_candidates_verb_refuses_bad_arguments(train_run, argv, message, capsys):
    assert main(["candidates", str(train_run), *argv]) == 2
    assert message in capsys.readouterr().err


def test_candidates_verb_refuses_an_incomplete_run(train_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "incomplete"
    shutil.copytree(train_run, copy)
    (copy / "COMPLETE").unlink()
    assert main(["candidates", str(copy), "--top-n", "5"]) == 2
    assert "is not a complete train run" in capsys.readouterr().err


def test_training_a_retriever_with_candidates_is_refused():
    from pipelines.stages import check_candidates_input

    check_candidates_input("sasrec", None)
    with pytest.raises(ValueError, match="only rankers read --candidates"):
        check_candidates_input("sasrec", "runs/candidates/x")


def test_a_ranker_run_without_candidates_names_what_is_missing(monkeypatch):
    import types

    import pipelines.stages as stages

    monkeypatch.setattr(stages, "get_spec", lambda name: types.SimpleNamespace(model_cls=LowIdsFirst))
    with pytest.raises(ValueError, match="is a ranker: it trains on a retriever's candidate sets, and none were "
                                         "given.*--candidates CANDIDATES_RUN"):
        stages.check_candidates_input("twin", None)
