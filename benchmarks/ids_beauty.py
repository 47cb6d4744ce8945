"""Semantic-ID quality on an embed run (Beauty): RQ-VAE 3x256 (Ray Train) and hierarchical
k-means 256 x 3 levels (Ray tasks), through the real ``ids`` stage. Writes
benchmarks/results/ids/<dataset>/rqvae-vs-hkmeans.json with each method's per-level utilisation and
perplexity, collision rate before the collision level, and reconstruction error.

    python benchmarks/ids_beauty.py runs/embed/<run-id> [key=value ...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.record import run_dataset, write_record  # noqa: E402
from pipelines.ids_stage import run_ids  # noqa: E402
from recsys.experiment import load_experiment  # noqa: E402


def main(argv: list[str]) -> None:
    embed_dir, overrides = Path(argv[0]), argv[1:]
    start, results, configs = time.perf_counter(), {}, {}
    for method in ("rqvae", "hkmeans"):
        exp = load_experiment(None, [f"ids.method={method}", *overrides])
        run_dir = run_ids(exp, embed_dir)
        quality = json.loads((run_dir / "id_quality.json").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
        results[method] = {**quality, "fit_s": metrics["fit_s"], "run": str(run_dir)}
        configs[method] = exp.to_dict()["ids"]
        print(method, (run_dir / "summary.md").read_text(), flush=True)
    write_record("rqvae-vs-hkmeans", model="ids", dataset=run_dataset(embed_dir), config={"embed_dir": str(embed_dir), **configs},
                 wall_s=time.perf_counter() - start, metrics=results)


if __name__ == "__main__":
    main(sys.argv[1:])
