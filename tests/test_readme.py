"""The README's two commands are real: they are Makefile targets that build the venv with the
pinned torch first, CI calls the test command, and the demo target runs `recsys demo` on the
configs it names (the pipeline runs end to end in test_e2e_ray.py; the demo's parts in test_demo.py)."""

import re
import subprocess
from pathlib import Path

from pipelines.demo import load_demo

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


def test_demo_runs_the_demo_on_configs_that_load_offline():
    steps = make_dry_run("demo").splitlines()
    (run,) = [s for s in steps if "recsys demo" in s]
    words = run.split("recsys demo", 1)[1].split()
    config, baseline = words[0], words[words.index("--baseline") + 1]
    exp, base = load_demo(ROOT / config, ROOT / baseline)
    assert exp.data.format == "synthetic" and exp.data.path is None  # embedded, needs no download
    assert base.data == exp.data  # the baseline trains on the demo's data run
    assert (exp.model_name, base.model_name) == ("tiger", "sasrec")
    assert "python tests/suite.py" in make_dry_run("test")
