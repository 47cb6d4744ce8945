"""One compact console line per trial result, instead of Tune's tables (``verbose=0``)."""

from __future__ import annotations

from ray.tune import Callback


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
