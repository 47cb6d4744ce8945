"""Item-embedding throughput on Amazon Beauty: plain single-process ``SentenceTransformer.encode``
against the Ray Data embed stage with 1 and 2 actors; writes benchmarks/results/embed/beauty/throughput.json.

    python benchmarks/embed_beauty.py --path /path/to/amazon-beauty [--bf16] [--limit 1000]

``--limit N`` embeds only the first N items, prints the figures and writes no record (a quick
check). Ray runs use a fresh run root each, so nothing is reused. Ray's items/s include actor
start-up (model load); ``encode_s`` is that phase, ``wall_s`` the whole stage.
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

from benchmarks.record import write_record  # noqa: E402
from recsys.data import DataConfig, InteractionData, load_dataset  # noqa: E402
from recsys.runs import read_json  # noqa: E402
from recsys.text import EncoderConfig, ItemTextConfig, build_texts, load_embeddings  # noqa: E402
from recsys.text.encoder import encode, load_encoder, locate_model  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", required=True, help="the amazon-beauty directory")
    parser.add_argument("--limit", type=int, default=0, help="only the first N items; no record is written")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--ray", default="1x1,2x1", help="Ray pools as ACTORSxCPUS, comma separated")
    parser.add_argument("--bf16", action="store_true", help="also time plain encoding with bf16 weights")
    parser.add_argument("--single-thread", action="store_true",
                        help="also time plain encoding on one torch thread, what one 1-CPU actor gets")
    parser.add_argument("--note", default="", help="stored in the record, e.g. what else ran on the machine")
    return parser.parse_args(argv)


def load_items(path: str, limit: int) -> InteractionData:
    data = load_dataset(DataConfig(format="beauty", path=path))
    if limit:  # keep a valid data run: items 1..limit and sequences restricted to them
        data.items = data.items[data.items["item_id"] <= limit].reset_index(drop=True)
        seqs = data.sequences.copy()
        seqs["item_ids"] = seqs["item_ids"].map(lambda s: s[s <= limit])
        data.sequences = seqs[seqs["item_ids"].map(len) > 0].reset_index(drop=True)
    return data


def time_plain(texts: list[str], cfg: EncoderConfig, threads: int = 0) -> tuple[dict, np.ndarray]:
    import torch

    default_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    model = load_encoder(cfg)
    load_s = time.perf_counter() - start
    encode(model, texts[:64], cfg)  # warm-up: first-call allocations are not throughput
    start = time.perf_counter()
    vectors = encode(model, texts, cfg)
    encode_s = time.perf_counter() - start
    row = {"items_per_s": round(len(texts) / encode_s, 1), "encode_s": round(encode_s, 2),
           "load_s": round(load_s, 2), "torch_threads": torch.get_num_threads()}
    torch.set_num_threads(default_threads)
    return row, vectors


def time_ray(data_dir: Path, texts_cfg: ItemTextConfig, cfg: EncoderConfig) -> tuple[dict, np.ndarray]:
    from pipelines.embed_job import run_embed

    with tempfile.TemporaryDirectory() as root:
        run_dir = run_embed(data_dir, texts_cfg, cfg, root, progress=False)
        metrics = read_json(run_dir / "metrics.json")
        vectors = load_embeddings(run_dir)[1]
    row = {k: metrics[k] for k in ("items_per_s", "encode_s", "wall_s", "encoded")}
    return row, vectors


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    data = load_items(args.path, args.limit)
    text_cfg, cfg = ItemTextConfig(), EncoderConfig(batch_size=args.batch_size)
    texts = build_texts(data.items, text_cfg)
    route = locate_model(cfg).route
    print(f"{len(texts)} items, model route {route}, {os.cpu_count()} CPUs", flush=True)
    results, extra = {}, {"route": route, "note": args.note}
    results["plain"], reference = time_plain(texts, cfg)
    print("plain", results["plain"], flush=True)
    if args.single_thread:
        results["plain_1thread"], _ = time_plain(texts, cfg, threads=1)
        print("plain_1thread", results["plain_1thread"], flush=True)
    if args.bf16:
        results["plain_bf16"], low = time_plain(texts, replace(cfg, precision="bf16"))
        cosine = (low * reference).sum(axis=1)  # both unit length
        extra["bf16_cosine_to_fp32"] = {"min": round(float(cosine.min()), 5), "mean": round(float(cosine.mean()), 5)}
        print("plain_bf16", results["plain_bf16"], extra["bf16_cosine_to_fp32"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data.save(Path(tmp) / "data")
        for spec in args.ray.split(","):
            actors, cpus = spec.split("x")
            pool = replace(cfg, num_actors=int(actors), cpus_per_actor=float(cpus))
            row, vectors = time_ray(Path(tmp) / "data", text_cfg, pool)
            row["max_abs_diff_to_plain"] = float(np.abs(vectors - reference).max())
            results[f"ray_{actors}actor_{cpus}cpu"] = row
            print(f"ray {spec}", row, flush=True)
    if args.limit:
        print("--limit given: no record written")
        return
    path = write_record("throughput", model="embed", dataset="beauty",
                        config={"text": asdict(text_cfg), "encoder": asdict(cfg), "ray": args.ray,
                                                "n_items": len(texts)},
                        wall_s=time.perf_counter() - start,
                        metrics={"items_per_s": {k: v["items_per_s"] for k, v in results.items()}},
                        extra={"details": results, **extra})
    print(f"record: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
