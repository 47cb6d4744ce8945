"""Item-embedding throughput on Amazon Beauty, side by side in one process: the fastest plain
``SentenceTransformer.encode`` of the titles against the embed stage on Ray Data (forced by
``embed.encoder.use_ray=true``) and in-process (what ``auto`` takes on one node). Writes
benchmarks/results/embed/beauty/<--name>.json (default throughput.json).

    python benchmarks/embed_beauty.py --path /path/to/amazon-beauty [--limit 1000] [--name throughput-icelake]

- plain: encode only (model loaded and warmed up first), tried at each ``--batch-sizes`` in the
  precision ``auto`` resolves to here (bf16 on a CPU with native bf16); the fastest counts.
- ray: ``run_embed`` with use_ray=true on a machine where Ray is not running yet, so ray.init, the
  actor pool's start-up and each actor's model load are all inside its time; ``--ray-warm`` runs it
  again with Ray up (a new actor pool and model loads, no ray.init).
- in_process: ``run_embed`` with use_ray=false, model load included, timed before Ray starts (as a
  user's one-node run with ``auto`` never starts it).
- ``--fp32`` also encodes in fp32 and builds hierarchical k-means IDs (Beauty's config: 256 x 3)
  from both vector sets: how many items get the same ID.
``--limit N`` embeds only the first N items, prints the figures and writes no record.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.record import protocol, write_record  # noqa: E402
from recsys.data import DataConfig, InteractionData, load_dataset  # noqa: E402
from recsys.runs import read_json  # noqa: E402
from recsys.text import EncoderConfig, ItemTextConfig, build_texts, load_embeddings  # noqa: E402
from recsys.text.encoder import encode, load_encoder, locate_model, resolve_device, resolve_precision  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", required=True, help="the amazon-beauty directory")
    parser.add_argument("--limit", type=int, default=0, help="only the first N items; no record is written")
    parser.add_argument("--batch-sizes", default="64,128,256", help="plain encode batch sizes to try")
    parser.add_argument("--ray-batch-size", type=int, default=128)
    parser.add_argument("--num-actors", type=int, default=0, help="Ray pool size; 0 = the stage's default")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--ray-warm", action="store_true", help="also time the Ray stage again with Ray running")
    parser.add_argument("--fp32", action="store_true", help="also fp32: throughput and ID agreement with bf16")
    parser.add_argument("--keep-run", type=Path, help="keep the in-process embed run under this run root "
                        "(e.g. for benchmarks/hkmeans_scaling.py --embed); its data run is kept beside it")
    parser.add_argument("--note", default="", help="stored in the record, e.g. what else ran on the machine")
    parser.add_argument("--name", default="throughput",
                        help="the record's name: another machine's figures go beside, not over, this one's")
    return parser.parse_args(argv)


def load_items(path: str, limit: int) -> InteractionData:
    data = load_dataset(DataConfig(format="beauty", path=path))
    if limit:  # keep a valid data run: items 1..limit and sequences restricted to them
        data.items = data.items[data.items["item_id"] <= limit].reset_index(drop=True)
        seqs = data.sequences.copy()
        seqs["item_ids"] = seqs["item_ids"].map(lambda s: s[s <= limit])
        data.sequences = seqs[seqs["item_ids"].map(len) > 0].reset_index(drop=True)
    return data


def time_plain(texts: list[str], cfg: EncoderConfig) -> tuple[dict, np.ndarray]:
    """Encode only: the model is loaded and warmed up before the clock starts."""
    start = time.perf_counter()
    model = load_encoder(cfg)
    load_s = time.perf_counter() - start
    encode(model, texts[:64], cfg)  # warm-up: first-call allocations are not throughput
    start = time.perf_counter()
    vectors = encode(model, texts, cfg)
    encode_s = time.perf_counter() - start
    return {"items_per_s": round(len(texts) / encode_s, 1), "encode_s": round(encode_s, 2),
            "load_s": round(load_s, 2), "batch_size": cfg.batch_size, "precision": cfg.precision}, vectors


def time_stage(data_dir: Path, text_cfg: ItemTextConfig, cfg: EncoderConfig,
               keep: Path | None = None) -> tuple[dict, np.ndarray]:
    """The embed stage from its call to its run directory (a fresh run root: nothing reused);
    ``keep``: write the run there (``keep/embed/<run-id>``) instead of a temporary folder."""
    from pipelines.embed_job import run_embed

    if keep is not None and (Path(keep) / "embed").exists():
        raise ValueError(f"--keep-run {keep} already holds embed runs, whose vectors would be reused")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run_dir = run_embed(data_dir, text_cfg, cfg, keep or tmp, name="beauty")  # bars only on a terminal
        wall = time.perf_counter() - start
        metrics = read_json(run_dir / "metrics.json")
        vectors = load_embeddings(run_dir)[1]
    row = {"items_per_s": round(metrics["encoded"] / wall, 1), "wall_s": round(wall, 2),
           **{k: metrics[k] for k in ("encode_s", "encoded", "precision", "num_actors", "placement")}}
    return row, vectors


def id_agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """Items whose hierarchical k-means IDs (Beauty's 256 x 3) agree between two vector sets."""
    from recsys.semantic_ids import HierarchicalKMeans

    codes = [HierarchicalKMeans(branching=256, max_levels=3).fit(v).fit_codes.numpy() for v in (a, b)]
    same = codes[0] == codes[1]  # (N, L)
    prefix = np.cumprod(same, axis=1)  # 1 while every level so far agrees
    return {"method": "hkmeans 256x3 (beauty-tiger-hkmeans-prefix)", "n_items": len(a),
            "same_full_id": int(prefix[:, -1].sum()),
            "same_prefix_by_level": [int(x) for x in prefix.sum(axis=0)]}


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    data = load_items(args.path, args.limit)
    text_cfg = ItemTextConfig()
    base = EncoderConfig()
    texts = build_texts(data.items, text_cfg)
    precision = resolve_precision("auto", resolve_device(base))
    route = locate_model(base).route
    load = os.getloadavg()
    print(f"{len(texts)} items, model route {route}, {os.cpu_count()} CPUs, auto precision {precision}, "
          f"load average {load[0]:.1f}", flush=True)
    results: dict = {}
    plain_rows = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        row, vectors = time_plain(texts, replace(base, precision=precision, batch_size=bs))
        plain_rows.append((row, vectors))
        print("plain", row, flush=True)
    fastest, reference = max(plain_rows, key=lambda rv: rv[0]["items_per_s"])
    results["plain"] = fastest
    results["plain_tried"] = [r for r, _ in plain_rows]
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = (args.keep_run or Path(tmp)) / "data" / "beauty"
        data.save(data_dir)
        # in-process before Ray starts: on one node `auto` never starts Ray, and Ray's idle processes
        # (raylet, GCS, dashboard) would take CPU from it on a 2-core machine
        results["in_process"], _ = time_stage(data_dir, text_cfg,
                                              replace(base, use_ray=False, batch_size=fastest["batch_size"]),
                                              keep=args.keep_run)
        print("in_process", results["in_process"], flush=True)
        ray_cfg = replace(base, use_ray=True, batch_size=args.ray_batch_size, num_actors=args.num_actors,
                          cpus_per_actor=args.cpus_per_actor)
        results["ray"], vectors = time_stage(data_dir, text_cfg, ray_cfg)
        results["ray"]["max_abs_diff_to_plain"] = float(np.abs(vectors - reference).max())
        print("ray", results["ray"], flush=True)
        if args.ray_warm:  # Ray now running: what a pipeline's later stage pays (actors and model loads)
            results["ray_warm"], _ = time_stage(data_dir, text_cfg, ray_cfg)
            print("ray_warm", results["ray_warm"], flush=True)
    extra = {"route": route, "note": args.note, "load_average_at_start": [round(x, 1) for x in load],
             "load_average_at_end": [round(x, 1) for x in os.getloadavg()]}
    if args.fp32:
        results["plain_fp32"], full = time_plain(texts, replace(base, precision="fp32",
                                                                 batch_size=fastest["batch_size"]))
        print("plain_fp32", results["plain_fp32"], flush=True)
        cosine = (full * reference).sum(axis=1)  # both unit length
        extra["bf16_cosine_to_fp32"] = {"min": round(float(cosine.min()), 5), "mean": round(float(cosine.mean()), 5)}
        extra["bf16_fp32_id_agreement"] = id_agreement(reference, full)
        print(extra["bf16_cosine_to_fp32"], extra["bf16_fp32_id_agreement"], flush=True)
    speeds = {k: results[k]["items_per_s"] for k in ("ray", "plain", "in_process", "ray_warm", "plain_fp32")
              if k in results}
    metrics = {"items_per_s": speeds, "ray_to_plain": round(speeds["ray"] / speeds["plain"], 3),
               "in_process_to_plain": round(speeds["in_process"] / speeds["plain"], 3)}
    print(metrics, flush=True)
    if args.limit:
        print("--limit given: no record written")
        return
    path = write_record(args.name, model="embed", dataset="beauty",
                        config={"text": asdict(text_cfg), "encoder": asdict(base), "precision": precision,
                                "ray": {"batch_size": args.ray_batch_size, "num_actors": args.num_actors,
                                        "cpus_per_actor": args.cpus_per_actor}, "n_items": len(texts)},
                        wall_s=time.perf_counter() - start, metrics=metrics, extra={"details": results, **extra},
                        # throughput only: nothing is ranked or selected
                        protocol=protocol(exclude_history=False, selected_on="none"))
    print(f"record: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
