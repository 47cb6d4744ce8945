"""The README's two commands are real: they are Makefile targets that build the venv with the
pinned torch first, CI calls the test command, and the demo target runs the pipeline on the
config it names (the pipeline itself runs end to end in test_e2e_ray.py)."""

import re
import subprocess
from pathlib import Path

from recsys.experiment import load_experiment

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def make_dry_run(target: str) -> str:
    return subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_readme_gives_exactly_two_commands_and_ci_runs_the_test_one():
    demo, test = readme_commands()
    assert (demo, test) == ("make demo", "make test")
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)


def test_both_commands_install_pinned_torch_before_the_package():
    for target in ("demo", "test"):
        steps = make_dry_run(target).splitlines()
        torch_step = next(i for i, s in enumerate(steps) if "install --quiet torch==2.13.0" in s)
        package_step = next(i for i, s in enumerate(steps) if "install --quiet -e '.[dev]'" in s)
        assert torch_step < package_step
        assert any("-m venv .venv" in s for s in steps)


def test_demo_runs_the_pipeline_on_a_config_that_loads_offline():
    steps = make_dry_run("demo").splitlines()
    (run,) = [s for s in steps if "recsys pipeline" in s]
    config = run.split("recsys pipeline", 1)[1].split()[0]
    exp = load_experiment(ROOT / config)
    assert exp.data.format == "synthetic" and exp.data.path is None  # embedded, needs no download
    assert exp.trainer.resources.use_ray
    assert "python -m pytest" in make_dry_run("test")
