"""The ``history`` stage: every user's whole history, clustered into virtual items, written with
the user's events into a new store (``store.path``; default ``<run>/state.sqlite``).

Vectors: the items' *content* vectors of an embed run (the sentence encoder's), not a retriever's
item table. A registered item gets its content vector from the same encoder when it is
registered, so a new item's events join clusters like any other's, and the clusters do not change
when a retriever is retrained; a retriever's ID-embedding table has no row for a new item.

Users are spread over Ray Data blocks and clustered in tasks (``history.use_ray``, the default);
``history.use_ray=false`` runs the same function in this process, for small data. The driver is
the store's single writer: it writes all users in one transaction into a temporary file that is
renamed into place when whole, so a crash never leaves a half-made store behind.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from recsys.data import InteractionData
from recsys.experiment import ExperimentConfig
from recsys.history.build import HistoryConfig, compression, user_cluster_sets
from recsys.history.store import (ClusterSet, Event, StoreConfig, clusters_from_bytes, clusters_to_bytes,
                                  open_store)
from recsys.runs import (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, machine_description, mark_complete,
                         require_complete, stage_run_dir, write_json, write_text)
from recsys.text import load_embeddings


STORE_FILE = "state.sqlite"


def cluster_users(batch: pd.DataFrame, vectors: np.ndarray, cfg: dict) -> pd.DataFrame:
    """Users (``user_id``, ``item_ids``) -> one row per user and label: user_id, label, cutoff,
    clusters (an .npz blob). The function a Ray Data task, or this process, maps over users."""
    config = HistoryConfig(**cfg)
    rows = []
    for user_id, items in zip(batch["user_id"], batch["item_ids"]):
        for s in user_cluster_sets(np.asarray(items, dtype=np.int64), vectors, config):
            rows.append({"user_id": str(user_id), "label": s.label, "cutoff": s.cutoff,
                         "clusters": clusters_to_bytes(s.clusters)})
    return pd.DataFrame(rows, columns=["user_id", "label", "cutoff", "clusters"])


def cluster_all(users: pd.DataFrame, vectors: np.ndarray, cfg: HistoryConfig) -> pd.DataFrame:
    cfg_dict = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    if not cfg.use_ray:
        return cluster_users(users, vectors, cfg_dict)
    import ray

    from pipelines.ray_env import init_ray

    init_ray()
    frame = users[["user_id", "item_ids"]]
    bounds = np.linspace(0, len(frame), min(cfg.blocks, len(frame)) + 1).astype(int)  # contiguous blocks of users
    ds = ray.data.from_pandas([frame.iloc[a:b] for a, b in zip(bounds[:-1], bounds[1:])])
    out = ds.map_batches(cluster_users, batch_format="pandas", fn_kwargs={"vectors": vectors,
                                                                         "cfg": cfg_dict},
                         num_cpus=cfg.cpus_per_task)
    return pd.concat(list(out.iter_batches(batch_format="pandas", batch_size=None)), ignore_index=True)


def new_store_path(cfg: StoreConfig, run_dir: Path) -> Path:
    path = Path(cfg.path).resolve() if cfg.path else run_dir / STORE_FILE
    if path.exists():
        raise ValueError(f"store.path={path} exists; `recsys history` makes a new store and never overwrites one "
                         "(it holds acknowledged events); choose another store.path or remove it")
    return path


def run_history(exp: ExperimentConfig, data_dir: Path, embed_dir: Path, parent: Path | None = None) -> Path:
    """Cluster every user's history at each example's cutoff and write events + clusters to a new store."""
    cfg = exp.history
    data_dir, embed_dir = require_complete(data_dir, "data"), require_complete(embed_dir, "embed")
    data = InteractionData.load(data_dir)
    item_ids, vectors = load_embeddings(embed_dir)
    if len(item_ids) != data.n_items:
        raise ValueError(f"{embed_dir} holds vectors for {len(item_ids)} items but {data_dir} has {data.n_items}; "
                         "embed this data run (recsys embed --data DATA_RUN)")
    run_dir = stage_run_dir(exp.run.root, "history", exp.run.name, parent)
    path = new_store_path(exp.store, run_dir)
    write_json(run_dir / CONFIG_FILE, {"history": exp.to_dict()["history"], "store": {**exp.to_dict()["store"],
                                       "path": str(path)}, "data_dir": str(data_dir), "embed_dir": str(embed_dir)})
    start = time.perf_counter()
    users = data.sequences.assign(user_id=data.sequences["user_id"].astype(str))
    sets = cluster_all(users, vectors, cfg)
    cluster_s = time.perf_counter() - start
    write_store(path, data, vectors, sets, cfg, exp.store)
    serve = sets[sets["label"] == "serve"].set_index("user_id")
    lengths = users["item_ids"].map(len).to_numpy()
    n_clusters = serve.loc[users["user_id"], "clusters"].map(lambda b: len(clusters_from_bytes(b).item)).to_numpy()
    ratio = compression(lengths, n_clusters, long=exp.data.max_history)
    metrics = {"users": len(users), "gamma": cfg.gamma, "bands": cfg.bands, "seed": cfg.seed,
               "compression": ratio.as_dict(), "cluster_sets": sets["label"].value_counts().to_dict(),
               "cluster_s": round(cluster_s, 2), "users_per_s": round(len(users) / max(cluster_s, 1e-9), 1),
               "use_ray": cfg.use_ray, "wall_s": round(time.perf_counter() - start, 2), "store": str(path),
               "machine": machine_description()}
    write_json(run_dir / METRICS_FILE, metrics)
    write_text(run_dir / SUMMARY_FILE, "\n".join([
        f"# history: {len(users)} users clustered with gamma = {cfg.gamma}", "",
        f"- compression (history length / clusters, whole histories): {ratio.ratio} over all users "
        f"({ratio.events} events in {ratio.clusters} clusters); mean per user {ratio.mean_user_ratio}",
        f"- users with more than {exp.data.max_history} events: {ratio.long_users}, compression {ratio.long_ratio}",
        "- cluster sets per label (an example's set holds only the events before its target): "
        + ", ".join(f"{k} {v}" for k, v in metrics["cluster_sets"].items()),
        f"- clustering {cluster_s:.2f} s ({metrics['users_per_s']} users/s, {'Ray Data' if cfg.use_ray else 'in-process'})",
        f"- store: {path}", ""]))
    mark_complete(run_dir, "history")
    return run_dir


def write_store(path: Path, data: InteractionData, vectors: np.ndarray, sets: pd.DataFrame, cfg: HistoryConfig,
                store_cfg: StoreConfig) -> None:
    """All users' events and cluster sets into a new store at ``path``, made whole under a temporary name."""
    tmp = path.with_name(f".{path.name}.building")
    for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        leftover.unlink(missing_ok=True)
    catalogue = data.items.sort_values("item_id")["raw_id"].astype(str).tolist()
    store = open_store(StoreConfig(kind=store_cfg.kind, path=str(tmp), create=True), catalogue, vectors)
    by_user = {u: g for u, g in sets.groupby("user_id", sort=False)}
    times = data.time_sequences()

    def rows():
        for row, (user_id, items) in enumerate(zip(data.sequences["user_id"].astype(str), data.sequences["item_ids"])):
            events = [Event(f"data:{user_id}:{pos}", catalogue[int(i) - 1],
                            None if times is None else int(times[row][pos])) for pos, i in enumerate(items)]
            user_sets = [ClusterSet(r.label, int(r.cutoff), cfg.gamma, clusters_from_bytes(r.clusters))
                         for r in by_user[user_id].itertuples()]
            yield user_id, events, user_sets

    store.import_histories(rows())
    store.enable_clusters(cfg.gamma, cfg.seed)
    store.close()
    tmp.rename(path)
