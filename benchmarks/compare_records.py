"""Put the test figures of finished benchmark records side by side, against a published bar.

    python benchmarks/compare_records.py RECORD[=label] RECORD[=label] ... \
        [--bar "TIGER paper: recall@5=0.0454 ndcg@5=0.0321 recall@10=0.0648 ndcg@10=0.0384"] \
        [--metrics recall@5,ndcg@5,recall@10,ndcg@10] [--plot docs/figures/NAME.png]

RECORD is ``MODEL/DATASET/NAME`` under ``benchmarks/results/``, a ``NAME`` only one such folder holds,
or a path to a record; its label names its protocol (history kept or excluded). Nothing
is evaluated: the figures are those the records hold (test computed once, when each was written).
Prints a Markdown table (with each figure's ratio to the bar) and, with ``--plot``, a grouped bar
chart with the bar drawn across each metric.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import record as records  # noqa: E402
from benchmarks.record import QUALITY_KEYS, save_figure  # noqa: E402


def read_record(spec: str) -> tuple[str, dict]:
    """``RECORD[=label]`` -> (label, the record's test figures); the default label is the record's
    name and its protocol, e.g. ``default (history kept)``."""
    name, _, label = spec.partition("=")
    path = records.find_record(name)
    record = json.loads(path.read_text())
    test = record.get("metrics", {}).get("test")
    if not test:
        raise ValueError(f"{path} holds no test figures (metrics.test)")
    history = record.get("protocol", {}).get("history")
    return label or f"{record.get('name', path.stem)}" + (f" (history {history})" if history else ""), test


def parse_bar(text: str, metrics: list[str]) -> tuple[str, dict[str, float]]:
    """``"label: recall@5=0.0454 ndcg@5=0.0321"`` -> (label, {metric: value})."""
    label, sep, rest = text.partition(":")
    if not sep:
        raise ValueError(f"--bar {text!r}: expected 'label: metric=value ...'")
    values = {}
    for item in rest.split():
        key, eq, value = item.partition("=")
        if not eq or key not in QUALITY_KEYS:
            raise ValueError(f"--bar item {item!r}: expected metric=value with a metric of {QUALITY_KEYS}")
        values[key] = float(value)
    missing = [m for m in metrics if m not in values]
    if missing:
        raise ValueError(f"--bar gives no value for {missing}")
    return label.strip(), values


def table(rows: dict[str, dict], metrics: list[str], bar: tuple[str, dict] | None) -> str:
    lines = ["| run | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for label, test in rows.items():
        cells = [f"{test[m]:.4f}" + (f" ({test[m] / bar[1][m]:.2f}×)" if bar else "") for m in metrics]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if bar:
        lines.append(f"| {bar[0]} (bar) | " + " | ".join(f"{bar[1][m]:.4f}" for m in metrics) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, dict], metrics: list[str], bar: tuple[str, dict] | None, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(metrics) + 0.4 * len(rows)), 4))
    for i, (label, test) in enumerate(rows.items()):
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(metrics))]
        ax.bar(xs, [test[m] for m in metrics], width, label=label)
    if bar:
        for j, m in enumerate(metrics):
            ax.hlines(bar[1][m], j - 0.45, j + 0.45, colors="black", linestyles="--",
                      label=f"{bar[0]}" if j == 0 else None)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set(ylabel="test", title="test figures (each computed once)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def main(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="benchmarks/compare_records.py", description=__doc__.strip().splitlines()[0])
    parser.add_argument("records", nargs="+", help="MODEL/DATASET/NAME[=label] under benchmarks/results, a unique NAME, or a path")
    parser.add_argument("--bar", help="'label: metric=value ...', e.g. a paper's figures")
    parser.add_argument("--metrics", default="recall@5,ndcg@5,recall@10,ndcg@10")
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args(argv)
    metrics = args.metrics.split(",")
    unknown = [m for m in metrics if m not in QUALITY_KEYS]
    if unknown:
        parser.error(f"--metrics {unknown} not among {QUALITY_KEYS}")
    try:
        rows = dict(read_record(spec) for spec in args.records)
        bar = parse_bar(args.bar, metrics) if args.bar else None
    except ValueError as err:
        parser.error(str(err))
    if len(rows) < len(args.records):
        parser.error("two records have the same label; give each its own with NAME=label")
    text = table(rows, metrics, bar)
    print(text)
    if args.plot:
        print(f"plot: {plot(rows, metrics, bar, args.plot)}")
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
