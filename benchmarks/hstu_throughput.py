"""Training throughput and memory of HSTU against SASRec at equal width and depth (issue 21): d 64,
2 layers, 2 heads, batch 256, histories of 20 over a Beauty-sized catalogue (synthetic, ~12k items),
fp32 and bf16 autocast, in-process, one configuration per child process.

    python benchmarks/hstu_throughput.py [--steps 200] [--warmup 10] [--threads 1,2] \
        [--models sasrec-ce,hstu-ce,hstu-sampled-softmax,sasrec-sampled-softmax] [--precisions fp32,bf16] \
        [--name throughput]

A last child times one layer of each at length 200 (B 32, 1 thread, CPU time) and lists the
(T, T) tensors its forward makes. Each child builds the trainer (``configs/beauty-*.yaml``'s model on the synthetic data), runs
``--warmup`` steps, then times ``--steps`` optimiser steps (forward, backward, clipping, AdamW)
over last-item windows, cycling through the epoch's batches. Memory: the child's peak resident
set (VmHWM) and its growth over the resident set after the warm-up's first step, which is what
training adds beyond the weights, optimiser state and data. Writes
benchmarks/results/hstu/synthetic-12k/<--name>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
DATA = ["data.format=synthetic", "data.synthetic.n_users=6000", "data.synthetic.n_items=12000",
        "data.synthetic.n_topics=40", "data.synthetic.min_length=8", "data.synthetic.max_length=40",
        "data.max_history=20", "trainer.data.samples=last", "trainer.optim.batch_size=256",
        "trainer.resources.use_ray=false"]
MODELS = {  # name -> (config, overrides): each Beauty config's model, d 64, 2 layers, 2 heads
    "sasrec-ce": ("configs/beauty-sasrec.yaml", []),
    "sasrec-sampled-softmax": ("configs/beauty-sasrec.yaml", ["model.loss=sampled_softmax", "model.n_negatives=128"]),
    "hstu-ce": ("configs/beauty-hstu.yaml", ["model.loss=ce", "model.time_bias=on"]),
    "hstu-sampled-softmax": ("configs/beauty-hstu.yaml", ["model.time_bias=on"]),
}


def rss_mb(field: str) -> float:
    """VmRSS or VmHWM (peak) of this process in MiB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} is not in /proc/self/status")


def child(spec: dict) -> dict:
    """Time one configuration in this process; returns its figures."""
    import torch

    from recsys.data import load_dataset
    from recsys.data.split import leave_one_out
    from recsys.experiment import load_experiment
    from recsys.training.batching import epoch_batches
    from recsys.training.session import build_trainer

    torch.set_num_threads(spec["threads"])
    config, overrides = MODELS[spec["model"]]
    exp = load_experiment(ROOT / config, [*DATA, *overrides, f"trainer.data.precision={spec['precision']}",
                                          f"trainer.resources.threads={spec['threads']}"])
    split = leave_one_out(load_dataset(exp.data), exp.data.max_history)
    trainer = build_trainer(exp, split)
    batches = list(epoch_batches(trainer.inputs, trainer.targets, exp.trainer.optim.batch_size, 0, 0,
                                 users=trainer.users, timestamps=trainer.times, target_times=trainer.target_times))
    batches = [b for b in batches if len(b.history) == exp.trainer.optim.batch_size]  # full batches only
    trainer.train_model.train()
    trainer.train_step(batches[0])
    base = rss_mb("VmRSS")
    for i in range(1, spec["warmup"]):
        trainer.train_step(batches[i % len(batches)])
    start, cpu_start, losses = time.perf_counter(), time.process_time(), []
    for i in range(spec["steps"]):
        losses.append(trainer.train_step(batches[i % len(batches)])["loss"])
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    rows = spec["steps"] * exp.trainer.optim.batch_size
    return {**spec, "n_items": split.n_items, "batch_size": exp.trainer.optim.batch_size,
            "parameters": sum(p.numel() for p in trainer.model.parameters()),
            "samples_per_s": round(rows / seconds, 1), "ms_per_step": round(1000 * seconds / spec["steps"], 1),
            # CPU seconds of all this process's threads: on a shared machine, what a step costs
            "samples_per_cpu_s": round(rows / cpu_seconds, 1),
            "cpu_ms_per_step": round(1000 * cpu_seconds / spec["steps"], 1),
            "peak_rss_mb": round(rss_mb("VmHWM"), 1), "training_rss_growth_mb": round(rss_mb("VmHWM") - base, 1),
            "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
            "model_config": exp.to_dict()["model"]}


def square_tensors_made(fn, T: int) -> list[str]:
    """Run ``fn()`` and list, by the op that made it, every new tensor whose last two dimensions
    are (T, T) (views and in-place results share an input's storage and are not counted)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.made: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() >= 3 and t.shape[-2:] == (T, T) and not any(
                        a.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for a in inputs):
                    self.made.append(func.overloadpacket.__name__)
            return out

    with Recorder() as recorder:
        fn()
    return recorder.made


def layer_cost(T: int = 200, B: int = 32, d: int = 64, heads: int = 2, reps: int = 5) -> dict:
    """One HSTU layer (time bias on) against one SASRec block (d_ff 4d) at length T: the (T, T)
    tensors each forward makes, and forward + backward CPU milliseconds in fp32 and bf16."""
    import torch

    from recsys.models.hstu import HSTUBlock
    from recsys.models.layers import Block, causal_mask

    torch.manual_seed(0)
    x = torch.randn(B, T, d, requires_grad=True)
    mask = causal_mask(torch.ones(B, T, dtype=torch.bool))
    ts = torch.randint(1, 10 ** 5, (B, T)).cumsum(1)
    hstu, sasrec = HSTUBlock(d, heads, d // heads, 0.2, T, 128).train(), Block(d, heads, 4 * d, 0.2).train()
    buckets = hstu.rab.buckets(ts, torch.cat([ts[:, 1:], ts[:, -1:] + 60], 1))
    layers = {"hstu": lambda: hstu(x, mask, float(T), buckets), "sasrec": lambda: sasrec(x, mask=mask)}
    out = {"T": T, "B": B, "d_model": d, "heads": heads}
    for name, forward in layers.items():
        out[name] = {"square_tensors_per_forward": square_tensors_made(forward, T)}
        for precision in ("fp32", "bf16"):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                for _ in range(2):
                    forward().float().sum().backward()
                start = time.process_time()
                for _ in range(reps):
                    forward().float().sum().backward()
            out[name][f"{precision}_cpu_ms_fwd_bwd"] = round(1000 * (time.process_time() - start) / reps, 1)
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--name", default="throughput", help="the record's name (default throughput)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.child:
        spec = json.loads(ns.child)
        print(json.dumps(layer_cost() if spec.get("layer") else child(spec)))
        return
    from benchmarks.record import machine_note, write_record

    models = [m for m in ns.models.split(",") if m]
    if set(models) - set(MODELS) or ns.steps < 1 or ns.warmup < 1:
        parser.error(f"--models must name some of {list(MODELS)}; --steps and --warmup >= 1")
    start, notes, results = time.perf_counter(), {}, []
    for threads in [int(t) for t in ns.threads.split(",")]:
        notes[threads] = machine_note(threads)
        for model in models:
            for precision in ns.precisions.split(","):
                spec = {"model": model, "precision": precision, "threads": threads, "steps": ns.steps,
                        "warmup": ns.warmup}
                out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                     text=True, cwd=ROOT, env={"OMP_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin",
                                                               "PYTHONWARNINGS": "ignore"})
                if out.returncode:
                    raise RuntimeError(f"{spec} failed:\n{out.stderr[-3000:]}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                results.append(result)
                print(f"{threads} thread(s) {model:24s} {precision}: {result['samples_per_s']:8.1f} samples/s "
                      f"({result['samples_per_cpu_s']:.1f} per CPU-second), {result['ms_per_step']:7.1f} ms/step, peak RSS {result['peak_rss_mb']:.0f} MiB "
                      f"(+{result['training_rss_growth_mb']:.0f} training)", flush=True)
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps({"layer": True})], capture_output=True,
                         text=True, cwd=ROOT, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                                   "PYTHONWARNINGS": "ignore"})
    if out.returncode:
        raise RuntimeError(f"the layer cost failed:\n{out.stderr[-3000:]}")
    layer = json.loads(out.stdout.strip().splitlines()[-1])
    print("one layer at T=200:", json.dumps(layer), flush=True)
    write_record(ns.name, model="hstu", dataset="synthetic-12k", config={"data": DATA, "models": MODELS},
                 wall_s=time.perf_counter() - start, metrics={"training": [
                     {k: v for k, v in r.items() if k != "model_config"} for r in results], "layer_T200": layer},
                 extra={"model_configs": {r["model"]: r["model_config"] for r in results},
                        "machine_note": {str(t): n for t, n in notes.items()},
                        "note": "fixed-step timings, nothing selected: no quality figures"})


if __name__ == "__main__":
    main(sys.argv[1:])
