"""Pin a refactor: train small SASRec and TIGER variants for two epochs on synthetic data and
compare losses, validation and test figures before and after, from the same initial weights.

    python benchmarks/refactor_parity.py --before <commit> [--tolerance 1e-6]

checks out ``<commit>`` in a temporary git worktree, runs every case there (in a subprocess
whose ``PYTHONPATH`` is that worktree), saves each case's initial state_dict, then runs the
same cases with this working tree's code starting from those weights (through the checkpoint
loader's key mapping, so a change of weight layout compares like with like), and prints the
largest difference per case. Exit status 1 when any difference exceeds the tolerance.

``run_case`` is also what ``tests/test_pinned.py`` pins, from ``tests/fixtures/pinned-init``.
The script uses only APIs that existed before the 2026-12-03 refactor, so it runs on both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CASES: dict[str, list[str]] = {
    "sasrec": ["model.name=sasrec", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64"],
    "sasrec-bce": ["model.name=sasrec", "model.d_model=32", "model.n_layers=1", "model.d_ff=64", "model.loss=bce",
                   "model.n_negatives=4"],
    "tiger": ["model.name=tiger", "model.d_model=32", "model.n_encoder_layers=1", "model.n_decoder_layers=1",
              "model.n_heads=2", "model.head_dim=16", "model.d_ff=64", "model.beam_size=20"],
    "tiger-pout": ["model.name=tiger", "model.d_model=32", "model.n_encoder_layers=1", "model.n_decoder_layers=1",
                   "model.n_heads=2", "model.head_dim=16", "model.d_ff=64", "model.beam_size=20",
                   "model.prefix_embeddings=true", "model.prefix_outputs=true", "model.user_tokens=7"],
}
TRAINER = ["trainer.resources.use_ray=false", "trainer.optim.epochs=2", "trainer.optim.batch_size=64",
           "trainer.optim.lr=0.003", "trainer.selection.patience=0", "trainer.data.samples=prefixes",
           "trainer.selection.select_metric=recall@10", "trainer.data.seed=0",
           "trainer.data.precision=fp32"]  # the fixtures were written in fp32 (the default is now auto)
N_ITEMS, MAX_HISTORY = 80, 10
CHECKPOINT = "tests/fixtures/tiger-small"


def split_and_context():
    """The synthetic split and a fixed two-level semantic-ID table (collisions get a third level)."""
    from recsys.data import SyntheticConfig, generate_synthetic
    from recsys.data.split import leave_one_out
    from recsys.models import semantic_id_table
    from recsys.semantic_ids import SemanticIdIndex

    data = generate_synthetic(SyntheticConfig(n_users=300, n_items=N_ITEMS, n_topics=4, seed=1))
    split = leave_one_out(data, MAX_HISTORY)
    codes = torch.randint(0, 6, (N_ITEMS, 2), generator=torch.Generator().manual_seed(0))
    index = SemanticIdIndex(item_ids=torch.arange(1, N_ITEMS + 1), codes=codes, codebook_sizes=[6, 6])
    try:  # the context build_model takes: before the refactor, the table itself
        from recsys.models import IdTable
    except ImportError:
        return split, {"semantic_ids": semantic_id_table(index, N_ITEMS), "level_sizes": index.level_sizes}
    return split, {"ids": {"semantic": IdTable.from_index(index, N_ITEMS)}}


def run_case(name: str, init_state: dict[str, torch.Tensor] | None = None, threads: int = 1,
             save_init: Path | None = None) -> dict:
    """Two epochs of case ``name``; returns per-epoch losses and validation figures, and test.

    ``init_state`` replaces the seeded initial weights (it may be in an earlier weight layout:
    ``recsys.training.checkpoint.upgrade_state`` maps it where that exists)."""
    from recsys.experiment import load_experiment
    from recsys.training.evaluate import evaluate
    from recsys.training.session import build_trainer

    torch.set_num_threads(threads)
    split, context = split_and_context()
    exp = load_experiment(None, [*CASES[name], *TRAINER, f"data.max_history={MAX_HISTORY}"])
    needs_ids = name.startswith("tiger")
    trainer = build_trainer(exp, split, context=context if needs_ids else None)
    torch.set_num_threads(threads)  # build_trainer sets trainer.threads when given
    if save_init is not None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()}, str(save_init))
    if init_state is not None:
        trainer.model.load_state_dict(_upgrade(name, init_state))
    state = trainer.fit(lambda metrics, improved, t: None)
    test = evaluate(trainer.model, split.test, batch_size=128)
    return {"loss": [h["train_loss"] for h in state.history],
            "valid": [{k[len("valid_"):]: v for k, v in h.items() if k.startswith("valid_")} for h in state.history],
            "test": test}


def _upgrade(name: str, state: dict) -> dict:
    try:
        from recsys.training.checkpoint import upgrade_state
    except ImportError:  # before the refactor: the layout is the one it was saved in
        return state
    return upgrade_state(name.split("-")[0], state)


def checkpoint_figures(threads: int = 1) -> dict[str, float]:
    """Test figures of the small trained TIGER checkpoint in tests/fixtures, loaded by the
    checkpoint loader (so an earlier weight layout goes through its key mapping)."""
    from recsys.training.checkpoint import load_model
    from recsys.training.evaluate import evaluate

    torch.set_num_threads(threads)
    split, _ = split_and_context()
    return evaluate(load_model(Path(__file__).resolve().parents[1] / CHECKPOINT), split.test, batch_size=128)


def write_fixtures(directory: Path, cases: list[str]) -> None:
    """The pinned tests' inputs and expected figures, from the code importable now."""
    from recsys.training.checkpoint import save_checkpoint
    from recsys.training.evaluate import evaluate
    from recsys.training.session import build_trainer
    from recsys.experiment import load_experiment

    (directory / "pinned-init").mkdir(parents=True, exist_ok=True)
    results = {c: run_case(c, save_init=directory / "pinned-init" / f"{c}.safetensors") for c in cases}
    # the checkpoint: the tiger-pout case trained as above, saved with the model's own writer
    torch.set_num_threads(1)
    split, context = split_and_context()
    exp = load_experiment(None, [*CASES["tiger-pout"], *TRAINER, f"data.max_history={MAX_HISTORY}"])
    trainer = build_trainer(exp, split, context=context)
    trainer.fit(lambda metrics, improved, t: None)
    save_checkpoint(directory / "tiger-small", trainer.model, "tiger")
    results["tiger-small-checkpoint"] = {"test": evaluate(trainer.model, split.test, batch_size=128)}
    (directory / "pinned-results.json").write_text(json.dumps(results, indent=1) + "\n")


def differences(before: dict, after: dict) -> dict[str, float]:
    """Largest absolute difference per quantity."""
    out = {"loss": max(abs(a - b) for a, b in zip(before["loss"], after["loss"]))}
    out["valid"] = max(abs(a[k] - b[k]) for a, b in zip(before["valid"], after["valid"]) for k in a)
    out["test"] = max(abs(before["test"][k] - after["test"][k]) for k in before["test"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="the commit to compare against (checked out in a temporary worktree)")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write-fixtures", type=Path, metavar="DIR",
                        help="write DIR/pinned-init/<case>.safetensors, DIR/pinned-results.json and the small "
                             "TIGER checkpoint DIR/tiger-small/ (what tests/test_pinned.py reads), then exit")
    # internal: run the cases with whatever code is importable and write the results
    parser.add_argument("--emit", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write_fixtures:
        write_fixtures(args.write_fixtures, args.cases)
        return 0
    if args.emit:
        results = {c: run_case(c, threads=args.threads, save_init=args.emit.parent / f"{c}.safetensors")
                   for c in args.cases}
        results[CHECKPOINT] = checkpoint_figures(args.threads)
        args.emit.write_text(json.dumps(results))
        return 0
    if not args.before:
        parser.error("--before COMMIT is required")
    from safetensors.torch import load_file

    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        tree, out = Path(tmp) / "before", Path(tmp) / "before.json"
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", "-q", str(tree), args.before],
                       check=True)
        try:
            env = {**os.environ, "PYTHONPATH": str(tree)}
            subprocess.run([sys.executable, __file__, "--emit", str(out), "--threads", str(args.threads),
                            "--cases", *args.cases], cwd=tree, env=env, check=True)
            before = json.loads(out.read_text())
            after = checkpoint_figures(args.threads)
            worst = max(abs(before[CHECKPOINT][k] - after[k]) for k in after)
            print(f"{CHECKPOINT:12s} test {before[CHECKPOINT]} -> {after}\n{'':12s} max |diff|: {worst:.2e}")
            for case in args.cases:
                after = run_case(case, load_file(str(Path(tmp) / f"{case}.safetensors")), threads=args.threads)
                diff = differences(before[case], after)
                worst = max(worst, *diff.values())
                print(f"{case:12s} loss {before[case]['loss']} -> {after['loss']}")
                print(f"{'':12s} max |diff|: " + ", ".join(f"{k} {v:.2e}" for k, v in diff.items()))
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], check=False)
    verdict = "OK" if worst <= args.tolerance else "FAIL"
    print(f"largest difference {worst:.2e} (tolerance {args.tolerance:.0e}): {verdict}")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
