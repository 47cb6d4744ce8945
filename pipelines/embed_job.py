"""The embed stage: item texts -> sentence-encoder vectors -> ``runs/embed/<run-id>/``.

The texts are encoded in this process on one node, or by a Ray Data actor pool on a cluster
(``embed.encoder.use_ray``; recsys.execution). Texts are built on the driver (cheap). Vectors of
earlier embed runs under the same run root are reused when the encoder identity and the text hash
match, so only new or changed texts are encoded.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from recsys.data import InteractionData
from recsys.execution import ClusterView, Placement, choose_path
from recsys.runs import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, mark_complete, stage_run_dir, write_json, write_text
from recsys.text import EMBEDDINGS_FILE, EncoderConfig, ItemTextConfig, build_texts, text_hash, write_embeddings
from recsys.text.encoder import encode, load_encoder, locate_model, resolve_device, resolve_precision
from recsys.text.store import vectors_from_column

log = logging.getLogger(__name__)


class ItemEncoder:
    """Ray Data callable class: loads the encoder once per actor, encodes one batch per call."""

    def __init__(self, model_path: str, encoder: dict):
        import torch

        self.cfg = EncoderConfig(**encoder)
        if self.cfg.device == "cpu":  # one torch thread per CPU the actor holds, not per core of the node
            torch.set_num_threads(max(1, round(self.cfg.cpus_per_actor)))
        self.model = load_encoder(self.cfg, Path(model_path))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vectors = encode(self.model, batch["text"].tolist(), self.cfg)  # (B, D) float32
        return {"text_hash": batch["text_hash"], "vector": vectors}


def run_embed(data_dir: Path, text_cfg: ItemTextConfig, enc_cfg: EncoderConfig, run_root: str | Path,
              name: str = "", progress: bool | None = None, parent: Path | None = None) -> Path:
    """Embed the items of a ``recsys data`` run; returns the new ``<run_root>/embed/<run-id>/``
    (``parent/embed`` inside a pipeline run). In this process or on a Ray Data actor pool
    (``embed.encoder.use_ray``, recsys.execution). Vectors of earlier runs under ``run_root`` with
    the same encoder and text are reused. ``progress`` None = Ray Data progress bars only when
    stdout is a terminal."""
    start = time.perf_counter()
    data_dir = Path(data_dir).resolve()
    items = InteractionData.load(data_dir).items
    texts = build_texts(items, text_cfg)
    hashes = [text_hash(t) for t in texts]
    placement = embed_placement(enc_cfg, len(texts))
    print(placement.line("embed"), flush=True)
    enc_cfg = ray_encoder(enc_cfg) if placement.use_ray else local_encoder(enc_cfg)  # device, precision, pool
    identity = enc_cfg.identity()
    known = previous_vectors(Path(run_root), identity)
    todo = pd.DataFrame({"text_hash": hashes, "text": texts})
    todo = todo[~todo["text_hash"].isin(known)].drop_duplicates("text_hash", ignore_index=True)
    route, encode_s = "none (all reused)", 0.0
    if len(todo):
        location = locate_model(enc_cfg)  # once, on the driver: actors get the local path
        route = location.route
        enc_start = time.perf_counter()
        if placement.use_ray:
            new = encode_with_ray(todo, location.path, enc_cfg, progress)
        else:
            new = dict(zip(todo["text_hash"], encode(load_encoder(enc_cfg, location.path), todo["text"].tolist(),
                                                     enc_cfg)))
        encode_s = time.perf_counter() - enc_start
        known.update(new)
    rows = [known[h] for h in hashes]
    dims = {len(v) for v in rows}
    if len(dims) > 1:  # same identity, other dim: a local model directory's files were replaced
        raise ValueError(f"vectors reused from earlier runs under {run_root}/embed and new ones differ in dim "
                         f"({sorted(dims)}) for encoder {identity!r}; remove the old embed runs")
    vectors = np.stack(rows)  # (N, D)
    encoded_now = set(todo["text_hash"])
    n_reused = sum(h not in encoded_now for h in hashes)
    run_dir = stage_run_dir(run_root, "embed", name or Path(enc_cfg.model).name, parent)
    write_embeddings(run_dir / EMBEDDINGS_FILE, items["item_id"].to_numpy(), vectors, identity, hashes)
    metrics = {
        "n_items": len(items), "dim": int(vectors.shape[1]), "encoded": len(items) - n_reused,
        "reused": n_reused, "encoded_unique_texts": len(todo),
        "items_per_s": round(len(todo) / encode_s, 1) if encode_s > 0 else None,
        "encode_s": round(encode_s, 2), "wall_s": round(time.perf_counter() - start, 2),
        "route": route, "device": enc_cfg.device, "precision": enc_cfg.precision, "use_ray": placement.use_ray,
        "placement": placement.reason, "num_actors": enc_cfg.num_actors if placement.use_ray else 0,
        "encoder": identity,
    }
    write_json(run_dir / CONFIG_FILE, {"data_dir": str(data_dir), "text": asdict(text_cfg), "encoder": asdict(enc_cfg)})
    write_json(run_dir / METRICS_FILE, metrics)
    write_text(run_dir / SUMMARY_FILE, _summary(metrics, data_dir, texts))
    mark_complete(run_dir, "embed")
    return run_dir


def embed_placement(cfg: EncoderConfig, n_texts: int) -> Placement:
    """Where the texts are encoded (``embed.encoder.use_ray``; see recsys.execution)."""
    from pipelines.ray_env import cluster_view

    cluster = cluster_view() if cfg.use_ray == "auto" else ClusterView()
    return choose_path("embed.encoder.use_ray", cfg.use_ray, cluster, f"{n_texts} texts")


def local_encoder(cfg: EncoderConfig) -> EncoderConfig:
    """``cfg`` with the device and precision this process will use."""
    device = resolve_device(cfg)
    return replace(cfg, device=device, precision=resolve_precision(cfg.precision, device))


def ray_encoder(cfg: EncoderConfig) -> EncoderConfig:
    """``cfg`` with the device, precision and pool size for the Ray cluster (started or joined
    here). A pool of 0 actors means one per GPU, else the cluster's CPUs / cpus_per_actor."""
    import ray

    from pipelines.ray_env import init_ray

    init_ray()
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    if cfg.device == "cuda" and gpus == 0:  # Ray Data would wait forever for a GPU actor slot
        raise ValueError("embed.encoder.device=cuda but the Ray cluster has no GPU; use auto or cpu")
    # decided here: a CPU-only actor must not pick up a GPU by itself
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0) else "cpu"
    actors = cfg.num_actors or (int(gpus) if device == "cuda" else
                                max(1, int(resources.get("CPU", 1) // cfg.cpus_per_actor)))
    return replace(cfg, device=device, precision=resolve_precision(cfg.precision, device), num_actors=actors)


def encode_with_ray(todo: pd.DataFrame, model_path: Path, cfg: EncoderConfig,
                    progress: bool | None = None) -> dict[str, np.ndarray]:
    """Encode ``todo`` (columns text_hash, text; unique hashes) on a Ray Data actor pool; ``cfg``
    as ``ray_encoder`` resolved it. Returns {text_hash: vector (D,)}."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    use_gpu = cfg.device == "cuda"
    ctx = DataContext.get_current()
    old_progress = ctx.enable_progress_bars
    if progress is not None:
        ctx.enable_progress_bars = progress
    # progress=None leaves Ray Data's default: bars on a terminal, and elsewhere (CI logs) progress
    # logged at INFO, below RAY_DATA_LOG_LEVEL=WARNING. Turning bars off instead makes Ray Data warn
    # that they are off, a warning line in every healthy run.
    # Similar lengths in a batch mean less padding; the encoder only sorts within one call.
    todo = todo.iloc[np.argsort(todo["text"].str.len().to_numpy(), kind="stable")]
    try:
        # One block per batch: Ray Data hands blocks to whichever actor is free, so the pool stays busy
        # to the end (8 blocks of sorted texts left one actor encoding the longest texts alone:
        # 158 against 203 items/s on Beauty, 2 actors x 1 CPU). Split here rather than with
        # from_pandas(override_num_blocks=), which np.array_splits the frame and yields bare ndarrays
        # under pandas 3.
        blocks = [todo.iloc[i:i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
        with actor_restart_args() as restarts:
            ds = ray.data.from_pandas(blocks).map_batches(
                ItemEncoder,
                fn_constructor_kwargs={"model_path": str(model_path), "encoder": asdict(cfg)},
                # As much of the pool as is free now starts at once, so the actors load the model side
                # by side instead of one after another (a pool that must wait for busy CPUs would wait
                # forever). Safe only because from_pandas blocks need no task: a pool of N one-CPU
                # actors on an N-CPU node holds every CPU, and a reader task (read_parquet) feeding it
                # would never be scheduled (RAY-NOTES). A reader source needs min_size=1.
                compute=ActorPoolStrategy(min_size=startable_actors(cfg), max_size=cfg.num_actors),
                batch_size=cfg.batch_size, batch_format="numpy",
                num_cpus=cfg.cpus_per_actor, num_gpus=1 if use_gpu else 0, **restarts)
        # Collected on the driver rather than via write_parquet: at catalogue scale (12k x 384
        # floats = 18 MB) one pass gives a single file sorted by item id, merged with reused vectors.
        out: dict[str, np.ndarray] = {}
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            out.update(zip(batch["text_hash"].tolist(), np.asarray(batch["vector"], dtype=np.float32)))
    finally:
        ctx.enable_progress_bars = old_progress
    missing = set(todo["text_hash"]) - set(out)
    if missing:
        raise RuntimeError(f"Ray Data returned no vector for {len(missing)} text(s)")
    return out


def startable_actors(cfg: EncoderConfig) -> int:
    """How many of the pool's ``cfg.num_actors`` actors the cluster's free resources hold now (>= 1)."""
    import ray

    free = ray.available_resources()
    fits = free.get("GPU", 0) if cfg.device == "cuda" else free.get("CPU", 0) / cfg.cpus_per_actor
    return max(1, min(cfg.num_actors, int(fits)))


def actor_restarts() -> dict:
    """Ray Data restarts a dead actor forever by default. On one local node a restarted encoder would
    meet what killed the first (memory), and the default makes Ray's core worker log an error-level
    line per actor, because the actor's constructor argument (Ray Data's map transformer) lives in
    the object store (ray-project/ray#53727). So locally a crash fails the stage with its error; on
    a cluster, where a node can go away, Ray Data's default stays."""
    from pipelines.ray_env import on_cluster

    return {} if on_cluster() else {"max_restarts": 0}


@contextmanager
def actor_restart_args() -> Iterator[dict]:
    """``actor_restarts()`` for ``map_batches``. Ray 2.60 takes ``max_restarts`` only among the
    ``**ray_remote_args`` it deprecates (no named parameter exists yet), so that one deprecation
    notice, for this one call, is not shown; when Ray removes the catch-all (announced for 2.64) the
    call fails loudly and this is revisited."""
    from ray.util.annotations import RayDeprecationWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated", category=RayDeprecationWarning)
        yield actor_restarts()


def previous_vectors(run_root: Path, identity: str) -> dict[str, np.ndarray]:
    """{text_hash: vector} from earlier embed runs under ``run_root`` (``embed/<run-id>/`` and
    ``pipeline/<run-id>/embed/``) made with the same encoder identity; the newest run wins."""
    found: dict[str, np.ndarray] = {}
    paths = [*run_root.glob(f"embed/*/{EMBEDDINGS_FILE}"), *run_root.glob(f"pipeline/*/embed/{EMBEDDINGS_FILE}")]
    run_id = {p: p.parent.name if p.parent.parent.name == "embed" else p.parent.parent.name for p in paths}
    for path in sorted(paths, key=run_id.get):  # run ids start with their time
        try:
            table = pq.read_table(path, columns=["vector", "text_hash"], filters=[("encoder", "=", identity)])
            vectors = vectors_from_column(table.column("vector"))
        except (OSError, ValueError, KeyError) as err:  # an unreadable old run only costs re-encoding
            log.warning("not reusing %s: %s", path, err)
            continue
        finite = np.isfinite(vectors).all(axis=1)
        if found and len(vectors) and vectors.shape[1] != len(next(iter(found.values()))):
            log.warning("not reusing %s: its vectors have dim %d, earlier runs %d", path, vectors.shape[1],
                        len(next(iter(found.values()))))
            continue
        found.update((h, v) for h, v, ok in zip(table.column("text_hash").to_pylist(), vectors, finite) if ok)
    return found


def _summary(m: dict, data_dir: Path, texts: list[str]) -> str:
    speed = f"{m['items_per_s']} texts/s" if m["items_per_s"] else "nothing encoded"
    return "\n".join([
        f"# embed: {m['encoder']}", "",
        f"- items: {m['n_items']} from {data_dir}, vector dim {m['dim']}",
        f"- encoded {m['encoded']} item(s) ({m['encoded_unique_texts']} distinct texts), reused {m['reused']} "
        "from earlier embed runs",
        f"- {'on Ray' if m['use_ray'] else 'in-process'} ({m['placement']})",
        f"- model route: {m['route']}; device {m['device']}, {m['precision']}"
        + (f"; {m['num_actors']} actor(s) max" if m["use_ray"] else "") + f"; {speed}",
        f"- wall time {m['wall_s']} s", "",
        "Example text:", "", f"> {texts[0]}", ""])
