"""The sweep's driver-side Tune callbacks: one compact console line per trial result, instead of Tune's
tables (``verbose=0``), and a Ctrl-C that always stops the sweep."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from ray.tune import Callback

CTRL_C = threading.Event()  # set by the sweep's SIGINT handler; CtrlC raises at Tune's next step


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else repr(value)


class ProgressLines(Callback):
    def __init__(self, metric: str, epochs: int, n_trials: int, keys: list[str]):
        self.metric, self.epochs, self.n_trials, self.keys = metric, epochs, n_trials, keys
        self.ended: set[str] = set()

    def _params(self, trial) -> str:
        return " ".join(f"{k.rsplit('.', 1)[-1]}={_short(trial.config.get(k))}" for k in self.keys)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        print(f"  trial {trial.trial_id}  epoch {result.get('epoch')}/{self.epochs}  valid {self.metric} "
              f"{result.get(f'valid_{self.metric}', float('nan')):.4f} (best {result.get('best_score', 0.0):.4f} "
              f"@ {result.get('best_epoch')})  {self._params(trial)}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended.add(trial.trial_id)
        last = trial.last_result or {}
        print(f"[{len(self.ended)}/{self.n_trials}] trial {trial.trial_id} ended after epoch "
              f"{last.get('epoch')}/{self.epochs}: "
              f"best valid {self.metric} {last.get('best_score', float('nan')):.4f}  {self._params(trial)}",
              flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended.add(trial.trial_id)
        print(f"[{len(self.ended)}/{self.n_trials}] trial {trial.trial_id} failed: {trial.error_file}", flush=True)


@contextmanager
def ctrl_c_stops_the_sweep():
    """While a sweep runs, the first Ctrl-C only sets ``CTRL_C``; ``CtrlC`` raises KeyboardInterrupt at the
    start or end of Tune's next step (steps are at most ~0.1 s apart), and leaving this block raises it if
    no step did. A second Ctrl-C raises at once, for a sweep that no longer steps.

    Why not raise from the handler, as Python's own does: the exception then lands at whatever bytecode
    the main thread is on. Ray's ``wait``, where Tune's loop spends its time, runs signal handlers itself
    and can lose it (2026-12-07: trials reported epochs 2-7 after the signal); and raised between a
    lock's acquire and the ``with`` block that releases it (Tune's tensorboardX logger putting to its
    queue), it leaks the lock, and the tensorboardX clean-up at exit then waits for it forever
    (2026-12-07, the fault handler's stacks: the resume line printed, the process never ended).
    Outside the main thread (no signal handler can be set there) this changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupted(signum, frame):
        if CTRL_C.is_set():
            raise KeyboardInterrupt
        CTRL_C.set()

    CTRL_C.clear()
    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        yield
        if CTRL_C.is_set():  # Ctrl-C after Tune's last step
            raise KeyboardInterrupt
    finally:
        signal.signal(signal.SIGINT, previous)
        CTRL_C.clear()


class CtrlC(Callback):
    """Raises KeyboardInterrupt at the start and end of every step of Tune's loop (in the driver's
    main thread, where no lock is held) once the sweep's SIGINT handler has seen Ctrl-C
    (``ctrl_c_stops_the_sweep``)."""

    def on_step_begin(self, iteration, trials, **info):
        if CTRL_C.is_set():
            raise KeyboardInterrupt

    def on_step_end(self, iteration, trials, **info):
        self.on_step_begin(iteration, trials)
