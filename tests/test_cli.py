"""Command-line parsing: config words before or after options, and what is still rejected; what a
train run records of the ids run it was given."""

from pathlib import Path

import pytest

from pipelines.cli import build_parser, parse_args


def parse(*argv):
    return parse_args(build_parser(), list(argv))


def test_overrides_after_a_run_option_join_the_config_words():
    ns = parse("train", "configs/beauty-tiger.yaml", "--data", "runs/data/x", "trainer.optim.epochs=3", "model.dropout=0.3")
    assert ns.config == ["configs/beauty-tiger.yaml", "trainer.optim.epochs=3", "model.dropout=0.3"]
    assert ns.data == Path("runs/data/x")
    ns = parse("tune", "--embed", "runs/embed/y", "configs/tune-demo.yaml", "sweep.num_samples=2")
    assert ns.config == ["configs/tune-demo.yaml", "sweep.num_samples=2"] and ns.embed == Path("runs/embed/y")
    assert parse("train", "a.yaml", "k=v").config == ["a.yaml", "k=v"]  # the usual order is unchanged


@pytest.mark.parametrize("argv", [
    ("train", "a.yaml", "--data", "d", "b.yaml"),  # a second config file after overrides began
    ("train", "--data", "d", "--bogus"),  # an unknown option
    ("evaluate", "runs/train/x", "extra.key=1"),  # evaluate takes no overrides
])
def test_words_that_fit_nowhere_are_still_rejected(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_a_train_run_records_the_ids_runs_settings_and_notes_where_the_config_differs(tmp_path, capsys):
    from pipelines.stages import ids_settings
    from recsys.experiment import load_experiment
    from recsys.runs import write_json

    built = load_experiment(None, ["ids.method=hkmeans", "ids.hkmeans.max_levels=2", "ids.use_ray=false"]).to_dict()["ids"]
    write_json(tmp_path / "config.json", {"ids": built, "embed_dir": "e"})
    configured = load_experiment(None, ["ids.method=hkmeans", "ids.hkmeans.max_levels=3"]).to_dict()["ids"]
    assert ids_settings(configured, tmp_path) == built
    out = capsys.readouterr().out
    assert "ids.hkmeans.max_levels" in out and "use_ray" not in out  # how they were computed is no note
    assert ids_settings(built, tmp_path) == built and capsys.readouterr().out == ""


def test_serve_takes_inference_settings_as_key_value_pairs_and_names_a_malformed_one():
    from pipelines.cli import inference_settings

    ns = parse_args(build_parser(), ["serve", "RUN", "--inference", "fusion=behavior", "--inference", "beam_size=50"])
    assert inference_settings(ns.inference) == {"fusion": "behavior", "beam_size": "50"}
    assert inference_settings([]) == {}
    for bad in ("fusion", "=behavior", "fusion="):
        with pytest.raises(ValueError, match=f"--inference '{bad}' must be KEY=VALUE"):
            inference_settings([bad])
