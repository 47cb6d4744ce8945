"""YAML + dotted overrides -> validated dataclasses; bad values name what is allowed."""

import pytest

from recsys.config import parse_overrides
from recsys.experiment import load_experiment
from recsys.models import SASRecConfig


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_compose(tmp_path):
    path = write(tmp_path, "model:\n  name: sasrec\n  d_model: 32\ntrainer:\n  optim:\n    epochs: 3\n")
    exp = load_experiment(path, ["trainer.optim.epochs=5", "model.n_layers=3", "trainer.data.precision=bf16", "trainer.optim.lr=3e-4"])
    assert exp.trainer.optim.lr == 3e-4
    assert exp.trainer.optim.epochs == 5 and exp.trainer.data.precision == "bf16"
    assert isinstance(exp.model, SASRecConfig)
    assert (exp.model.d_model, exp.model.n_layers) == (32, 3)
    assert exp.to_dict()["model"]["d_model"] == 32


def test_defaults_need_no_file():
    exp = load_experiment(None)
    assert exp.data.format == "synthetic" and exp.model_name == "sasrec"


@pytest.mark.parametrize("override, message", [
    ("trainer.optim.epochs=0", r"trainer.optim.epochs=0 is out of range; allowed: 1 <= trainer.optim.epochs"),
    ("trainer.data.precision=fp8", r"trainer.data.precision='fp8' is not allowed; choose one of \['auto', 'fp32', 'bf16'\]"),
    ("model.dropout=1.5", r"model.dropout=1.5 is out of range"),
    ("model.name=gpt", r"model.name='gpt' is not allowed; choose one of \['eager', 'hstu', 'sasrec'"),
    ("trainer.epoch=3", r"unknown config key\(s\) \['trainer.epoch'\]"),
    ("trainer.optim.batch_size=abc", r"trainer.optim.batch_size must be a number"),
    ("trainer.optim.batch_size=2.5", r"trainer.optim.batch_size must be an integer"),
    ("trainer.selection.select_metric=mrr", r"trainer.selection.select_metric='mrr' is not allowed"),
    ("model.n_heads=3", r"model.d_model=64 must be divisible by model.n_heads=3"),
    ("ids.max_failures=-2", r"ids.max_failures=-2 is out of range; allowed: -1 <= ids.max_failures"),
])
def test_out_of_range_values_raise_with_what_is_allowed(override, message):
    with pytest.raises(ValueError, match=message):
        load_experiment(None, [override])


@pytest.mark.parametrize("override, message", [
    ("model.n_heads=3", r"model.d_model=64 must be divisible by model.n_heads=3"),
    ("model.emb_dropout=0.99", r"model.emb_dropout=0.99 is out of range"),
    ("model.n_layers=0", r"model.n_layers=0 is out of range"),
])
def test_the_two_towers_user_encoder_is_checked_as_sasrecs(override, message):
    for name in ("sasrec", "two_tower"):
        with pytest.raises(ValueError, match=message):
            load_experiment(None, [f"model.name={name}", override])


def test_bad_override_syntax_and_bad_yaml(tmp_path):
    with pytest.raises(ValueError, match="must look like key.subkey=value"):
        parse_overrides(["trainer.optim.epochs"])
    with pytest.raises(ValueError, match="not valid YAML"):
        load_experiment(write(tmp_path, "trainer: [unclosed\n"))
    with pytest.raises(ValueError, match="top level must be a mapping"):
        load_experiment(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_experiment(tmp_path / "missing.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    # tune-*.yaml are sweep configs (a base experiment + a sweep section): test_tune loads those.
    configs = sorted(p for p in (Path(__file__).parent.parent / "configs").glob("*.yaml")
                     if not p.name.startswith("tune-"))
    assert configs, "configs/ should ship at least one YAML"
    for path in configs:
        load_experiment(path)


def test_on_off_yes_no_are_words_and_only_true_false_are_booleans(tmp_path):
    """YAML 1.1 would read off/on/yes/no as booleans, so a choice named "off" could not be given."""
    assert parse_overrides(["a=off", "b=on", "c=yes", "d=no", "e=true", "f=False"]) == {
        "a": "off", "b": "on", "c": "yes", "d": "no", "e": True, "f": False}
    exp = load_experiment(write(tmp_path, "model:\n  name: two_tower\n  log_q: off\n"))
    assert exp.model.log_q == "off"
    exp = load_experiment(None, ["model.name=eager", "model.gct=off", "trainer.resources.use_ray=false"])
    assert exp.model.gct == "off" and exp.trainer.resources.use_ray is False
    assert load_experiment(None, ["model.name=hstu", "model.time_bias=on"]).model.time_bias == "on"
    with pytest.raises(ValueError, match="trainer.resources.use_ray must be true or false"):
        load_experiment(None, ["trainer.resources.use_ray=off"])
