"""Named ID spaces: --ids per space, IDs from a trained model's item embeddings, old run wiring."""

from pathlib import Path

import pytest

from pipelines.cli import ids_runs_by_space
from recsys.experiment import ids_runs_of, load_experiment
from recsys.runs import read_json
from recsys.training.session import check_id_spaces


def test_ids_flags_name_spaces_and_a_bare_run_is_the_models_one_space():
    assert ids_runs_by_space("tiger", ["runs/ids/a"]) == {"semantic": Path("runs/ids/a")}
    assert ids_runs_by_space("tiger", ["semantic=runs/ids/a"]) == {"semantic": Path("runs/ids/a")}
    assert ids_runs_by_space("tiger", ["/abs/dir=x"]) == {"semantic": Path("/abs/dir=x")}  # a path, not a space
    assert ids_runs_by_space("sasrec", None) == {}
    with pytest.raises(ValueError, match="declares the ID spaces \\[\\]; name the space"):
        ids_runs_by_space("sasrec", ["runs/ids/a"])
    with pytest.raises(ValueError, match="names the space 'semantic' twice"):
        ids_runs_by_space("tiger", ["semantic=a", "b"])
    # an unset shell variable (--ids behavior=$IB) is refused, not read as the working directory
    with pytest.raises(ValueError, match="--ids behavior=: no run directory after 'behavior'="):
        ids_runs_by_space("eager", ["behavior=", "semantic=runs/ids/b"])


def test_a_model_gets_exactly_the_spaces_it_declares():
    check_id_spaces("tiger", {"semantic": "x"})
    check_id_spaces("sasrec", {})
    with pytest.raises(ValueError, match="--ids behavior=...: model.name='tiger' has no ID space 'behavior'"):
        check_id_spaces("tiger", {"semantic": "x", "behavior": "y"})
    with pytest.raises(ValueError, match="has no ID space 'semantic'; it declares none"):
        check_id_spaces("sasrec", {"semantic": "x"})
    with pytest.raises(ValueError, match=r"decodes IDs in the space\(s\) \['semantic'\]: give an ids run for \['semantic'\]"):
        check_id_spaces("tiger", {})


def test_old_train_runs_name_their_one_ids_run_the_semantic_space():
    assert ids_runs_of({"ids_dir": "runs/ids/a"}) == {"semantic": "runs/ids/a"}
    assert ids_runs_of({"ids_dir": None}) == {}
    assert ids_runs_of({"ids_dirs": {"semantic": "a", "behavior": "b"}, "ids_dir": "old"}) == {"semantic": "a",
                                                                                                "behavior": "b"}


@pytest.fixture(scope="module")
def sasrec_runs(tmp_path_factory):
    """A data run, a SASRec trained on training transitions, and the same refitted."""
    from pipelines.stages import run_data, run_train

    root = tmp_path_factory.mktemp("runs")
    common = [f"run.root={root}", "data.synthetic.n_users=120", "data.synthetic.n_items=40", "data.max_history=6",
              "model.d_model=16", "model.n_layers=1", "model.d_ff=32", "trainer.resources.use_ray=false",
              "trainer.optim.epochs=1", "trainer.resources.threads=1"]
    exp = load_experiment(None, common)
    data_dir = run_data(exp)
    plain = run_train(exp, data_dir=data_dir)
    refit = run_train(load_experiment(None, [*common, "trainer.selection.refit=true", "run.name=refit"]),
                      data_dir=data_dir)
    return root, data_dir, plain, refit


def test_behaviour_ids_come_from_a_trained_models_item_embeddings_and_train_a_generative_model(sasrec_runs):
    from pipelines.stages import run_ids_stage, run_train
    from recsys.semantic_ids import SemanticIdIndex

    root, data_dir, plain, refit = sasrec_runs
    ids_exp = load_experiment(None, [f"run.root={root}", "ids.method=hkmeans", "ids.use_ray=false",
                                     "ids.hkmeans.branching=4", "ids.hkmeans.max_levels=2"])
    ids_dir = run_ids_stage(ids_exp, train_dir=plain)
    assert read_json(ids_dir / "config.json")["train_dir"] == str(plain.resolve())
    assert len(SemanticIdIndex.load(ids_dir / "index")) == 40
    with pytest.raises(ValueError, match="is a refit .* would leak those into validation"):
        run_ids_stage(ids_exp, train_dir=refit)
    tiger = load_experiment(None, [f"run.root={root}", "model.name=tiger", "model.d_model=16", "model.n_heads=1",
                                   "model.head_dim=16", "model.d_ff=32", "model.n_encoder_layers=1",
                                   "model.n_decoder_layers=1", "data.max_history=6", "trainer.resources.use_ray=false",
                                   "trainer.optim.epochs=1", "trainer.resources.threads=1"])
    with pytest.raises(ValueError, match="has no ID space 'behavior'"):
        run_train(tiger, data_dir=data_dir, ids_dirs={"behavior": ids_dir})
    train_dir = run_train(tiger, data_dir=data_dir, ids_dirs={"semantic": ids_dir})
    assert read_json(train_dir / "config.json")["ids_dirs"] == {"semantic": str(ids_dir)}
    with pytest.raises(ValueError, match="holds a Tiger, which exposes no item vectors"):
        run_ids_stage(ids_exp, train_dir=train_dir)
