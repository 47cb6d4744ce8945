"""Fault tolerance: a Ray Train worker killed mid-run is replaced and training continues from the
last checkpoint; a crash never leaves a half-written checkpoint, and a stage that did not finish
leaves no COMPLETE marker, so the stages that read it refuse it."""

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.cli import main
from recsys.runs import COMPLETE_FILE, IncompleteRunError, read_json, require_complete
from recsys.training.checkpoint import load_train_state


def only_dir(path: Path) -> Path:
    (found,) = [p for p in path.iterdir() if p.is_dir()]
    return found


def epoch_log(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "epochs.jsonl").read_text().splitlines()]


def in_process(tiny_overrides, *more):
    return [*tiny_overrides, "trainer.resources.use_ray=false", *more]


# --- the Ray path: SIGKILL the training worker ------------------------------------------------

def latest_checkpoint_epoch(runs: Path) -> int:
    """The epoch of the checkpoint Ray Train would restore now: the latest one its controller has
    registered (its snapshot file), not merely one a worker has copied to storage."""
    for path in runs.glob("train/*/ray-train/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(path.read_text())["latest_checkpoint_result"]
        except (ValueError, KeyError, OSError):  # being rewritten
            continue
        return latest["metrics"]["epoch"] if latest else 0
    return 0


def kill_worker_after_epoch(address: str, runs: Path, epoch: int, record: dict, deadline_s: float) -> None:
    """Once the checkpoint of ``epoch`` or later is registered, SIGKILL the Ray Train worker of the
    Ray instance at ``address`` (others may run on a shared machine)."""
    from ray.util.state import list_actors

    stop, pid = time.monotonic() + deadline_s, None
    while time.monotonic() < stop:
        if pid is None:  # found first: the State API is slow on a busy machine, the kill must not be
            workers = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"),
                                                             ("state", "=", "ALIVE")])
            pid = workers[0].pid if len(workers) == 1 else None
        elif latest_checkpoint_epoch(runs) >= epoch:
            record["restorable_epoch"] = latest_checkpoint_epoch(runs)
            os.kill(pid, signal.SIGKILL)
            record.update(pid=pid, killed_at=time.time())
            return
        time.sleep(0.05)
    record["timeout"] = f"no checkpoint of epoch >= {epoch} within {deadline_s} s (worker pid {pid}); " \
                        f"latest: {latest_checkpoint_epoch(runs)}"


@pytest.mark.ray
def test_killed_ray_train_worker_resumes_from_the_last_checkpoint(ray_session, tiny_overrides, tmp_path):
    runs, epochs = tmp_path / "runs", 6
    record: dict = {}
    address = ray_session.get_runtime_context().gcs_address
    killer = threading.Thread(target=kill_worker_after_epoch, args=(address, runs, 2, record, 240), daemon=True)
    killer.start()
    # ~300 steps of batch 4 per epoch, about 1 s on a 2-core machine (+ validation, checkpoint):
    # the kill lands mid-run
    code = main(["train", *tiny_overrides, "data.synthetic.n_users=1200", "trainer.optim.batch_size=4",
                 "trainer.selection.valid_users=200", f"trainer.optim.epochs={epochs}", "trainer.resources.max_failures=1",
                 "trainer.resources.threads=1"])
    killer.join(timeout=10)
    assert "pid" in record, f"the worker was never killed: {record}"
    assert code == 0, f"training did not survive the kill: {record}"
    run_dir = only_dir(runs / "train")
    history = epoch_log(run_dir)
    metrics = read_json(run_dir / "metrics.json")
    context = f"kill: {record}; epochs: {[(h['epoch'], h.get('resumed_from_epoch')) for h in history]}; " \
              f"metrics: { {k: metrics[k] for k in ('resumed_from_epochs', 'worker_restarts', 'epochs_run')} }"
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1)), context
    restored = record["restorable_epoch"]  # the last checkpoint before the kill
    assert restored < epochs, f"training finished before the kill landed; {context}"
    assert metrics["worker_restarts"] == 1 and metrics["resumed_from_epochs"] == [restored], context
    assert metrics["epochs_run"] == epochs, context
    # not from scratch: epochs up to the checkpoint come from before the kill, the rest from after
    assert history[restored]["resumed_from_epoch"] == restored, context
    assert all(h["finished_at"] < record["killed_at"] for h in history[:restored]), context
    assert all(h["finished_at"] > record["killed_at"] for h in history[restored:]), context
    assert "1 Ray Train worker restart(s)" in (run_dir / "summary.md").read_text()
    assert require_complete(run_dir, "train") == run_dir.resolve()
    print(context)  # the evidence, shown with -rP


# --- the in-process path: a crash, then `recsys train --resume` --------------------------------

class Crash(RuntimeError):
    pass


def crash_validation_at(monkeypatch, epoch: int) -> None:
    """Make validation raise in ``epoch``: after the checkpoint of ``epoch - 1``, before its own."""
    from recsys.training.loop import Trainer

    real = Trainer.validate

    def validate(self):
        if self.state.epoch == epoch:
            raise Crash(f"injected crash in epoch {epoch}")
        return real(self)

    monkeypatch.setattr(Trainer, "validate", validate)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / "last" / "model.safetensors"))


def test_crashed_train_run_is_refused_then_resumes_like_an_uninterrupted_one(tiny_overrides, tmp_path,
                                                                             monkeypatch, capsys):
    args = in_process(tiny_overrides, "trainer.optim.epochs=4")
    assert main(["train", *args, "run.name=whole"]) == 0
    whole = only_dir(tmp_path / "runs" / "train")
    with monkeypatch.context() as patch:
        crash_validation_at(patch, 3)
        with pytest.raises(Crash):
            main(["train", *args, "run.name=crashed"])
    (crashed,) = [p for p in (tmp_path / "runs" / "train").iterdir() if p.name.endswith("crashed")]
    assert (crashed / "config.json").is_file() and (crashed / "checkpoints" / "last").is_dir()
    assert not (crashed / COMPLETE_FILE).exists() and not (crashed / "metrics.json").exists()
    # every reader of a train run refuses it, saying why and what to do
    capsys.readouterr()
    assert main(["evaluate", str(crashed)]) == 2
    err = capsys.readouterr().err
    assert f"{crashed} is not a complete train run" in err and "crashed or is still running" in err
    assert f"recsys train --resume {crashed}" in err
    from serve.run import open_run

    with pytest.raises(IncompleteRunError, match="not a complete train run"):
        open_run(crashed)
    # --resume continues from the epoch-2 checkpoint and ends where the uninterrupted run did
    assert main(["train", "--resume", str(crashed)]) == 0
    history, metrics = epoch_log(crashed), read_json(crashed / "metrics.json")
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[2]["resumed_from_epoch"] == 2 and "resumed_from_epoch" not in history[3]
    assert metrics["resumed_from_epochs"] == [2] and metrics["worker_restarts"] == 0
    assert read_json(whole / "metrics.json")["resumed_from_epochs"] == []
    # optimizer, scheduler, loop counters and the dropout RNG were restored: same weights, same scores
    for name, tensor in final_weights(whole).items():
        torch.testing.assert_close(final_weights(crashed)[name], tensor, msg=name)
    assert [h["valid_ndcg@10"] for h in history] == [h["valid_ndcg@10"] for h in epoch_log(whole)]
    assert require_complete(crashed, "train") and open_run(crashed).run_dir == crashed.resolve()
    assert main(["evaluate", str(crashed)]) == 0


def test_a_crash_during_checkpoint_save_keeps_the_previous_checkpoint(tiny_overrides, tmp_path, monkeypatch):
    from recsys.training import checkpoint

    args = in_process(tiny_overrides, "trainer.optim.epochs=2")
    assert main(["train", *args]) == 0
    run_dir = only_dir(tmp_path / "runs" / "train")
    ckpt = run_dir / "checkpoints"
    before = {p.relative_to(ckpt): p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}

    def save_then_fail(obj, path, *a, **kw):  # model.safetensors and model.json are written by now
        assert (Path(path).parent / checkpoint.WEIGHTS).is_file()
        raise Crash("injected crash while saving train_state.pt")

    monkeypatch.setattr(checkpoint.torch, "save", save_then_fail)
    with pytest.raises(Crash):
        main(["train", "--resume", str(run_dir), "trainer.optim.epochs=3"])
    after = {p.relative_to(ckpt): p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    assert after == before  # last/ and best/ byte for byte; no half directory anywhere
    assert sorted(p.name for p in ckpt.iterdir()) == ["best", "last"]
    assert load_train_state(ckpt / "last")["loop"]["epoch"] == 2
    # the resumed run is unmarked while it is incomplete
    with pytest.raises(IncompleteRunError, match="recsys train --resume"):
        require_complete(run_dir, "train")


def test_a_crash_between_the_two_renames_of_a_checkpoint_swap_is_recovered_on_resume(tiny_overrides, tmp_path,
                                                                                      monkeypatch):
    from recsys import runs

    assert main(["train", *in_process(tiny_overrides, "trainer.optim.epochs=2")]) == 0
    run_dir = only_dir(tmp_path / "runs" / "train")
    ckpt = run_dir / "checkpoints"
    before = (ckpt / "last" / "train_state.pt").read_bytes()
    real_replace = runs.os.replace

    def crash_on_the_second_rename(src, dst):
        if Path(dst).name == "last" and Path(src).name.startswith(".last."):  # temporary -> last
            raise Crash("injected crash between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(runs.os, "replace", crash_on_the_second_rename)
    with pytest.raises(Crash):
        main(["train", "--resume", str(run_dir), "trainer.optim.epochs=3"])
    monkeypatch.undo()
    assert not (ckpt / "last").exists() and (ckpt / ".last.old" / "train_state.pt").read_bytes() == before
    # resume puts the epoch-2 checkpoint back and finishes the run
    assert main(["train", "--resume", str(run_dir), "trainer.optim.epochs=3"]) == 0
    assert [h["epoch"] for h in epoch_log(run_dir)] == [1, 2, 3]
    assert load_train_state(ckpt / "last")["loop"]["epoch"] == 3 and not (ckpt / ".last.old").exists()


# --- completion markers across stages ------------------------------------------------------------

def test_finished_stages_are_marked_and_a_crashed_pipeline_is_not(tiny_overrides, tmp_path, monkeypatch):
    from pipelines import stages

    def crash(*a, **kw):
        raise Crash("injected crash in the evaluate stage")

    monkeypatch.setattr(stages, "run_evaluate", crash)
    with pytest.raises(Crash):
        main(["pipeline", *in_process(tiny_overrides, "trainer.optim.epochs=1")])
    pipeline = only_dir(tmp_path / "runs" / "pipeline")
    for stage in ("data", "train"):  # the stages that finished are marked
        assert read_json(pipeline / stage / COMPLETE_FILE)["stage"] == stage
    assert not (pipeline / COMPLETE_FILE).exists()
    message = f"{re.escape(str(pipeline))} is not a complete pipeline run.*run `recsys pipeline` again"
    with pytest.raises(IncompleteRunError, match=message):
        require_complete(pipeline, "pipeline")
    # a finished run of one stage is not accepted as another's
    with pytest.raises(IncompleteRunError, match="is a data run, not a train run"):
        require_complete(pipeline / "data", "train")
    # a data run that crashed before its marker is refused by train --data
    monkeypatch.undo()
    crashed_data = pipeline / "data"
    (crashed_data / COMPLETE_FILE).unlink()
    assert main(["train", *in_process(tiny_overrides), "--data", str(crashed_data)]) == 2
    assert not (tmp_path / "runs" / "train").exists()  # refused before a train run was made


def test_ctrl_c_during_ray_trains_fit_ends_as_keyboard_interrupt_and_its_handler_goes():
    """Ray Train V2's fit() installs its own SIGINT handler and, on Ctrl-C, ends in SystemExit from
    inside ray.get (measured 2026-12-07: `recsys train` on Ray exited 1 with no line). The stand-in
    below does the same without Ray; the real run's check is in the commit that added this test."""
    from pipelines.interrupts import ctrl_c_ends_ray_training

    def fit_like_ray_train(then):
        signal.signal(signal.SIGINT, lambda signum, frame: None)  # Ray Train's handler: abort the controller
        os.kill(os.getpid(), signal.SIGINT)
        then()

    def system_exit():
        raise SystemExit(1)

    before = signal.getsignal(signal.SIGINT)
    for then in (system_exit, lambda: None):  # fit() raising SystemExit, or returning from an aborted run
        with pytest.raises(KeyboardInterrupt):
            with ctrl_c_ends_ray_training():
                fit_like_ray_train(then)
        assert signal.getsignal(signal.SIGINT) is before  # Ray Train's handler does not outlive fit()
    with pytest.raises(SystemExit):  # a SystemExit without Ctrl-C is not turned into one
        with ctrl_c_ends_ray_training():
            system_exit()
    with ctrl_c_ends_ray_training():  # nothing happens: nothing raised
        pass
    assert signal.set_wakeup_fd(-1) == -1  # the wakeup fd it borrowed is given back


def test_ctrl_c_during_ray_training_keeps_a_sigint_handler_installed_outside_python(monkeypatch):
    """signal.getsignal answers None for a handler installed from C (an embedding application, an
    extension); no Python call can reinstate it, and trying to (signal.signal(SIGINT, None)) is a
    TypeError that would replace the KeyboardInterrupt the user should see."""
    from pipelines.interrupts import ctrl_c_ends_ray_training

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(signal, "getsignal", lambda signum: None)
    try:
        with pytest.raises(KeyboardInterrupt):
            with ctrl_c_ends_ray_training():
                signal.signal(signal.SIGINT, lambda signum, frame: None)
                os.kill(os.getpid(), signal.SIGINT)
                raise SystemExit(1)
    finally:
        signal.signal(signal.SIGINT, before)
    assert signal.set_wakeup_fd(-1) == -1


def test_ctrl_c_ends_a_command_with_one_line_and_status_130(monkeypatch, capsys):
    import pipelines.stages

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipelines.stages, "run_train", interrupted)
    assert main(["train", "model.name=sasrec"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("recsys train: interrupted; the run keeps its checkpoints: `recsys train --resume RUN_DIR`")
    assert "Traceback" not in err and err.count("\n") == 1
