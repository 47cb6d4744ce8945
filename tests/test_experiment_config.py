"""The sectioned trainer config, its old flat keys, the typed model section and base_config chains."""

import dataclasses
import json
import warnings
from pathlib import Path

import pytest

import recsys.config
from recsys.experiment import (
    experiment_dict_from_run, experiment_from_dict, load_experiment, resumed_experiment,
)
from recsys.models import TigerConfig
from recsys.sweep import Sweep, SweepConfig, load_sweep
from recsys.training.config import RENAMED_TRAINER_KEYS, TrainerConfig

CONFIGS = Path(__file__).parent.parent / "configs"
# Every config in configs/ resolved (base_config chains, defaults filled in) by the code before the
# trainer was split into sections and before configs used base_config, with the flat trainer keys
# moved by RENAMED_TRAINER_KEYS. Regenerate only when a config is meant to change.
RESOLVED = Path(__file__).parent / "data" / "resolved_configs.json"

# A train run's config.json trainer section as written before the sections (every old key).
OLD_TRAINER = {
    "epochs": 20, "stop_epoch": 14, "batch_size": 128, "lr": 0.002, "weight_decay": 0.1, "schedule": "cosine",
    "warmup_steps": 500, "grad_clip": 1.0, "ema": 0.999, "precision": "fp32", "samples": "prefixes", "bucket": 50,
    "patience": 0, "select_metric": "recall@10", "eval_every": 2, "valid_users": 5000, "valid_seed": 3, "seed": 7,
    "refit": True, "use_ray": False, "num_workers": 2, "use_gpu": False, "cpus_per_worker": 2.0, "threads": 1,
    "keep_checkpoints": 3, "max_failures": -1,
}


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each old key warns once per process; each test starts as a fresh process would."""
    monkeypatch.setattr(recsys.config, "_WARNED_RENAMES", set())


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_sections_hold_every_old_key_once():
    trainer = TrainerConfig()
    new_keys = {f"trainer.{section.name}.{f.name}" for section in dataclasses.fields(trainer)
                for f in dataclasses.fields(getattr(trainer, section.name))}
    added_since = {"trainer.data.ranker_holdout", "trainer.data.folds", "trainer.data.fold",
                   "trainer.data.drop_last_transitions"}  # born in their section
    assert set(RENAMED_TRAINER_KEYS.values()) == new_keys - added_since
    assert {k.split(".")[1] for k in RENAMED_TRAINER_KEYS} == set(OLD_TRAINER)


@pytest.mark.parametrize("where", ["yaml", "override"])
def test_an_old_key_maps_to_its_section_with_a_warning_naming_the_new_key(tmp_path, where):
    path = write(tmp_path, "c.yaml", "trainer:\n  lr: 2.0e-3\n" if where == "yaml" else "{}\n")
    overrides = ["trainer.lr=2.0e-3"] if where == "override" else []
    with pytest.warns(FutureWarning, match=r"trainer\.lr -> trainer\.optim\.lr") as caught:
        exp = load_experiment(path, overrides)
    assert exp.trainer.optim.lr == 2.0e-3
    assert len([w for w in caught if issubclass(w.category, FutureWarning)]) == 1
    with warnings.catch_warnings():  # once per process: the same old key again says nothing
        warnings.simplefilter("error", FutureWarning)
        assert load_experiment(path, overrides).trainer.optim.lr == 2.0e-3


def test_a_yaml_with_old_keys_is_refined_by_a_new_key_override(tmp_path):
    path = write(tmp_path, "c.yaml", "trainer:\n  epochs: 3\n  lr: 1.0e-3\n")
    with pytest.warns(FutureWarning):
        exp = load_experiment(path, ["trainer.optim.epochs=5"])
    assert (exp.trainer.optim.epochs, exp.trainer.optim.lr) == (5, 1.0e-3)


@pytest.mark.parametrize("yaml_text, overrides", [
    ("trainer:\n  lr: 1.0e-3\n  optim:\n    lr: 2.0e-3\n", []),
    ("{}\n", ["trainer.lr=1e-3", "trainer.optim.lr=2e-3"]),
])
def test_the_old_and_the_new_key_together_are_an_error_naming_both(tmp_path, yaml_text, overrides):
    path = write(tmp_path, "c.yaml", yaml_text)
    with pytest.raises(ValueError, match=r"trainer\.lr and trainer\.optim\.lr are the same setting"):
        load_experiment(path, overrides)


def test_an_old_runs_flat_config_json_loads(tmp_path):
    saved = {**json.loads(RESOLVED.read_text())["beauty-tiger-wd-ema.yaml"], "trainer": dict(OLD_TRAINER),
             "data_dir": "/runs/data/x", "ids_dir": "/runs/ids/y"}
    with pytest.warns(FutureWarning, match=r"config\.json"):
        exp = experiment_from_dict(experiment_dict_from_run(saved))  # recsys evaluate, serve, benchmarks
    t = exp.trainer
    assert (t.optim.epochs, t.optim.stop_epoch, t.optim.lr, t.optim.ema) == (20, 14, 0.002, 0.999)
    assert (t.data.samples, t.data.seed, t.data.precision, t.data.bucket) == ("prefixes", 7, "fp32", 50)
    assert (t.selection.valid_seed, t.selection.refit, t.selection.eval_every) == (3, True, 2)
    assert (t.resources.num_workers, t.resources.max_failures, t.resources.threads) == (2, -1, 1)
    # recsys train --resume: the saved config, refined by overrides in either naming
    resumed = resumed_experiment(saved, ["trainer.optim.epochs=30", "trainer.threads=2"])
    assert (resumed.trainer.optim.epochs, resumed.trainer.resources.threads, resumed.trainer.optim.lr) == (30, 2, 0.002)
    assert resumed.to_dict()["trainer"]["optim"]["epochs"] == 30


def test_an_old_sweep_run_resumes_with_its_old_swept_keys():
    """tune --resume: the saved sweep (base with flat trainer keys, params keyed trainer.lr)."""
    base = json.loads(RESOLVED.read_text())["tune-demo.yaml"]["base"]
    base = {**base, "trainer": {"epochs": 4, "lr": 3.0e-3, "samples": "prefixes", "patience": 0}}
    state = {"source": "configs/tune-demo.yaml", "base": base,
             "sweep": {"params": {"trainer.lr": {"grid": [3.0e-3, 1.0e-5]}}, "metric": "recall@10"}}
    with pytest.warns(FutureWarning):
        sweep = Sweep.from_state(state)
    assert [s.key for s in sweep.config.specs] == ["trainer.lr"]  # the trials' keys, as Tune stored them
    exp = sweep.trial_experiment({"trainer.lr": 1.0e-5})
    assert exp.trainer.optim.lr == 1.0e-5 and exp.trainer.optim.epochs == 4 and not exp.trainer.resources.use_ray
    assert sweep.base_values() == {"trainer.lr": 3.0e-3}


def test_sweep_params_accept_old_keys_and_refuse_both_or_fixed_ones(tmp_path):
    sweep_yaml = "base:\n  trainer: {{optim: {{epochs: 2}}, data: {{samples: prefixes}}}}\nsweep:\n  params:\n{params}"
    path = write(tmp_path, "s.yaml", sweep_yaml.format(params="    trainer.lr: {grid: [1.0e-3, 2.0e-3]}\n"))
    with pytest.warns(FutureWarning, match=r"trainer\.lr -> trainer\.optim\.lr"):
        sweep = load_sweep(path)
    assert sweep.trial_experiment({"trainer.lr": 2.0e-3}).trainer.optim.lr == 2.0e-3
    both = write(tmp_path, "b.yaml", sweep_yaml.format(
        params="    trainer.lr: {grid: [1.0e-3]}\n    trainer.optim.lr: {grid: [2.0e-3]}\n"))
    with pytest.raises(ValueError, match=r"sweep.params.trainer.lr and sweep.params.trainer.optim.lr"):
        load_sweep(both)
    with pytest.raises(ValueError, match=r"sweep.params.trainer.epochs cannot be swept"), pytest.warns(FutureWarning):
        SweepConfig(params={"trainer.epochs": {"grid": [1, 2]}})


def test_base_config_chains_relative_to_each_file(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, "root.yaml", "model:\n  name: tiger\n  d_model: 64\ntrainer:\n  optim:\n    lr: 1.0e-3\n"
          "    epochs: 7\n")
    write(tmp_path / "sub", "mid.yaml", "base_config: ../root.yaml\ntrainer:\n  lr: 2.0e-3\n")  # an old key
    leaf = write(tmp_path / "sub", "leaf.yaml", "base_config: mid.yaml\nmodel:\n  dropout: 0.3\nrun:\n  name: leaf\n")
    with pytest.warns(FutureWarning):
        exp = load_experiment(leaf, ["trainer.optim.epochs=9"])
    assert isinstance(exp.model, TigerConfig) and (exp.model.d_model, exp.model.dropout) == (64, 0.3)
    assert (exp.trainer.optim.lr, exp.trainer.optim.epochs, exp.run.name) == (2.0e-3, 9, "leaf")


def test_base_config_cycle_and_missing_base_name_the_files(tmp_path):
    write(tmp_path, "a.yaml", "base_config: b.yaml\n")
    write(tmp_path, "b.yaml", "base_config: a.yaml\n")
    with pytest.raises(ValueError, match=r"base_config forms a cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_experiment(tmp_path / "a.yaml")
    write(tmp_path, "c.yaml", "base_config: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"c\.yaml: base_config .*nowhere\.yaml does not exist"):
        load_experiment(tmp_path / "c.yaml")


@pytest.mark.parametrize("override, message", [
    ("trainer.optim.lrr=1", r"unknown config key\(s\) \['trainer.optim.lrr'\]; allowed: \['batch_size'"),
    ("trainer.resources.gpus=1", r"unknown config key\(s\) \['trainer.resources.gpus'\]"),
    ("trainer.epoch=3", r"unknown config key\(s\) \['trainer.epoch'\]; allowed: \['data', 'optim', 'resources'"),
    ("model.d_modl=3", r"unknown config key\(s\) \['model.d_modl'\]; allowed: \[.*'d_model'"),
    ("trainer.optim.lr=0", r"trainer.optim.lr=0.0 is out of range"),
    ("trainer.selection.select_metric=mrr", r"trainer.selection.select_metric='mrr' is not allowed"),
    ("trainer.data.precision=fp8", r"trainer.data.precision='fp8' is not allowed"),
    ("trainer.resources.num_workers=0", r"trainer.resources.num_workers=0 is out of range"),
])
def test_unknown_or_bad_section_keys_name_the_dotted_path(override, message):
    with pytest.raises(ValueError, match=message):
        load_experiment(None, [override])


def test_the_model_section_is_the_models_own_config_and_round_trips():
    exp = load_experiment(None, ["model.name=tiger", "model.d_model=32", "model.head_dim=16"])
    assert isinstance(exp.model, TigerConfig) and exp.model_name == "tiger"
    saved = exp.to_dict()
    assert saved["model"] == {"name": "tiger", **dataclasses.asdict(exp.model)}
    again = experiment_from_dict(json.loads(json.dumps(saved)))
    assert again == exp and again.to_dict() == saved


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_resolves_as_before(name):
    expected = json.loads(RESOLVED.read_text())
    assert name in expected, f"configs/{name} is new: add its resolved dict to {RESOLVED.name}"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # shipped configs use the current key names
        if name.startswith("tune-"):
            sweep = load_sweep(CONFIGS / name)
            resolved = {"base": sweep.base_experiment().to_dict(), "sweep": sweep.to_dict()["sweep"]}
        else:
            resolved = load_experiment(CONFIGS / name).to_dict()
    model = (resolved["base"] if "base" in resolved else resolved)["model"]["name"]
    defaults = load_experiment(None, [f"model.name={model}"]).to_dict()  # that model's own defaults
    assert only_added_defaults(json.loads(json.dumps(resolved)), expected[name], defaults) == expected[name]


def only_added_defaults(resolved: dict, expected: dict, defaults: dict, where: str = "") -> dict:
    """``resolved`` less the keys the pin predates, each of which must hold its field's default in
    ``defaults`` (an experiment with the same model): a key added later, such as
    data.synthetic.time_signal or a model's new option, must not change a shipped config."""
    out = {}
    for key, value in resolved.items():
        path = f"{where}.{key}" if where else key
        if key not in expected:
            default = defaults
            for part in path.split(".")[1 if path.startswith("base.") else 0:]:
                default = default.get(part, {}) if isinstance(default, dict) else {}
            assert value == default, f"{path}={value!r} is new and not its default {default!r}"
            continue
        out[key] = only_added_defaults(value, expected[key], defaults, path) \
            if isinstance(value, dict) and isinstance(expected[key], dict) else value
    return out
