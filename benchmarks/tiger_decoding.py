"""Decoding latency of a trained TIGER run: constrained beam search at several beam sizes.

    python benchmarks/tiger_decoding.py TRAIN_RUN [--beams 20,50] [--users 1000] [--batch 256]

For each beam size, on a fixed sample of test users, top-20 with the checkpoint selected on
validation:
- one user per call (batch 1): latency p50/p95/p99 in ms, the figure an online request sees;
- ``--batch`` users per call: ms per user, the throughput figure for offline scoring;
- Recall/NDCG@K on the sample, to show what the wider beam buys;
- the invalid-ID rate: returned items that are not in the catalogue (0 under the trie).
Writes benchmarks/results/tiger/<dataset>/decoding.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.record import dataset_name, protocol, write_record  # noqa: E402
from recsys.data.schema import InteractionData  # noqa: E402
from recsys.data.split import leave_one_out  # noqa: E402
from recsys.experiment import experiment_dict_from_run, experiment_from_dict  # noqa: E402
from recsys.metrics import DEFAULT_KS, RankingMetrics  # noqa: E402
from recsys.models import Batch  # noqa: E402
from recsys.runs import CONFIG_FILE, read_json  # noqa: E402
from recsys.training.batching import trim_padding  # noqa: E402
from recsys.training.checkpoint import load_model  # noqa: E402


def percentiles(ms: list[float]) -> dict[str, float]:
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50_ms": round(float(p50), 2), "p95_ms": round(float(p95), 2), "p99_ms": round(float(p99), 2),
            "mean_ms": round(float(np.mean(ms)), 2)}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("train_run", type=Path)
    parser.add_argument("--beams", default="20,50", help="comma-separated beam sizes (default 20,50)")
    parser.add_argument("--users", type=int, default=1000, help="test users sampled (default 1000)")
    parser.add_argument("--batch", type=int, default=256, help="users per call for the batched figure")
    parser.add_argument("--seed", type=int, default=0)
    ns = parser.parse_args(argv)
    beams = [int(b) for b in ns.beams.split(",")]
    saved = read_json(ns.train_run / CONFIG_FILE)
    exp = experiment_from_dict(experiment_dict_from_run(saved))
    split = leave_one_out(InteractionData.load(saved["data_dir"]), exp.data.max_history)
    model = load_model(ns.train_run / "checkpoints" / "best").eval()
    if model.beam_width(1) is None:
        raise ValueError(f"{ns.train_run} holds a {type(model).__name__}, which does not decode by beam search")
    rows = np.random.default_rng(ns.seed).choice(len(split.test), min(ns.users, len(split.test)), replace=False)
    histories = torch.from_numpy(split.test.histories[rows])
    targets = torch.from_numpy(split.test.targets[rows])
    users = torch.from_numpy(split.test.user_index[rows])
    k = max(DEFAULT_KS)
    results, start = {}, time.perf_counter()
    for beam in beams:
        model.config.beam_size = beam
        model.recommend(Batch(history=histories[:1], users=users[:1]), k)  # warm-up
        single, metrics, invalid = [], RankingMetrics(DEFAULT_KS), 0
        for i in range(len(rows)):
            history = trim_padding(histories[i:i + 1])[0]
            t0 = time.perf_counter()
            with torch.no_grad():
                top = model.recommend(Batch(history=history, users=users[i:i + 1]), k).items
            single.append((time.perf_counter() - t0) * 1000)
            metrics.update(top, targets[i:i + 1])
            invalid += int(((top < 1) | (top > model.n_items)).sum())
        t0 = time.perf_counter()
        for s in range(0, len(rows), ns.batch):
            model.recommend(Batch(history=trim_padding(histories[s:s + ns.batch])[0], users=users[s:s + ns.batch]), k)
        batched_ms = (time.perf_counter() - t0) * 1000 / len(rows)
        results[f"beam_{beam}"] = {"batch_1": percentiles(single), f"batch_{ns.batch}_ms_per_user": round(batched_ms, 3),
                                   "quality": metrics.summary(), "invalid_id_rate": invalid / (len(rows) * k)}
        print(f"beam {beam}: {results[f'beam_{beam}']}", flush=True)
    # recommend() is called without exclude_history: the quality figures keep the history
    write_record("decoding", model="tiger", dataset=dataset_name(exp.to_dict()["data"]),
                 protocol=protocol(exclude_history=False), config=exp.to_dict(), wall_s=time.perf_counter() - start,
                 metrics=results, extra={"train_run": str(ns.train_run), "users": len(rows), "k": k,
                                         "torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    main(sys.argv[1:])
