"""What a sweep leaves for a person, without Ray: trials ranked on validation, the results table
(CSV and markdown), one plot of the metric against each swept parameter (and, for a sweep over
two grids, one map of the metric over the grid), and the winner's config as a YAML file that
``recsys pipeline`` loads directly."""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recsys.experiment import ExperimentConfig
from recsys.runs import write_text
from recsys.sweep import SweepConfig

COMPLETED, ASHA, PATIENCE, ERROR, NO_RESULT = "completed", "stopped by ASHA", "stopped (patience)", "error", "no result"


@dataclass
class TrialRecord:
    """One trial's outcome. ``valid`` holds the validation figures of its selected (best) epoch."""

    trial_id: str
    params: dict[str, Any]
    valid: dict[str, float] = field(default_factory=dict)
    best_epoch: int = 0
    epochs_run: int = 0
    status: str = NO_RESULT
    wall_s: float = 0.0
    trial_dir: str = ""
    error: str = ""

    def score(self, metric: str) -> float:
        return self.valid.get(metric, math.nan)


def trial_status(epochs_run: int, max_epochs: int, best_epoch: int, patience: int, error: str = "") -> str:
    """Why a trial ended: it errored, ran all epochs, hit its own patience, or ASHA stopped it."""
    if error:
        return ERROR
    if epochs_run == 0:
        return NO_RESULT
    if epochs_run >= max_epochs:
        return COMPLETED
    if patience and epochs_run - best_epoch >= patience:
        return PATIENCE
    return ASHA


def rank_trials(records: list[TrialRecord], metric: str) -> list[TrialRecord]:
    """Best validation ``metric`` first; trials without a score last; ties by trial id."""
    def key(r: TrialRecord) -> tuple:
        score = r.score(metric)
        return (math.isnan(score), -score if not math.isnan(score) else 0.0, r.trial_id)

    return sorted(records, key=key)


def base_point(ranked: list[TrialRecord], config: SweepConfig, base_values: dict[str, Any]) -> TrialRecord | None:
    """The trial that ran the base config's own value of every swept key (the "default" point the
    sweep is meant to beat), or None when the grid does not contain it."""
    keys = [s.key for s in config.specs]
    return next((r for r in ranked if all(r.params.get(k) == base_values.get(k) for k in keys)), None)


def gain_over_base(winner: TrialRecord, base: TrialRecord | None, config: SweepConfig,
                   base_values: dict[str, Any]) -> tuple[dict | None, str]:
    """The winner's validation gain over the base point, as a record and a sentence."""
    metric = config.metric
    shown = ", ".join(f"{k}={v!r}" for k, v in base_values.items())
    if base is None or math.isnan(base.score(metric)):
        return None, f"the base config's point ({shown}) is not among the scored trials: no gain over it is measured"
    gain = winner.score(metric) - base.score(metric)
    relative = gain / base.score(metric) if base.score(metric) else math.nan
    record = {"trial_id": base.trial_id, "params": base.params, "valid": base.valid, "status": base.status,
              "epochs_run": base.epochs_run, f"gain_valid_{metric}": gain, "gain_relative": relative}
    budget = "" if base.epochs_run == winner.epochs_run else (
        f" (the base point ran {base.epochs_run} epochs, the winner {winner.epochs_run})")
    if base is winner:
        return record, f"the base config's point ({shown}) won: the sweep found nothing better"
    return record, (f"gain over the base config's point ({shown}, trial {base.trial_id}): validation {metric} "
                    f"{winner.score(metric):.4f} against {base.score(metric):.4f}, {gain:+.4f} ({relative:+.1%}){budget}")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table_rows(ranked: list[TrialRecord], config: SweepConfig, test: dict[str, float] | None) -> list[dict]:
    """One dict per trial in rank order; ``test_<metric>`` is filled for the winner only."""
    metric, keys = config.metric, [s.key for s in config.specs]
    rows = []
    for rank, r in enumerate(ranked, 1):
        row = {"rank": rank, "trial_id": r.trial_id, **{k: r.params.get(k) for k in keys},
               f"valid_{metric}": r.score(metric), "best_epoch": r.best_epoch, "epochs_run": r.epochs_run,
               "status": r.status, "wall_s": round(r.wall_s, 1)}
        row.update({f"valid_{m}": v for m, v in r.valid.items() if m != metric})
        row[f"test_{metric}"] = test[metric] if (test is not None and rank == 1) else None
        row["trial_dir"] = r.trial_dir
        rows.append(row)
    return rows


def write_results(ranked: list[TrialRecord], config: SweepConfig, out_dir: str | Path,
                  test: dict[str, float] | None = None) -> tuple[Path, Path, str]:
    """``results.csv`` (every column) and ``results.md`` (the readable ones); returns both paths
    and the markdown table."""
    out_dir = Path(out_dir)
    rows = table_rows(ranked, config, test)
    columns = list(dict.fromkeys(c for row in rows for c in row))
    csv_path = out_dir / "results.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None or _isnan(row.get(c)) else row.get(c) for c in columns})
    metric = config.metric
    shown = ["rank", "trial_id", *[s.key for s in config.specs], f"valid_{metric}", "best_epoch", "epochs_run",
             "status", "wall_s", f"test_{metric}"]
    lines = ["| " + " | ".join(shown) + " |", "|---" * len(shown) + "|"]
    for row in rows:
        lines.append("| " + " | ".join("" if row.get(c) is None or _isnan(row.get(c)) else _cell(row[c])
                                       for c in shown) + " |")
    table = "\n".join(lines)
    md_path = out_dir / "results.md"
    write_text(md_path, f"# sweep results, ranked on validation {metric}\n\n{table}\n\n"
               f"Test {metric} is computed for the winner (rank 1) only.\n")
    return csv_path, md_path, table


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


def plot_metric_vs_params(ranked: list[TrialRecord], config: SweepConfig, out_dir: str | Path) -> list[Path]:
    """``metric_vs_<param>.png`` per swept parameter: each trial's validation score at its value;
    trials ASHA stopped are hollow, the winner is starred. Log x for loguniform domains."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, paths = config.metric, []
    scored = [r for r in ranked if not math.isnan(r.score(metric))]
    for spec in config.specs:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        values = [r.params.get(spec.key) for r in scored]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            xs = [float(v) for v in values]
        else:  # categorical: one position per distinct value, in the order they were given
            labels = list(dict.fromkeys(repr(v) for v in (spec.values if spec.kind in ("grid", "choice") else values)))
            xs = [labels.index(repr(v)) for v in values]
            ax.set_xticks(range(len(labels)), labels)
        for stopped, style in ((False, dict(color="tab:blue")), (True, dict(facecolors="none", edgecolors="tab:red"))):
            pts = [(x, r.score(metric)) for x, r in zip(xs, scored) if (r.status == ASHA) == stopped]
            if pts:
                ax.scatter(*zip(*pts), s=36, label="stopped by ASHA" if stopped else "ran to its end", **style)
        if scored:
            ax.scatter([xs[0]], [scored[0].score(metric)], marker="*", s=220, color="gold", edgecolors="black",
                       zorder=3, label="winner")
        if numeric and spec.kind == "loguniform" or (numeric and min(xs) > 0 and max(xs) / min(xs) >= 100):
            ax.set_xscale("log")
        ax.set(xlabel=spec.key, ylabel=f"validation {metric}", title=f"{metric} vs {spec.key}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(out_dir) / f"metric_vs_{safe_name(spec.key)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_metric_grid(ranked: list[TrialRecord], config: SweepConfig, out_dir: str | Path) -> Path | None:
    """For a sweep over exactly two grids (e.g. EAGER's lambda_1 x lambda_2): ``metric_grid.png``, one
    cell per pair of values with its best trial's validation score, the epochs it ran where ASHA
    stopped it, the winner outlined; an empty cell had no scored trial. None for any other sweep."""
    grids = [s for s in config.specs if s.kind == "grid"]
    if len(grids) != 2 or len(config.specs) != 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metric, (rows, cols) = config.metric, grids
    cell: dict[tuple[int, int], TrialRecord] = {}
    for record in ranked:  # best first: a cell keeps its first scored trial
        if math.isnan(record.score(metric)):
            continue
        at = (rows.values.index(record.params[rows.key]), cols.values.index(record.params[cols.key]))
        cell.setdefault(at, record)
    scores = np.full((len(rows.values), len(cols.values)), np.nan)
    for (i, j), record in cell.items():
        scores[i, j] = record.score(metric)
    fig, ax = plt.subplots(figsize=(1.4 * len(cols.values) + 2.2, 1.1 * len(rows.values) + 1.6))
    image = ax.imshow(np.ma.masked_invalid(scores), cmap="viridis", origin="lower", aspect="auto")
    fig.colorbar(image, ax=ax, label=f"validation {metric}")
    for (i, j), record in cell.items():
        text = f"{record.score(metric):.4f}" + (f"\nASHA@{record.epochs_run}" if record.status == ASHA else "")
        bright = image.norm(scores[i, j]) > 0.6  # viridis is light at its top
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black" if bright else "white")
    if cell:
        i, j = next(iter(cell))  # the first cell filled holds the best trial: the winner
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=3))
    ax.set_xticks(range(len(cols.values)), [str(v) for v in cols.values])
    ax.set_yticks(range(len(rows.values)), [str(v) for v in rows.values])
    ax.set(xlabel=cols.key, ylabel=rows.key, title=f"validation {metric} (winner outlined)")
    fig.tight_layout()
    path = Path(out_dir) / "metric_grid.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_winner_config(path: str | Path, exp: ExperimentConfig, header: list[str]) -> Path:
    """The winning experiment as YAML with a comment header; ``load_experiment(path)`` rebuilds it."""
    plain = json.loads(json.dumps(exp.to_dict()))  # tuples -> lists, which safe_dump can write
    body = yaml.safe_dump(plain, sort_keys=False, default_flow_style=False)
    write_text(path, "".join(f"# {line}\n" for line in header) + body)
    return Path(path)
