"""The ranker's cost on lifelong histories (issue 22's scale curves), on synthetic histories of
10^2 .. 10^5 events per user:

- per request, one user and 100 candidates: full target attention (GSU keeps every behaviour),
  TWIN (GSU keeps the top-k behaviours) and TWIN-V2 (GSU keeps the top-k of the user's stored
  clusters), stage by stage: GSU (keys and the relevance of every entry), ESU (attention over
  what GSU kept) and the rest (short-term attention, MLP); and the request's peak memory above
  the process's resident set before it;
- offline, TWIN-V2's clustering behind those requests: its compression ratio (events per cluster),
  and its throughput in users/s, in this process and on Ray Data (``pipelines.history_job``, which
  clusters each user at every cutoff an example reads: serve, test, valid, train).

    python -m benchmarks.twin_scale --lengths 100 1000 10000 100000

The model settings are the shipped ranker config's (``--config``); weights are random, which
does not change the cost. Vectors: a mixture of topics (unit-norm), so clusters mean something;
history items are drawn from the catalogue at random. Writes
benchmarks/results/twin_v2/synthetic/<name>.json and, with ``--plot``, the curves.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks.history_update import catalogue_vectors
from benchmarks.record import machine_note, write_record
from pipelines.history_job import cluster_all
from recsys.experiment import load_experiment
from recsys.history.build import HistoryConfig
from recsys.models import Batch, build_model, model_config_from_dict

CANDIDATES = 100
SHORT = 20  # the retrievers' history cap, the short-term attention's window
# variant -> (model.name, model.history): GSU keeps every behaviour for "full" (top_k >= length)
VARIANTS = {"full": ("twin", "behaviours"), "twin": ("twin", "behaviours"), "twin_v2": ("twin_v2", "clusters")}


def memory_kib(field: str) -> int:
    """A ``/proc/self/status`` field (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def allocator_returns_memory() -> None:
    """Make glibc serve every allocation of 64 KiB or more by its own mmap, returned to the OS when
    freed (its default threshold grows after a free, and freed tensors then stay resident): the
    resident set before a request then holds none of an earlier request's tensors, so its peak
    above that set is the request's own memory."""
    if glibc().mallopt(-3, 1 << 16) != 1:  # M_MMAP_THRESHOLD
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed: peak memory per request cannot be measured")
    release_free_memory()


def release_free_memory() -> None:
    """Return the heap's free pages to the OS (glibc's malloc_trim). A free chunk that an earlier
    allocation left in the heap stays resident, and a request served from it would add nothing to
    the resident set: in a long-lived process (a test suite's) every peak then read 0.0 MiB."""
    glibc().malloc_trim(0)


def glibc():
    import ctypes

    return ctypes.CDLL("libc.so.6")


def reset_peak() -> None:
    """Reset VmHWM to the current resident set (Linux: 5 > /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def rankers(config: dict, n_items: int, vectors: np.ndarray, max_length: int) -> dict:
    item_vectors = torch.from_numpy(np.concatenate([np.zeros((1, vectors.shape[1]), np.float32), vectors]))
    out = {}
    for variant, (name, history) in VARIANTS.items():
        section = {**config, "name": name, "history": history}
        if variant == "full":
            section["top_k"] = max_length
        torch.manual_seed(0)
        model_name, cfg = model_config_from_dict(section)
        out[variant] = build_model(model_name, cfg, n_items=n_items, max_len=SHORT, item_vectors=item_vectors).eval()
    return out


def request(model, items: np.ndarray, rng: np.random.Generator, n_items: int) -> tuple[Batch, float]:
    """One user's request: the last SHORT items, the long entries (raw behaviours, or clusters as
    the store keeps them, made here: the seconds this took are returned) and 100 candidates."""
    start = time.perf_counter()
    rows = model.long_rows([items])
    offline_s = time.perf_counter() - start
    long = model.collate_long(rows)
    batch = Batch(history=torch.from_numpy(items[-SHORT:])[None],
                  candidates=torch.from_numpy(rng.choice(n_items, CANDIDATES, replace=False) + 1)[None],
                  candidate_ranks=torch.arange(CANDIDATES)[None],
                  candidate_scores=torch.from_numpy(np.sort(rng.normal(size=CANDIDATES))[::-1].copy())[None].float(),
                  **long)
    return batch, offline_s


@torch.no_grad()
def time_request(model, batch: Batch, min_s: float, max_reps: int) -> dict:
    """Median milliseconds of the whole request and of its GSU and ESU, and the peak memory (MiB)
    of one request above the resident set before it."""
    model.score(batch)  # warm-up
    total, gsu, esu = [], [], []
    spent = 0.0
    while len(total) < 3 or (spent < min_s and len(total) < max_reps):
        t0 = time.perf_counter()
        model.score(batch)
        t1 = time.perf_counter()
        query = model.embed(batch.candidates)
        t2 = time.perf_counter()
        keys, alpha, top = model.gsu(batch, query)
        t3 = time.perf_counter()
        model.esu(batch, keys, alpha, top)
        t4 = time.perf_counter()
        total.append(t1 - t0)
        gsu.append(t3 - t2)
        esu.append(t4 - t3)
        spent += t4 - t0
    del keys, alpha, top, query
    # no garbage collection inside the measured request: a collection there frees earlier objects'
    # memory (in a long-lived process, a test suite's) and the peak above the set before hides under it;
    # and the warm-up's and timing loop's freed tensors go back to the OS first (release_free_memory)
    gc.collect()
    release_free_memory()
    gc.disable()
    try:
        reset_peak()
        before = memory_kib("VmRSS")
        model.score(batch)
        peak = memory_kib("VmHWM") - before
    finally:
        gc.enable()
    ms = {k: 1e3 * float(np.median(v)) for k, v in (("total", total), ("gsu", gsu), ("esu", esu))}
    return {"total_ms": round(ms["total"], 3), "gsu_ms": round(ms["gsu"], 3), "esu_ms": round(ms["esu"], 3),
            "rest_ms": round(max(ms["total"] - ms["gsu"] - ms["esu"], 0.0), 3), "repeats": len(total),
            "peak_mib": round(max(peak, 0) / 1024, 1)}


def offline(lengths: list[int], vectors: np.ndarray, gamma: int, events: int, rng: np.random.Generator) -> dict:
    """Users of each length (about ``events`` events in all, at least 2 users) clustered by
    ``pipelines.history_job.cluster_all``, in this process and on Ray Data (started before the
    clock runs, and warmed by one tiny dataset: its start-up and first-dataset cost, paid once per
    job, are reported on their own)."""
    from pipelines.ray_env import init_ray

    start = time.perf_counter()
    init_ray()
    ray_start_s = time.perf_counter() - start
    start = time.perf_counter()
    tiny = pd.DataFrame({"user_id": ["w0", "w1"], "item_ids": [np.arange(1, 11), np.arange(1, 11)]})
    cluster_all(tiny, vectors, HistoryConfig(gamma=gamma, use_ray=True))
    first_dataset_s = time.perf_counter() - start
    rows = []
    for length in lengths:
        n_users = max(2, events // length)
        users = pd.DataFrame({"user_id": [f"u{i}" for i in range(n_users)],
                              "item_ids": [rng.integers(1, len(vectors) + 1, size=length) for _ in range(n_users)]})
        row = {"length": length, "users": n_users}
        for path, use_ray in (("in_process", False), ("ray_data", True)):
            start = time.perf_counter()
            out = cluster_all(users, vectors, HistoryConfig(gamma=gamma, use_ray=use_ray))
            row[f"{path}_users_per_s"] = round(n_users / (time.perf_counter() - start), 2)
        assert len(out) == 4 * n_users  # one cluster set per cutoff label
        print(f"offline L={length:>6}: {n_users} users, in-process {row['in_process_users_per_s']} users/s, "
              f"Ray Data {row['ray_data_users_per_s']} users/s", flush=True)
        rows.append(row)
    return {"ray_start_s": round(ray_start_s, 2), "first_dataset_s": round(first_dataset_s, 2), "per_length": rows}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        x = [r["length"] for r in mine]
        axes[0].plot(x, [r["gsu_ms"] for r in mine], "o-", label=f"{variant} GSU")
        axes[0].plot(x, [r["esu_ms"] for r in mine], "s--", label=f"{variant} ESU")
        axes[1].plot(x, [r["total_ms"] for r in mine], "o-", label=variant)
        axes[2].plot(x, [max(r["peak_mib"], 0.1) for r in mine], "o-", label=variant)
    for ax, title in zip(axes, ("stage ms per request", "request ms (100 candidates)", "peak MiB per request")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("events in the user's history")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 1000, 10000, 100000])
    parser.add_argument("--config", default="configs/lastfm-twin_v2.yaml", help="the ranker config whose model "
                        "section sets the width, heads, gamma and top-k")
    parser.add_argument("--dim", type=int, default=64, help="item vector size (LastFM's SASRec item table: 64)")
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--min-s", type=float, default=1.0, help="time each request for at least this long")
    parser.add_argument("--max-reps", type=int, default=50)
    parser.add_argument("--offline-lengths", type=int, nargs="*", default=[100, 1000, 10000],
                        help="history lengths of the offline throughput run (none: skip it); 10^5 events "
                        "take minutes per cutoff, and the per-request rows give one clustering's time")
    parser.add_argument("--offline-events", type=int, default=20000, help="events per length in that run")
    parser.add_argument("--name", default="scale")
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    allocator_returns_memory()
    # the config as the project resolves it (base_config chains, defaults filled in)
    config = dataclasses.asdict(load_experiment(args.config).model)
    rng = np.random.default_rng(0)
    vectors = catalogue_vectors(args.items, args.dim, 32, rng)
    models = rankers(config, args.items, vectors, max(args.lengths))
    start = time.perf_counter()
    rows = []
    for length in args.lengths:
        items = rng.integers(1, args.items + 1, size=length)
        for variant, model in models.items():
            batch, cluster_s = request(model, items, rng, args.items)
            entries = int((batch.long_sizes > 0).sum())
            row = {"variant": variant, "length": length, "entries": entries,
                   "gsu_keeps": min(model.config.top_k, entries), **time_request(model, batch, args.min_s,
                                                                                 args.max_reps)}
            if variant == "twin_v2":
                row["compression"] = round(length / entries, 2)
                row["offline_cluster_s"] = round(cluster_s, 4)
            rows.append(row)
            print(f"L={length:>6} {variant:>8}: {entries:>6} entries, GSU {row['gsu_ms']:.3f} ms, ESU "
                  f"{row['esu_ms']:.3f} ms, request {row['total_ms']:.3f} ms, peak {row['peak_mib']} MiB", flush=True)
    offline_rows = offline(args.offline_lengths, vectors, config["gamma"], args.offline_events, rng) \
        if args.offline_lengths else {}
    if args.plot:
        plot(rows, args.plot)
    model_cfg = dataclasses.asdict(models["twin_v2"].config)
    path = write_record(args.name, model="twin_v2", dataset="synthetic", wall_s=round(time.perf_counter() - start, 1),
                        config={**vars(args), "plot": str(args.plot) if args.plot else None, "model": model_cfg,
                                "candidates": CANDIDATES, "short_len": SHORT},
                        metrics={"per_request": rows, "offline": offline_rows},
                        extra={"machine_note": machine_note(args.threads),
                               "note": "random weights (cost only); one request at a time, batch of 1 user"})
    print(f"record: {path}")


if __name__ == "__main__":
    main()
