"""The ``ids`` stage: item vectors -> tokenizer -> ID index + quality report.

The vectors are an embed run's (content: the semantic space) or a trained model's item
embeddings (``recsys ids --from-train RUN``: behaviour, for a behavior space)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from recsys.execution import ClusterView, Placement, choose_path
from recsys.experiment import ExperimentConfig, experiment_dict_from_run, experiment_from_dict
from recsys.runs import (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, mark_complete, read_json, require_complete,
                         named, stage_run_dir, write_json, write_text)
from recsys.semantic_ids.build import IdsConfig, build_index, fit_in_process, fitted_codes
from recsys.semantic_ids.report import write_report
from recsys.text import EMBEDDINGS_FILE, load_embeddings
from recsys.text.store import write_embeddings

TOKENIZER_DIR = "tokenizer"
INDEX_DIR = "index"


def ids_placement(cfg: IdsConfig, n_items: int) -> Placement:
    """Where the tokenizer is fitted (``ids.use_ray``; see recsys.execution)."""
    from pipelines.ray_env import cluster_view

    work = (f"{n_items} vectors x {cfg.rqvae.epochs} RQ-VAE epochs" if cfg.method == "rqvae"
            else f"hierarchical k-means of {n_items} vectors")
    cluster = cluster_view() if cfg.use_ray == "auto" and not cfg.ray_only else ClusterView()
    return choose_path("ids.use_ray", cfg.use_ray, cluster, work, cfg.ray_only)


def fit_tokenizer(cfg: IdsConfig, embed_dir: Path, embeddings: np.ndarray, run_dir: Path, use_ray: bool):
    if not use_ray:
        return fit_in_process(cfg, embeddings)
    from pipelines.ray_env import init_ray

    init_ray()
    if cfg.method == "rqvae":
        from pipelines.ids_job import fit_rqvae_with_ray

        return fit_rqvae_with_ray(cfg, embed_dir / EMBEDDINGS_FILE, embeddings, run_dir)
    if cfg.hkmeans_top == "blocks":
        from pipelines.hkmeans_blocks import fit_over_blocks

        return fit_over_blocks(str(embed_dir / EMBEDDINGS_FILE), cfg.hkmeans, len(embeddings), cfg.top_sample,
                               cfg.top_refine_iters)
    from pipelines.ids_job import ray_map

    return fit_in_process(cfg, embeddings, map_fn=ray_map(cfg.cpus_per_task))


def trained_item_vectors(train_dir: Path) -> np.ndarray:
    """A train run's item embeddings (N, D), row i - 1 for item i: the vectors behaviour IDs are
    built from. Refuses a refit (its embeddings have seen the validation targets, which the IDs
    would then leak into validation) and a model that exposes no item vectors."""
    from recsys.training.checkpoint import load_model

    train_dir = require_complete(train_dir, "train")
    exp = experiment_from_dict(experiment_dict_from_run(read_json(train_dir / CONFIG_FILE)))
    if exp.trainer.selection.refit:
        raise ValueError(f"{train_dir} is a refit (trainer.selection.refit=true): its item embeddings were trained on "
                         "the validation targets, and IDs built from them would leak those into validation; build "
                         "IDs from a run trained on training transitions only")
    model = load_model(train_dir / "checkpoints" / "best")
    if not model.capabilities.item_vectors:
        raise ValueError(f"{train_dir} holds a {type(model).__name__}, which exposes no item vectors "
                         "(capabilities.item_vectors); train a model that does, e.g. sasrec")
    return model.item_embeddings().detach().float().cpu().numpy()


def run_ids(exp: ExperimentConfig, embed_dir: Path | None = None, parent: Path | None = None,
            train_dir: Path | None = None) -> Path:
    """Fit the configured tokenizer on an embed run's vectors, or (``train_dir``) on a train run's
    item embeddings, which are first written into the ids run; write tokenizer, index, report."""
    run_dir = stage_run_dir(exp.run.root, "ids", named(exp.ids.method, exp.run.name), parent)
    if train_dir is not None:
        train_dir = Path(train_dir).resolve()
        vectors = trained_item_vectors(train_dir)
        write_embeddings(run_dir / EMBEDDINGS_FILE, np.arange(1, len(vectors) + 1), vectors,
                         f"train:{train_dir}", [""] * len(vectors))
        embed_dir, source = run_dir, {"train_dir": str(train_dir)}
    else:
        embed_dir = Path(embed_dir).resolve()
        source = {"embed_dir": str(embed_dir)}
    item_ids, embeddings = load_embeddings(embed_dir)
    write_json(run_dir / CONFIG_FILE, {"ids": exp.to_dict()["ids"], **source})
    placement = ids_placement(exp.ids, len(item_ids))
    print(placement.line("ids"), flush=True)
    start = time.perf_counter()
    tokenizer = fit_tokenizer(exp.ids, embed_dir, embeddings, run_dir, placement.use_ray)
    fit_s = time.perf_counter() - start
    codes = fitted_codes(tokenizer, embeddings)  # (N, L) content codes, before the collision level
    reconstruction = float(((tokenizer.decode(codes).numpy() - embeddings) ** 2).sum(axis=1).mean())
    index = build_index(item_ids, tokenizer, embeddings)
    tokenizer.save(run_dir / TOKENIZER_DIR)
    index.save(run_dir / INDEX_DIR)
    table = write_report(run_dir, codes, tokenizer.codebook_sizes, reconstruction)
    metrics = {"method": exp.ids.method, "n_items": len(item_ids), "dim": int(embeddings.shape[1]),
               "levels": tokenizer.n_levels, "codebook_sizes": tokenizer.codebook_sizes,
               "collision_rate": index.collision_rate, "max_items_per_tuple": index.max_collision_depth,
               "reconstruction_sq_error": reconstruction, "fit_s": round(fit_s, 2),
               "use_ray": placement.use_ray, "placement": placement.reason,
               "wall_s": round(time.perf_counter() - start, 2)}
    write_json(run_dir / METRICS_FILE, metrics)
    write_text(run_dir / SUMMARY_FILE, "\n".join([
        f"# semantic IDs: {exp.ids.method}", "",
        f"- {len(item_ids)} items, {tokenizer.n_levels} levels of {tokenizer.codebook_sizes} codes + a collision level",
        f"- collision rate before the collision level: {index.collision_rate:.4f}; "
        f"at most {index.max_collision_depth} item(s) share one content tuple",
        f"- reconstruction error (mean squared distance): {reconstruction:.4f}; fit {fit_s:.1f} s, "
        f"{placement.line('fitted')}",
        "- id_quality.json, code_usage.png, tokenizer/, index/", "", table, ""]))
    mark_complete(run_dir, "ids")
    return run_dir
