"""Benchmark scripts whose logic goes beyond timing, run on tiny synthetic inputs."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import benchmarks.record
from recsys.data import InteractionData, SyntheticConfig, generate_synthetic
from recsys.data.split import leave_one_out
from recsys.text.store import EMBEDDINGS_FILE, write_embeddings


@pytest.fixture
def data_and_embed(tmp_path):
    """A synthetic data run and a fake embed run whose vectors follow each item's top category."""
    data = generate_synthetic(SyntheticConfig(n_users=300, n_items=80, n_topics=4, seed=0))
    data.save(tmp_path / "data")
    top = data.items["categories"].map(lambda c: c[0]).astype("category").cat.codes.to_numpy()
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(top.max() + 1, 16))
    vectors = centers[top] + 0.3 * rng.normal(size=(len(top), 16))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    (tmp_path / "embed").mkdir()
    write_embeddings(tmp_path / "embed" / EMBEDDINGS_FILE, data.items["item_id"].to_numpy(), vectors, "fake",
                     [f"h{i}" for i in range(len(vectors))])
    return tmp_path / "data", tmp_path / "embed"


def test_cold_start_slice_holds_items_out_and_scores_them_after_registration(data_and_embed, tmp_path, monkeypatch):
    from benchmarks.tiger_cold_start import main

    monkeypatch.setattr(benchmarks.record, "RESULTS", tmp_path / "results")
    data_dir, embed_dir = data_and_embed
    main(["--data", str(data_dir), "--embed", str(embed_dir), "--fraction", "0.1",
          f"run.root={tmp_path / 'runs'}", "data.max_history=10", "ids.method=hkmeans", "ids.hkmeans.branching=4",
          "model.name=tiger", "model.d_model=32", "model.n_encoder_layers=1", "model.n_decoder_layers=1",
          "model.n_heads=2", "model.head_dim=16", "model.d_ff=64", "trainer.data.samples=prefixes", "trainer.optim.epochs=3",
          "trainer.optim.batch_size=128", "trainer.optim.lr=3e-3", "trainer.selection.patience=0"])
    record = json.loads((tmp_path / "results" / "tiger" / "synthetic" / "cold-start.json").read_text())
    assert record["protocol"] == {"history": "kept", "refit": False, "selected_on": "valid"}
    assert record["held_out_items"] == 8 and record["cold_test_users"] > 0
    assert record["cold_test_users"] + record["warm_test_users"] == 300
    held = json.loads((tmp_path / "runs" / "train").glob("*-cold-start").__next__().joinpath("config.json")
                      .read_text())["held_out"]
    assert len(held) == 8
    for name in ("tiger_learned", "tiger_content", "content_knn"):
        for slice_ in ("cold", "warm"):
            assert 0.0 <= record["metrics"][name][slice_]["recall@20"] <= 1.0
    # registered from content alone, held-out targets are found (the untrained model could not return them)
    assert record["metrics"]["tiger_content"]["cold"]["recall@20"] > 0


def test_eager_cold_start_keeps_held_out_items_out_of_both_id_fits_and_finds_them_only_through_content(
        data_and_embed, tmp_path, monkeypatch):
    from benchmarks.eager_cold_start import main

    monkeypatch.setattr(benchmarks.record, "RESULTS", tmp_path / "results")
    data_dir, embed_dir = data_and_embed
    (tmp_path / "tt.yaml").write_text("model:\n  name: two_tower\n  d_model: 16\n  n_heads: 2\n  d_ff: 32\n"
                                      "trainer:\n  optim:\n    epochs: 2\n    batch_size: 64\n")
    main(["--data", str(data_dir), "--embed", str(embed_dir), "--fraction", "0.1", "--warm-users", "50",
          f"run.root={tmp_path / 'runs'}", "data.max_history=10", "ids.method=hkmeans", "ids.hkmeans.branching=4",
          f"behavior.config={tmp_path / 'tt.yaml'}", "model.name=eager", "model.d_model=16", "model.n_heads=2",
          "model.n_decoder_layers=1", "model.d_ff=32", "model.gct_negatives=16", "trainer.data.samples=prefixes",
          "trainer.optim.epochs=3", "trainer.optim.batch_size=128", "trainer.optim.lr=3e-3",
          "trainer.optim.warmup_steps=0", "trainer.selection.patience=0"])
    record = json.loads((tmp_path / "results" / "eager" / "synthetic" / "cold-start.json").read_text())
    assert record["protocol"] == {"history": "kept", "refit": False, "selected_on": "valid"}
    assert record["held_out_items"] == 8 and record["cold_test_users"] > 0 and record["warm_users_scored"] == 50
    (run,) = (tmp_path / "runs" / "train").glob("*-eager-cold-start")
    assert len(json.loads((run / "config.json").read_text())["held_out"]) == 8
    # the behaviour model and EAGER were built on the 72 warm items only
    from recsys.training.checkpoint import load_model
    assert load_model(run / "behavior" / "checkpoints" / "best").n_items == 72
    assert load_model(run / "eager" / "checkpoints" / "best").n_items == 72
    metrics = record["metrics"]
    assert set(metrics) == {f"eager_{f}_{c}" for f in ("confidence", "sum", "behavior", "semantic")
                            for c in ("learned", "content")} | {"content_knn"}
    # a held-out item has no behaviour codes: the behaviour stream alone can never return it ...
    assert metrics["eager_behavior_content"]["cold"]["recall@20"] == 0.0
    # ... the semantic stream, and the fusions through it, find some from content alone
    assert metrics["eager_semantic_content"]["cold"]["recall@20"] > 0
    assert metrics["eager_sum_content"]["cold"]["recall@20"] > 0
    for slices in metrics.values():
        assert 0.0 <= slices["warm"]["recall@20"] <= 1.0


def test_serve_load_summary_counts_errors_by_kind_and_times_only_answers():
    from benchmarks.serve_load import markdown, summarise

    ok = [{"start": i / 10, "ms": float(i), "status": 200, "error": None, "retries": int(i == 3)}
          for i in range(1, 101)]
    bad = [{"start": 1.0, "ms": 5000.0, "status": 503, "error": None, "retries": 0},
           {"start": 1.0, "ms": 60000.0, "status": None, "error": "ServerDisconnectedError", "retries": 0},
           {"start": 1.0, "ms": 3.0, "status": 200, "error": "9 items instead of 10", "retries": 0}]
    s = summarise(ok + bad, duration_s=10.0)
    assert (s["requests"], s["ok"], s["errors"], s["retried"]) == (103, 100, 3, 1)
    assert s["error_kinds"] == {"http 503": 1, "ServerDisconnectedError": 1, "9 items instead of 10": 1}
    assert s["throughput_rps"] == 10.0
    assert s["p50_ms"] == 50.5 and s["p99_ms"] == 99.0 and s["max_ms"] == 100.0  # failures are not timed
    assert summarise([], 1.0)["p50_ms"] is None
    table = markdown({"tiger": {"c8": s}, "ann": {"c8": s}, "two-tower": {"c8": s}, "eager-behavior": {"c8": s},
                      "fault": [], "ann_recall_at_k": {"ann": 0.99, "two-tower": 0.998}},
                     ["tiger", "ann", "two-tower", "eager-behavior"])
    assert "| tiger | 8 | 50.5 |" in table and "| ann | 8 |" in table and "| eager-behavior | 8 |" in table
    assert "| two-tower | 8 |" in table
    assert "ann: the faiss index returns 99.0%" in table
    assert "two-tower: the faiss index returns 99.8%" in table


def test_serve_load_names_each_ann_system_and_refuses_a_label_it_cannot_tell_apart():
    from benchmarks.serve_load import ann_systems, parse

    ns = parse(["--sasrec", "runs/train/s", "--ann", "two-tower=runs/train/t"])
    assert ann_systems(ns) == {"ann": Path("runs/train/s"), "two-tower": Path("runs/train/t")}
    for bad, says in ((["--ann", "runs/train/t"], "give LABEL=TRAIN_RUN"),
                      (["--ann", "=runs/train/t"], "give LABEL=TRAIN_RUN"),
                      (["--sasrec", "a", "--ann", "ann=b"], "is taken"),
                      (["--ann", "tiger=b"], "is taken"),
                      (["--ann", "x=a", "--ann", "x=b"], "is taken")):
        with pytest.raises(SystemExit, match=says):
            ann_systems(parse(bad))


def test_split_baselines_rank_training_successors_of_the_last_item_then_popular_items():
    from benchmarks.split_baselines import popular_items, popularity_counts, rank_transition, score, transition_counts
    from recsys.data.split import EvalSet, LeaveOneOutSplit

    # item 1 is followed by 2 twice and by 3 once; items 10..39 fill the catalogue with 1 count each
    train = [np.array([1, 2, 5]), np.array([4, 1, 2]), np.array([1, 3])] + [np.array([i]) for i in range(10, 40)]
    empty = EvalSet(np.zeros(0, np.int64), np.zeros((0, 3), np.int64), np.zeros(0, np.int64))
    split = LeaveOneOutSplit(n_items=40, max_history=3, train=train, train_users=np.arange(len(train)),
                             valid=empty, test=empty, dropped_users=0)
    counts = popularity_counts(split)
    popular = popular_items(counts)
    assert counts[0] == 0 and 0 not in popular and list(popular[:3]) == [1, 2, 3]
    table = transition_counts(split)
    assert dict(zip(*map(list, table[1]))) == {2: 2, 3: 1}
    es = EvalSet(np.arange(2), np.array([[0, 4, 1], [0, 0, 7]]), np.array([2, 1]))
    top = rank_transition(es, table, popular)
    assert list(top[0, :3]) == [2, 3, 1]  # successors by count, then the most popular item not yet listed
    assert list(top[1, :3]) == [1, 2, 3]  # item 7 never had a successor: popularity alone
    assert all(len(set(row)) == 20 and 0 not in row for row in top)
    m = score(top, es)
    assert m["recall@5"] == 1.0 and m["ndcg@5"] == 1.0  # both targets at rank 0
    # with the history excluded, history items leave the ranking and the rest moves up
    from benchmarks.split_baselines import drop_history
    kept = drop_history(rank_transition(es, table, popular, length=23), es)
    assert list(kept[0, :3]) == [2, 3, 5] and 4 not in kept[0] and 1 not in kept[0]
    assert list(kept[1, :3]) == [1, 2, 3] and 7 not in kept[1]
    with pytest.raises(ValueError, match="rank more"):
        drop_history(top, es)  # 20 ranked, row 0 loses item 1: too short


def test_split_baselines_refit_counts_validation_transitions_and_scores_test_only(data_and_embed, tmp_path,
                                                                                monkeypatch):
    from benchmarks.split_baselines import main
    from recsys.runs import write_json

    monkeypatch.setattr(benchmarks.record, "RESULTS", tmp_path / "results")
    data_dir, _ = data_and_embed
    write_json(data_dir / "config.json", {"data": {"format": "synthetic"}})
    main([str(data_dir)])
    main([str(data_dir), "--refit"])
    plain = json.loads((tmp_path / "results" / "baselines" / "synthetic" / "counts.json").read_text())
    refit = json.loads((tmp_path / "results" / "baselines" / "synthetic" / "counts-refit.json").read_text())
    assert plain["protocol"] == {"history": "kept", "refit": False, "selected_on": "none"}
    assert refit["protocol"] == {"history": "kept", "refit": True, "selected_on": "none"}
    assert set(plain["metrics"]) == {"valid", "test"} and set(refit["metrics"]) == {"test"}
    assert refit["config"]["refit"] and refit["valid_over_test_recall@10"] == {}
    assert refit["metrics"]["test"] != plain["metrics"]["test"]  # more transitions counted


def test_a_refit_is_recorded_with_its_test_figures_and_no_validation(tiny_overrides, tmp_path, monkeypatch):
    from benchmarks.sequential import main as sequential
    from pipelines.cli import main as cli

    monkeypatch.setattr(benchmarks.record, "RESULTS", tmp_path / "results")
    assert cli(["train", *tiny_overrides, "trainer.resources.use_ray=false", "trainer.optim.epochs=3",
                "trainer.optim.stop_epoch=2", "trainer.selection.refit=true"]) == 0
    train_dir = next((tmp_path / "runs" / "train").iterdir())
    sequential(["--name", "tiny-refit", "--train-run", str(train_dir)])
    (path,) = (tmp_path / "results").glob("**/*.json")
    record = json.loads(path.read_text())
    model = record["config"]["model"]["name"]
    assert path == tmp_path / "results" / model / "synthetic" / "tiny-refit.json" and record["model"] == model
    assert record["protocol"] == {"history": "kept", "refit": True, "selected_on": "valid"}
    assert "valid" not in record["metrics"] and set(record["metrics"]["test"]) >= {"recall@10", "ndcg@5"}
    assert record["refit"] and record["best_epoch"] == record["epochs_run"] == 2
    trainer = record["config"]["trainer"]
    assert trainer["selection"]["refit"] and trainer["optim"]["stop_epoch"] == 2


def test_protocols_writes_one_record_per_protocol(tiny_overrides, tmp_path, monkeypatch):
    from benchmarks.protocols import main as protocols
    from pipelines.cli import main as cli

    monkeypatch.setattr(benchmarks.record, "RESULTS", tmp_path / "results")
    assert cli(["train", *tiny_overrides, "trainer.resources.use_ray=false", "trainer.optim.epochs=2"]) == 0
    train_dir = next((tmp_path / "runs" / "train").iterdir())
    data_dir = next((tmp_path / "runs" / "data").iterdir())
    protocols([str(train_dir / "checkpoints" / "best"), "--data", str(data_dir), "--name", "tiny",
               "--splits", "valid,test", "--max-history", "20", "--threads", "1"])
    folder = tmp_path / "results" / "sasrec" / "synthetic"
    assert sorted(p.name for p in (tmp_path / "results").glob("**/*.json")) == [
        "tiny-history-excluded.json", "tiny-history-kept.json"]
    kept_record, excluded_record = (json.loads((folder / f"tiny-history-{p}.json").read_text()) for p in ("kept", "excluded"))
    assert kept_record["protocol"] == {"history": "kept", "refit": False, "selected_on": "valid"}
    assert excluded_record["protocol"] == {"history": "excluded", "refit": False, "selected_on": "valid"}
    assert kept_record["other_protocol"] == "sasrec/synthetic/tiny-history-excluded.json"
    assert excluded_record["other_protocol"] == "sasrec/synthetic/tiny-history-kept.json"
    assert kept_record["source_checkpoint"] == excluded_record["source_checkpoint"] == str(train_dir / "checkpoints" / "best")
    kept, excluded = kept_record["metrics"], excluded_record["metrics"]
    assert set(kept) == set(excluded) == {"valid", "test"}
    assert set(kept_record["eval_wall_s"]) == {"history_kept/valid", "history_kept/test"}
    assert set(excluded_record["eval_wall_s"]) == {"history_excluded/valid", "history_excluded/test"}
    # synthetic users revisit topics, so their histories' items rank high; excluding them changes the figures
    assert kept["test"] != excluded["test"]
    training = kept_record["training"]  # what the checkpoint's run took to its selected epoch
    epochs = [json.loads(line) for line in (train_dir / "epochs.jsonl").read_text().splitlines()]
    best = json.loads((train_dir / "metrics.json").read_text())["best_epoch"]
    assert training["selected_epoch"] == best and training["epochs_run"] == 2
    assert training["train_steps_s_to_selected"] == pytest.approx(sum(e["epoch_s"] for e in epochs[:best]), abs=0.1)
    assert training["wall_s_to_selected_estimate"] >= training["train_steps_s_to_selected"]
    assert training["trained_with"]["model"]["name"] == "sasrec"
    assert set(kept_record["machine_note"]) >= {"cpu", "cpu_family_model", "cpu_flags", "native_bf16", "torch_threads"}
    assert set(kept_record["machine_note"]["cpu_flags"]) <= set(benchmarks.record.ISA_FLAGS)
    with pytest.raises(SystemExit):
        protocols([str(train_dir / "checkpoints" / "best"), "--data", str(data_dir), "--name", "x", "--splits", "train"])


def test_cpu_fields_read_the_first_processor_and_the_note_says_shared_only_under_load(monkeypatch):
    text = ("processor\t: 0\nmodel name\t: AMD EPYC\ncpu family\t: 26\nmodel\t\t: 2\n"
            "flags\t\t: fpu avx2 avx512f avx512_bf16\n\nprocessor\t: 1\nmodel name\t: other\n")
    field = benchmarks.record.cpu_fields(text)
    assert (field["model name"], field["cpu family"], field["model"]) == ("AMD EPYC", "26", "2")
    assert field["flags"].split() == ["fpu", "avx2", "avx512f", "avx512_bf16"]
    # shared: by what other processes used while the benchmark ran, not by the load, which counts its own
    monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 0.0, 0.0))
    monkeypatch.setattr(benchmarks.record.OTHERS, "cores", lambda: 0.1)
    assert "shared" not in benchmarks.record.machine_note(1)
    monkeypatch.setattr(benchmarks.record.OTHERS, "cores", lambda: 1.5)
    note = benchmarks.record.machine_note(1)
    assert note["other_processes_cores"] == 1.5 and "kept 1.50 of" in note["shared"]


def test_other_processes_are_those_outside_this_ones_tree():
    # pid -> (parent, ticks): 10 is the benchmark, 11 its Ray worker, 12 the worker's child; 20 another job
    # and 21 its child; 30 started since; 40 ended meanwhile
    before = {10: (1, 100), 11: (10, 50), 20: (1, 1000), 21: (20, 5), 40: (1, 70)}
    now = {10: (1, 400), 11: (10, 350), 12: (11, 30), 20: (1, 1150), 21: (20, 25), 30: (1, 8)}
    assert benchmarks.record.tree(now, 10) == {10, 11, 12}
    assert benchmarks.record.others_cpu_ticks(before, now, 10) == 150 + 20 + 8


def test_a_busy_process_outside_this_tree_is_counted():
    """A process that is not this one's descendant (a double fork leaves it to init), busy for a
    second, shows as at least half a core of other work over that second (the rest of the machine
    can only add to it)."""
    import subprocess
    import sys
    import time

    others = benchmarks.record.OtherProcesses()
    busy = "import os, time\nif os.fork() == 0:\n    end = time.time() + 1.2\n    while time.time() < end: pass\nos._exit(0)"
    subprocess.run([sys.executable, "-c", busy], check=True)  # returns at once; the grandchild spins
    time.sleep(1.3)
    assert others.cores() >= 0.5


def test_every_record_names_its_cpu_and_native_bf16_unless_the_script_gave_its_own_note(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmarks.record, "RESULTS", tmp_path)
    plain = benchmarks.record.write_record("speed", model="m", dataset="d", config={}, wall_s=1.0,
                                           metrics={"items_per_s": 1.0})
    note = json.loads(plain.read_text())["machine_note"]
    assert {"cpu", "cpu_flags", "native_bf16", "torch_threads"} <= set(note)
    assert note["torch_threads"] == torch.get_num_threads()
    given = benchmarks.record.write_record("given", model="m", dataset="d", config={}, wall_s=1.0,
                                           metrics={"items_per_s": 1.0}, extra={"machine_note": {"cpu": "x"}})
    assert json.loads(given.read_text())["machine_note"] == {"cpu": "x"}


def test_validation_curves_compare_runs_on_validation_only(tmp_path, monkeypatch):
    from benchmarks.validation_curves import main

    monkeypatch.setattr(benchmarks.record, "RESULTS", tmp_path / "results")
    for name, dropout, scores in (("a", 0.1, [0.02, 0.05, 0.04]), ("b", 0.3, [0.01, 0.03, 0.03])):
        run = tmp_path / name
        run.mkdir()
        # the ids runs were computed differently (Ray or not): not a setting of the runs
        config = {"model": {"name": "tiger", "dropout": dropout}, "trainer": {"optim": {"epochs": 3}}, "run": {"name": name},
                  "ids": {"method": "hkmeans", "use_ray": name == "a"}, "data": {"format": "synthetic"},
                  "eval": {"exclude_history": True}}
        (run / "config.json").write_text(json.dumps(config))
        (run / "epochs.jsonl").write_text("".join(
            json.dumps({"epoch": i + 1, "train_loss": 3.0 - i, "epoch_s": 10.0, "validated_users": 100,
                        "valid_recall@10": s, "valid_ndcg@10": s / 2}) + "\n" for i, s in enumerate(scores)))
    main([str(tmp_path / "a"), str(tmp_path / "b"), "--name", "curves", "--label", "b=dropout 0.3",
          "--plot", str(tmp_path / "curves.png")])
    record = json.loads((tmp_path / "results" / "tiger" / "synthetic" / "curves.json").read_text())
    assert record["protocol"] == {"history": "excluded", "refit": False, "selected_on": "valid"}
    assert record["varied_keys"] == ["model.dropout"]  # run.name and ids.use_ray differ too, but are not settings
    a, b = record["runs"]["a"], record["runs"]["dropout 0.3"]
    assert (a["best_epoch"], a["best_valid"]["recall@10"]) == (2, 0.05)
    assert b["best_epoch"] == 2 and b["settings"] == {"model.dropout": 0.3}  # first of equal scores
    assert "test" not in record["metrics"] and (tmp_path / "curves.png").stat().st_size > 0

    # a run of that record joins a later comparison with its recorded curve and settings
    (tmp_path / "b" / "epochs.jsonl").unlink()  # its directory need not exist any more
    main([str(tmp_path / "a"), "--name", "later", "--from-record", "tiger/synthetic/curves=dropout 0.3"])
    later = json.loads((tmp_path / "results" / "tiger" / "synthetic" / "later.json").read_text())
    assert later["runs"]["dropout 0.3 (curves)"]["settings"] == {"model.dropout": 0.3}
    assert later["runs"]["dropout 0.3 (curves)"]["best_epoch"] == 2 and later["wall_s"] == 30.0  # a's epochs only
    with pytest.raises(ValueError, match="has no run labelled 'c'.*'a', 'dropout 0.3'"):
        main([str(tmp_path / "a"), "--name", "x", "--from-record", "curves=c"])  # a NAME one folder holds
    with pytest.raises(ValueError, match="selected on 'recall@10', not 'ndcg@10'"):
        main([str(tmp_path / "a"), "--name", "x", "--metric", "ndcg@10",
              "--from-record", f"{tmp_path / 'results' / 'tiger' / 'synthetic' / 'curves.json'}=dropout 0.3"])


def test_beam_width_is_chosen_on_validation_and_test_is_scored_once_at_it(tmp_path, monkeypatch):
    import torch

    from benchmarks.beam_width import main
    from recsys.data.split import leave_one_out
    from recsys.models import IdTable, Tiger, TigerConfig, semantic_id_table
    from recsys.semantic_ids import SemanticIdIndex
    from recsys.training import evaluate as evaluate_module
    from recsys.training.checkpoint import save_checkpoint

    monkeypatch.setattr(benchmarks.record, "RESULTS", tmp_path / "results")
    data = generate_synthetic(SyntheticConfig(n_users=120, n_items=40, n_topics=4, seed=0))
    data.save(tmp_path / "data")
    (tmp_path / "data" / "config.json").write_text(json.dumps({"data": {"format": "synthetic"}}))
    codes = torch.randint(0, 4, (40, 3), generator=torch.Generator().manual_seed(0))
    index = SemanticIdIndex(item_ids=torch.arange(1, 41), codes=codes, codebook_sizes=[4, 4, 4])
    torch.manual_seed(0)
    model = Tiger(TigerConfig(d_model=32, n_encoder_layers=1, n_decoder_layers=1, n_heads=2, head_dim=16, d_ff=64),
                  40, 20, ids={"semantic": IdTable(semantic_id_table(index, 40), index.level_sizes)})
    save_checkpoint(tmp_path / "ckpt", model, "tiger")
    seen = []  # (split size, beam) of every evaluation
    real = evaluate_module.evaluate
    monkeypatch.setattr("benchmarks.beam_width.evaluate", lambda m, es, **kw: (
        seen.append((len(es), m.config.beam_size)), real(m, es, **kw))[1])
    main([str(tmp_path / "ckpt"), "--data", str(tmp_path / "data"), "--name", "tiny", "--beams", "40,1", "--threads", "1"])
    record = json.loads((tmp_path / "results" / "tiger" / "synthetic" / "tiny-beams.json").read_text())
    assert record["protocol"] == {"history": "excluded", "refit": False, "selected_on": "valid"}
    by_beam = record["valid_by_beam"]
    assert set(by_beam) == {"1", "40"} and record["config"]["beams"] == [1, 40]
    chosen = record["chosen_beam"]
    assert by_beam[str(chosen)]["recall@10"] == max(v["recall@10"] for v in by_beam.values())
    n_valid = len(leave_one_out(data, 20).valid)
    assert seen == [(n_valid, 1), (n_valid, 40), (n_valid, chosen)]  # test once, at the chosen width
    assert record["metrics"]["valid"] == by_beam[str(chosen)] and set(record["metrics"]["test"]) == set(by_beam["1"])
    for bad in ("", "a,b", "0,20"):
        with pytest.raises(SystemExit, match="--beams"):
            main([str(tmp_path / "ckpt"), "--data", str(tmp_path / "data"), "--name", "x", "--beams", bad])


def test_compare_records_sets_records_against_a_bar_and_plots_them(tmp_path, monkeypatch, capsys):
    from benchmarks.compare_records import main
    from benchmarks.record import protocol, write_record

    monkeypatch.setattr(benchmarks.record, "RESULTS", tmp_path / "results")
    keys = [f"{m}@{k}" for m in ("recall", "ndcg") for k in (5, 10, 20)]
    kept = protocol(exclude_history=False)
    write_record("plain", model="m", dataset="d", protocol=kept, config={}, wall_s=1,
                 metrics={"test": dict.fromkeys(keys, 0.04)})
    write_record("refit", model="m", dataset="d", protocol=protocol(exclude_history=False, refit=True), config={},
                 wall_s=1, metrics={"test": dict.fromkeys(keys, 0.06)})
    plot = tmp_path / "fig.png"
    text = main(["m/d/plain=validated", "refit", "--bar", "paper: recall@5=0.05 ndcg@5=0.03",
                 "--metrics", "recall@5,ndcg@5", "--plot", str(plot)])
    assert "| validated | 0.0400 (0.80×) | 0.0400 (1.33×) |" in text
    assert "| refit (history kept) | 0.0600 (1.20×) | 0.0600 (2.00×) |" in text and "| paper (bar) | 0.0500 | 0.0300 |" in text
    assert plot.stat().st_size > 10_000
    write_record("speed", model="m", dataset="d", config={}, wall_s=1, metrics={"p50_ms": 3.0})
    write_record("plain", model="other", dataset="d", protocol=kept, config={}, wall_s=1,
                 metrics={"test": dict.fromkeys(keys, 0.05)})
    for argv, message in ((["speed"], "holds no test figures"), (["nowhere"], "no record 'nowhere'"),
                          (["plain"], "'plain' is ambiguous: m/d/plain.json, other/d/plain.json"),
                          (["m/d/plain", "--bar", "paper: recall@5=0.05"], "gives no value for ['ndcg@5', 'recall@10', 'ndcg@10']"),
                          (["m/d/plain", "m/d/plain"], "same label")):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err



def test_a_record_lands_under_its_model_and_dataset_and_quality_needs_a_protocol(tmp_path, monkeypatch):
    from benchmarks.record import protocol, write_record

    monkeypatch.setattr(benchmarks.record, "RESULTS", tmp_path)
    figures = {"test": dict.fromkeys(benchmarks.record.QUALITY_KEYS, 0.1)}
    path = write_record("run", model="tiger", dataset="beauty", protocol=protocol(exclude_history=True),
                        config={}, wall_s=1, metrics=figures)
    assert path == tmp_path / "tiger" / "beauty" / "run.json"
    record = json.loads(path.read_text())
    assert (record["model"], record["dataset"]) == ("tiger", "beauty")
    assert record["protocol"] == {"history": "excluded", "refit": False, "selected_on": "valid"}
    with pytest.raises(ValueError, match="protocol must be a dict"):
        write_record("x", model="tiger", dataset="beauty", config={}, wall_s=1, metrics=figures)
    with pytest.raises(ValueError, match="selected_on must be one of"):
        protocol(exclude_history=False, selected_on="test")
    with pytest.raises(ValueError, match="plain folder or file name"):
        write_record("x", model="tiger/beauty", dataset="beauty", config={}, wall_s=1, metrics={"p50_ms": 1.0})


def test_every_committed_record_with_quality_figures_names_its_protocol_at_model_dataset_depth():
    from benchmarks.record import RESULTS, check_protocol

    quality = 0
    for path in sorted(RESULTS.rglob("*.json")):
        parts = path.relative_to(RESULTS).parts
        if parts[0] == "tune":  # a sweep's own output folder: tune/<dataset>/<sweep>/...
            assert len(parts) == 4, path
            continue
        assert len(parts) == 3, f"{path}: records live at <model>/<dataset>/<name>.json"
        record = json.loads(path.read_text())
        assert (record["model"], record["dataset"]) == parts[:2], path
        metrics = record.get("metrics", {})
        if "test" in metrics or "valid" in metrics or "test_of_selected_checkpoint" in record:
            quality += 1
            check_protocol(record.get("protocol"))
            for split in ("test", "valid"):
                assert split not in metrics or (set(metrics[split]) - set(benchmarks.record.RANKER_KEYS)
                                                == set(benchmarks.record.QUALITY_KEYS)), path
    assert quality >= 30  # the move kept them all


def test_paired_difference_averages_seeds_per_user_and_uses_the_per_user_spread():
    from benchmarks.paired import paired_difference

    a = {"ndcg@10": np.array([[0.0, 1.0, 0.5, 0.2], [0.2, 1.0, 0.5, 0.0]])}  # 2 seeds, 4 users
    b = {"ndcg@10": np.array([[0.5, 1.0, 0.5, 0.6], [0.3, 1.0, 0.9, 0.2]])}
    got = paired_difference(a, b)["ndcg@10"]
    d = np.array([0.3, 0.0, 0.2, 0.3])  # per user, averaged over the seeds
    assert got["diff"] == pytest.approx(d.mean())
    assert got["se"] == pytest.approx(d.std(ddof=1) / 2)
    assert got["seed_differences"] == pytest.approx([0.225, 0.175])
    # a constant shift has no spread: the difference is certain
    same = paired_difference({"r": np.array([0.1, 0.2])}, {"r": np.array([0.2, 0.3])})["r"]
    assert same["diff"] == pytest.approx(0.1) and same["se"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="pair the same seeds and users"):
        paired_difference({"r": np.zeros((2, 3))}, {"r": np.zeros((1, 3))})


def test_hstu_time_ablation_writes_both_protocols_per_variant_and_paired_differences(tmp_path, monkeypatch):
    from benchmarks.hstu_time_ablation import main

    monkeypatch.setattr(benchmarks.record, "RESULTS", tmp_path / "results")
    main(["--seeds", "0,1", "--variants", "rab-p,rab-pt-last-event", "data.synthetic.n_users=60",
          "data.synthetic.n_items=40", "data.synthetic.n_topics=4", "model.d_model=16", "model.n_negatives=8",
          "trainer.optim.epochs=2", "trainer.optim.batch_size=64"])
    folder = tmp_path / "results" / "hstu" / "synthetic-time"
    for variant in ("rab-p", "rab-pt-last-event"):
        for kind in ("kept", "excluded"):
            record = json.loads((folder / f"{variant}-history-{kind}.json").read_text())
            assert record["protocol"]["history"] == kind and record["seeds"] == [0, 1]
            assert record["config"]["model"]["time_bias"] == ("off" if variant == "rab-p" else "on")
            seeds = record["per_seed"]
            assert [s["seed"] for s in seeds] == [0, 1] and all(1 <= s["best_epoch"] <= 2 for s in seeds)
            for split in ("test", "valid"):  # the record's figure is the mean over the seeds
                for metric, value in record["metrics"][split].items():
                    assert value == pytest.approx(np.mean([s[split][metric] for s in seeds]), abs=1e-4)
    paired = json.loads((folder / "ablation-paired.json").read_text())["metrics"]["test_paired_differences"]
    assert set(paired) == {"rab-pt-last-event - rab-p"}
    kept, excluded = (paired["rab-pt-last-event - rab-p"][k]["ndcg@10"] for k in ("kept", "excluded"))
    kept_a = json.loads((folder / "rab-p-history-kept.json").read_text())["metrics"]["test"]["ndcg@10"]
    kept_b = json.loads((folder / "rab-pt-last-event-history-kept.json").read_text())["metrics"]["test"]["ndcg@10"]
    assert kept["diff"] == pytest.approx(kept_b - kept_a, abs=1e-4) and kept["se"] > 0
    assert np.mean(kept["seed_differences"]) == pytest.approx(kept["diff"])
    assert excluded["se"] >= 0


def test_a_deterministic_reference_pairs_with_every_seed_of_the_other_model():
    from benchmarks.compare_paired import seed_rows
    from benchmarks.paired import paired_difference

    counts = np.array([[0.0, 1.0, 0.5, 0.0]])  # one row: no seeds
    seeds = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    a, b = seed_rows(counts, seeds)
    assert a.shape == b.shape == (2, 4) and (a == counts).all()
    out = paired_difference({"m": a}, {"m": b})["m"]
    d = seeds.mean(0) - counts[0]  # per user, averaged over the seeds
    assert out["diff"] == pytest.approx(d.mean()) and out["se"] == pytest.approx(d.std(ddof=1) / 2)
    assert out["seed_differences"] == pytest.approx([(seeds[0] - counts[0]).mean(), (seeds[1] - counts[0]).mean()])
    assert [x.shape for x in seed_rows(seeds, counts)] == [(2, 4), (2, 4)]


def test_training_precision_pairs_fp32_and_bf16_on_the_selected_weights(data_and_embed, tmp_path, monkeypatch,
                                                                        forced_bf16):
    from benchmarks.training_precision import main as training_precision

    monkeypatch.setattr(benchmarks.record, "RESULTS", tmp_path / "results")
    data_dir, _ = data_and_embed
    with forced_bf16():
        training_precision(["--data", str(data_dir), "--epochs", "2", "--threads", "1", "--matmul-size", "256",
                            "--name", "tiny", "model.name=sasrec", "model.d_model=32", "model.n_layers=1",
                            "model.d_ff=64", "trainer.optim.batch_size=64", "data.max_history=10"])
    record = json.loads((tmp_path / "results" / "sasrec" / "synthetic" / "precision-tiny.json").read_text())
    assert record["protocol"] == {"history": "kept", "refit": False, "selected_on": "valid"}
    metrics, details = record["metrics"], record["details"]
    for precision in ("fp32", "bf16"):
        row = details[precision]
        assert row["epochs"] == 2 and row["selected_epoch"] in (1, 2) and row["valid"]
        assert set(row["test"]) == {"kept", "excluded"} and 0 <= row["test"]["kept"]["recall@10"] <= 1
        assert row["gflop_per_sample"] > 0 and row["achieved_gflop_s"] > 0
        # achieved / limit (both rounded in the record); no bound at 1: where bf16 is emulated, a bf16
        # autocast step outruns a bf16 matmul
        limit = metrics["matmul_limit_gflop_s"][precision]
        assert row["fraction_of_matmul_limit"] == pytest.approx(row["achieved_gflop_s"] / limit, rel=0.1)
        assert metrics["test_by_precision"][precision] == row["test"]["kept"]
    diff = metrics["bf16_minus_fp32_test"]["kept"]["recall@10"]
    assert diff["diff"] == pytest.approx(details["bf16"]["test"]["kept"]["recall@10"]
                                         - details["fp32"]["test"]["kept"]["recall@10"], abs=1e-5)
    assert diff["se"] >= 0 and set(metrics["matmul_limit_gflop_s"]) == {"fp32", "bf16"}


def test_valid_test_gap_slices_users_by_whether_training_holds_their_transition():
    from types import SimpleNamespace

    from benchmarks.valid_test_gap import slice_of_users

    table = {5: (np.array([7, 8]), np.array([3, 1])), 6: (np.array([9]), np.array([2]))}
    es = SimpleNamespace(histories=np.array([[1, 5], [2, 5], [0, 6], [3, 4]]), targets=np.array([8, 9, 9, 7]))
    assert slice_of_users(es, table).tolist() == ["seen", "unseen-known", "seen", "unseen-new"]


def test_twin_scale_times_each_stage_and_measures_the_memory_of_one_request(tmp_path, monkeypatch):
    from benchmarks.twin_scale import main

    monkeypatch.setattr(benchmarks.record, "RESULTS", tmp_path / "results")
    plot = tmp_path / "scale.png"
    main(["--lengths", "60", "2000", "--items", "500", "--dim", "8", "--min-s", "0", "--offline-lengths",
          "--name", "tiny", "--plot", str(plot)])
    record = json.loads((tmp_path / "results" / "twin_v2" / "synthetic" / "tiny.json").read_text())
    rows = {(r["variant"], r["length"]): r for r in record["metrics"]["per_request"]}
    top_k = record["config"]["model"]["top_k"]
    for length in (60, 2000):
        full, twin, v2 = rows["full", length], rows["twin", length], rows["twin_v2", length]
        assert full["entries"] == full["gsu_keeps"] == twin["entries"] == length  # raw behaviours
        assert twin["gsu_keeps"] == top_k
        assert v2["entries"] < length and v2["compression"] == round(length / v2["entries"], 2)
        for r in (full, twin, v2):
            assert r["gsu_ms"] > 0 and r["esu_ms"] > 0 and r["total_ms"] > 0 and r["peak_mib"] >= 0
    # full attention's (C, M, H) relevance (1.6 MB at M = 2000) grows with the history; TWIN-V2's
    # entries grow less
    assert rows["full", 2000]["peak_mib"] > rows["full", 60]["peak_mib"] + 1
    assert rows["twin_v2", 2000]["entries"] < rows["twin", 2000]["entries"] / 2
    assert record["metrics"]["offline"] == {} and plot.stat().st_size > 10_000


def test_two_tower_log_q_buckets_targets_by_training_counts_and_pairs_with_and_without(tiny_overrides, tmp_path,
                                                                                       monkeypatch):
    from benchmarks.two_tower_logq import main as logq, popularity_buckets
    from pipelines.cli import main as cli
    from recsys.data.schema import InteractionData
    from recsys.data.split import leave_one_out

    monkeypatch.setattr(benchmarks.record, "RESULTS", tmp_path / "results")
    common = [*tiny_overrides, "model.name=two_tower", "trainer.resources.use_ray=false", "trainer.optim.epochs=2"]
    assert cli(["data", *tiny_overrides]) == 0
    data_dir = next((tmp_path / "runs" / "data").iterdir())
    for log_q in ("streaming", "off"):
        assert cli(["train", *common, f"model.log_q={log_q}", f"run.name=tt-{log_q}", "--data", str(data_dir)]) == 0
    runs = {p.name.split("-tt-")[1]: p / "checkpoints" / "best" for p in (tmp_path / "runs" / "train").iterdir()}
    logq(["--with", str(runs["streaming"]), "--without", str(runs["off"]), "--data", str(data_dir), "--name", "tiny",
          "--latency-users", "5", "--threads", "1"])
    record = json.loads((tmp_path / "results" / "two_tower" / "synthetic" / "tiny.json").read_text())
    assert record["protocol"] == {"history": "kept", "refit": False, "selected_on": "valid"}
    table, users = record["by_target_popularity"], record["users"]
    assert table["popular"]["users"] + table["tail"]["users"] == table["all"]["users"] == users
    assert table["popular"]["users"] > 0 and table["tail"]["users"] > 0
    for side in ("with_log_q", "without_log_q"):  # the buckets partition the users
        mixed = (table["popular"][side]["recall@10"] * table["popular"]["users"]
                 + table["tail"][side]["recall@10"] * table["tail"]["users"]) / users
        assert mixed == pytest.approx(table["all"][side]["recall@10"], abs=2e-4)
    diff = table["all"]["paired_with_minus_without"]["recall@10"]["diff"]
    assert diff == pytest.approx(table["all"]["with_log_q"]["recall@10"] - table["all"]["without_log_q"]["recall@10"],
                                 abs=2e-4)
    assert record["metrics"]["test"]["recall@10"] == table["all"]["with_log_q"]["recall@10"]
    # exact faiss search over the model's vectors is the model's own full scoring
    assert record["ann"]["recall@10_exact"] == pytest.approx(record["metrics"]["test"]["recall@10"], abs=1e-4)
    assert 0 < record["ann"]["share_of_exact_top10_found"] <= 1
    split = leave_one_out(InteractionData.load(data_dir), 20)
    popular, buckets = popularity_buckets(split, 0.25)
    counts = np.bincount(np.concatenate(split.train), minlength=split.n_items + 1)
    assert popular.sum() == buckets["popular_items"] == 20 and not popular[0]
    assert counts[popular].min() >= counts[1:][~popular[1:]].max()  # the head holds the most-trained items
    with pytest.raises(ValueError, match="head-share"):
        popularity_buckets(split, 1.0)
    with pytest.raises(SystemExit):  # a checkpoint of another model is refused
        logq(["--with", str(runs["streaming"]), "--without", str(data_dir), "--data", str(data_dir)])


def test_dropout_step_times_both_masks_on_the_same_batches(data_and_embed, tmp_path, monkeypatch):
    from benchmarks.dropout_step import main as dropout_step

    monkeypatch.setattr(benchmarks.record, "RESULTS", tmp_path / "results")
    monkeypatch.setattr("benchmarks.dropout_step.MASK_ELEMENTS", 10_000)
    data_dir, _ = data_and_embed
    dropout_step(["--data", str(data_dir), "--steps", "2", "--warmup", "1", "--threads", "1", "--name", "tiny",
                  "model.name=sasrec", "model.d_model=32", "model.n_layers=1", "model.d_ff=64",
                  "trainer.optim.batch_size=64", "data.max_history=10"])
    record = json.loads((tmp_path / "results" / "sasrec" / "synthetic" / "dropout-step-tiny.json").read_text())
    metrics = record["metrics"]
    assert set(metrics["s_per_step"]) == set(metrics["mask_ms_5_6M_bf16"]) == {"torch", "inverted"}
    assert all(len(times) == 2 and min(times) == pytest.approx(metrics["s_per_step"][name], abs=1e-4)
               for name, times in record["rounds_s_per_step"].items())
    best = {name: min(times) for name, times in record["rounds_s_per_step"].items()}
    assert metrics["step_time_saved"] == pytest.approx(1 - best["inverted"] / best["torch"], abs=0.001)
    with pytest.raises(SystemExit, match="leaves none to time"):
        dropout_step(["--data", str(data_dir), "--warmup", "50", "model.name=sasrec", "trainer.optim.batch_size=256"])


def test_optimizer_step_times_per_tensor_and_fused_adamw_with_the_same_hyperparameters(data_and_embed, tmp_path,
                                                                                       monkeypatch):
    from benchmarks.optimizer_step import OPTIMIZERS
    from benchmarks.optimizer_step import main as optimizer_step
    from recsys.training.loop import build_optimizer

    monkeypatch.setattr(benchmarks.record, "RESULTS", tmp_path / "results")
    data_dir, _ = data_and_embed
    optimizer_step(["--data", str(data_dir), "--steps", "2", "--warmup", "1", "--threads", "1", "--name", "tiny",
                    "model.name=sasrec", "model.d_model=32", "model.n_layers=1", "model.d_ff=64",
                    "trainer.optim.batch_size=64", "trainer.optim.weight_decay=0.1", "data.max_history=10"])
    record = json.loads((tmp_path / "results" / "sasrec" / "synthetic" / "optimizer-step-tiny.json").read_text())
    best = {name: min(times) for name, times in record["rounds_s_per_step"].items()}
    assert set(best) == {"per_tensor", "fused"} and all(len(t) == 2 for t in record["rounds_s_per_step"].values())
    assert record["metrics"]["step_time_saved"] == pytest.approx(1 - best["fused"] / best["per_tensor"], abs=0.001)
    from recsys.experiment import load_experiment

    model = torch.nn.Linear(3, 2)
    cfg = load_experiment(None, ["trainer.optim.weight_decay=0.1"]).trainer
    fused, per_tensor = build_optimizer(model, cfg), OPTIMIZERS["per_tensor"](model, cfg)
    assert fused.defaults["fused"] and not per_tensor.defaults["fused"] and not per_tensor.defaults["foreach"]
    same = ("lr", "betas", "eps", "weight_decay")
    assert {k: fused.defaults[k] for k in same} == {k: per_tensor.defaults[k] for k in same}


def test_precision_step_times_fp32_and_bf16_autocast_on_the_same_batches(data_and_embed, tmp_path, monkeypatch):
    from benchmarks import precision_step
    from recsys import hardware
    from recsys.training import loop

    monkeypatch.setattr(benchmarks.record, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(hardware, "cpu_supports_bf16", lambda: False)
    seen = []
    real = torch.autocast

    def autocast(device_type, dtype=None, enabled=True, **kwargs):
        seen.append(enabled)
        return real(device_type, dtype=dtype, enabled=enabled, **kwargs)

    monkeypatch.setattr(loop.torch, "autocast", autocast)
    data_dir, _ = data_and_embed
    precision_step.main(["--data", str(data_dir), "--steps", "2", "--warmup", "1", "--threads", "1", "--name", "tiny",
                         "--matmul-size", "64", "model.name=sasrec", "model.d_model=32", "model.n_layers=1",
                         "model.d_ff=64", "trainer.optim.batch_size=64", "data.max_history=10"])
    record = json.loads((tmp_path / "results" / "sasrec" / "synthetic" / "precision-step-tiny.json").read_text())
    best = {name: min(times) for name, times in record["rounds_s_per_step"].items()}
    assert set(best) == {"fp32", "bf16"} and all(len(t) == 2 for t in record["rounds_s_per_step"].values())
    assert record["metrics"]["step_time_saved"] == pytest.approx(1 - best["bf16"] / best["fp32"], abs=0.001)
    # 64 x 64, as asked: a 2048 one in bf16 where bf16 is emulated took 635 s at nice 19 on a Zen 3
    assert set(record["metrics"]["matmul_gflops"]) == {"fp32", "bf16"} and record["matmul_size"] == 64
    assert record["metrics"]["auto_resolves_to"] == "fp32"
    # each round of 3 steps per precision: fp32 without autocast, bf16 with it, alternating
    assert seen == ([False] * 3 + [True] * 3) * 2


def test_score_time_scores_the_first_users_and_saves_their_target_ranks(tmp_path):
    from benchmarks.score_time import main as score_time
    from pipelines.stages import run_train
    from recsys.experiment import load_experiment
    from recsys.training.checkpoint import load_model
    from recsys.training.evaluate import target_ranks_of

    run = run_train(load_experiment(None, [f"run.root={tmp_path / 'runs'}", "data.synthetic.n_users=120",
                                           "data.synthetic.n_items=40", "model.name=sasrec", "model.d_model=16",
                                           "model.n_layers=1", "model.d_ff=32", "trainer.optim.epochs=1",
                                           "trainer.resources.use_ray=false", "data.max_history=10"]))
    data_dir = json.loads((run / "config.json").read_text())["data_dir"]
    out = score_time([str(run / "checkpoints" / "best"), "--data", data_dir, "--users", "40", "--threads", "1",
                      "--max-history", "10", "--ranks", str(tmp_path / "ranks.npy")])
    split = leave_one_out(InteractionData.load(data_dir), 10)
    want = target_ranks_of(load_model(run / "checkpoints" / "best"), split.valid.subset(np.arange(40)))
    assert out["users"] == 40 and out["seconds"] > 0
    np.testing.assert_array_equal(np.load(tmp_path / "ranks.npy"), want)


def test_suite_cpu_classes_processes_by_what_they_ran_and_sums_from_the_first_sample():
    """benchmarks/suite_cpu.py: a Ray worker counts under the actor it took (first seen unnamed), a
    process already running at the first sample counts from there, and the table's shares add up."""
    from benchmarks import suite_cpu

    assert suite_cpu.classify("ray::SERVE_REPLICA::retriever#Registry#x:ServeReplica:retriever:Registry") == "ray serve"
    assert suite_cpu.classify("ray::RayTrainWorker.init_train_context") == "ray train and tune"
    assert suite_cpu.classify("/venv/bin/python -m pytest -q -m not ray -o cache_dir=x") == "pytest: tests without ray"
    assert suite_cpu.classify("/venv/bin/python -m pytest -q -m ray and not second_lane") == "pytest: first ray lane"
    assert suite_cpu.classify("/venv/bin/python -m pytest -q -m ray and second_lane") == "pytest: second ray lane"
    assert suite_cpu.classify("python ray/_private/workers/default_worker.py --node-ip-address=x") == suite_cpu.UNNAMED
    assert suite_cpu.classify("[kdamond.0]").startswith("other processes")

    procs = {10: ("python busy-before.py", 100.0), 11: ("python default_worker.py", 1.0)}
    sampler = suite_cpu.Sampler(me=1, title=lambda pid: procs[pid][0])
    sampler.sample({pid: cpu for pid, (_, cpu) in procs.items()})  # both were running: each counts from here
    procs.update({10: ("python busy-before.py", 130.0), 11: ("ray::MapWorker(MapBatches(ItemEncoder))", 9.0),
                  12: ("ray::ServeController", 4.0)})  # 12 started since: counts whole
    sampler.sample({pid: cpu for pid, (_, cpu) in procs.items()})
    totals = sampler.totals()
    assert totals["ray data"] == {"core_s": 8.0, "processes": 1}
    assert totals["ray serve"] == {"core_s": 4.0, "processes": 1}
    assert totals["other processes (recsys subprocesses, the kernel, ...)"]["core_s"] == 30.0
    text = suite_cpu.table(totals, wall_s=30.0, cores=2)
    assert "| ray data | 1 | 8 | 19% |" in text and "42 core-s in 30 s on 2 cores: busy 70%" in text
