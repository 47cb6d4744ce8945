"""The item encoder in fp32, bf16 and int8 (torch's dynamic quantization of the Linear layers) on
Amazon Beauty's texts: items/s of a plain ``encode``, cosine to the fp32 vectors, and how many items
keep their hierarchical k-means IDs (Beauty's 256 x 3). Writes
benchmarks/results/embed/beauty/<--name>.json (default precisions.json).

    python benchmarks/embed_precisions.py --path /path/to/amazon-beauty [--threads 2] [--limit N] \
        [--precisions fp32,int8] [--name precisions-icelake]

fp32 is always encoded: it is the reference of every cosine and ID agreement. On a CPU without native
bf16, bf16 is emulated (several times slower than fp32) and can be left out with ``--precisions``.

int8 is measured, not offered by the embed stage: see docs/experiments/ray-paths.md.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.embed_beauty import id_agreement, load_items  # noqa: E402
from benchmarks.record import machine_note, protocol, write_record  # noqa: E402
from recsys.text import EncoderConfig, ItemTextConfig, build_texts  # noqa: E402
from recsys.text.encoder import encode, load_encoder  # noqa: E402


def int8(model):
    """Dynamic int8 Linear layers; torch warns that this API is deprecated, which is known here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", required=True, help="the amazon-beauty directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="only the first N items; no record is written")
    parser.add_argument("--precisions", default="fp32,bf16,int8", help="which encoders to time (fp32 always)")
    parser.add_argument("--name", default="precisions", help="the record's name")
    args = parser.parse_args(argv)
    names = ["fp32", *[p for p in args.precisions.split(",") if p != "fp32"]]
    if unknown := set(names) - {"fp32", "bf16", "int8"}:
        parser.error(f"--precisions: unknown {sorted(unknown)}; choose from fp32, bf16, int8")
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    texts = build_texts(load_items(args.path, args.limit).items, ItemTextConfig())
    base = EncoderConfig()
    vectors, speed = {}, {}
    for name in names:
        cfg = replace(base, precision="fp32" if name == "int8" else name)
        model = load_encoder(cfg)
        model = int8(model) if name == "int8" else model
        encode(model, texts[:64], cfg)  # warm-up
        begin = time.perf_counter()
        vectors[name] = encode(model, texts, cfg)
        speed[name] = round(len(texts) / (time.perf_counter() - begin), 1)
        print(name, speed[name], "items/s", flush=True)
    metrics = {"items_per_s": speed}
    for name in names[1:]:
        cosine = (vectors[name] * vectors["fp32"]).sum(axis=1)
        metrics[f"{name}_cosine_to_fp32"] = {"min": round(float(cosine.min()), 5), "mean": round(float(cosine.mean()), 5)}
        metrics[f"{name}_fp32_id_agreement"] = id_agreement(vectors["fp32"], vectors[name])
        print(name, metrics[f"{name}_cosine_to_fp32"], metrics[f"{name}_fp32_id_agreement"], flush=True)
    if args.limit:
        print("--limit given: no record written")
        return
    path = write_record(args.name, model="embed", dataset="beauty",
                        config={"encoder": asdict(base), "n_items": len(texts), "threads": args.threads, "precisions": names,
                                "int8": "torch.ao.quantization.quantize_dynamic, Linear layers, qint8"},
                        wall_s=time.perf_counter() - start, metrics=metrics,
                        extra={"machine_note": machine_note(args.threads)},
                        # throughput and ID agreement: nothing is ranked or selected
                        protocol=protocol(exclude_history=False, selected_on="none"))
    print(f"record: {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
