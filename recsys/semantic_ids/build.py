"""From item embeddings to a semantic-ID index, in-process: the path without Ray, and the
shared tail of the Ray path (``pipelines/ids_job.py`` fits the tokenizer distributed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from recsys.config import require_choice, require_range
from recsys.execution import check_use_ray
from recsys.semantic_ids.base import SemanticIdTokenizer
from recsys.semantic_ids.hkmeans import HierarchicalKMeans, HKMeansConfig
from recsys.semantic_ids.index import SemanticIdIndex
from recsys.semantic_ids.rqvae import RQVAEConfig, RQVAETokenizer

METHODS = ("rqvae", "hkmeans")


@dataclass
class IdsConfig:
    method: str = "rqvae"  # rqvae (TIGER) | hkmeans (EAGER)
    rqvae: RQVAEConfig = field(default_factory=RQVAEConfig)
    hkmeans: HKMeansConfig = field(default_factory=HKMeansConfig)
    # auto: Ray on a cluster (or for hkmeans_top=blocks), in this process on one node, where Ray
    # only adds overhead (recsys.execution); true / false force a path.
    use_ray: bool | str = "auto"
    num_workers: int = 1  # Ray Train workers for the RQ-VAE (DDP)
    cpus_per_task: float = 1.0  # per Ray Train worker / per hierarchical k-means subtree task
    checkpoint_every: int = 20  # RQ-VAE epochs between Ray Train checkpoints
    max_failures: int = 1  # RQ-VAE: Ray Train restarts from the latest checkpoint this many times; -1 = forever
    hkmeans_top: str = "driver"  # driver: faiss on all rows at once | blocks: Lloyd over Ray Data blocks
    top_sample: int = 200_000  # blocks: rows faiss sees to initialise the top level
    top_refine_iters: int = 5  # blocks: Lloyd steps over all blocks after that initialisation

    def __post_init__(self):
        require_choice("ids.method", self.method, METHODS)
        check_use_ray("ids.use_ray", self.use_ray)
        require_range("ids.num_workers", self.num_workers, 1, 4096)
        require_range("ids.cpus_per_task", self.cpus_per_task, 0.01, 1024)
        require_range("ids.checkpoint_every", self.checkpoint_every, 1)
        require_range("ids.max_failures", self.max_failures, -1)
        require_choice("ids.hkmeans_top", self.hkmeans_top, ("driver", "blocks"))
        require_range("ids.top_sample", self.top_sample, 2)
        require_range("ids.top_refine_iters", self.top_refine_iters, 0, 1000)


    @property
    def ray_only(self) -> str:
        """Why this configuration has no in-process path ("" when it has one)."""
        if self.method == "hkmeans" and self.hkmeans_top == "blocks":
            return "ids.hkmeans_top=blocks reads the table block by block with Ray Data"
        return ""


def make_tokenizer(cfg: IdsConfig) -> SemanticIdTokenizer:
    if cfg.method == "rqvae":
        return RQVAETokenizer(config=cfg.rqvae)
    return HierarchicalKMeans(config=cfg.hkmeans)


def fitted_codes(tokenizer: SemanticIdTokenizer, embeddings: np.ndarray) -> torch.Tensor:
    """Codes (N, L) of the items the tokenizer was fitted on.

    Hierarchical k-means keeps the clustering's own assignment (with the balanced option an
    item may sit in a cluster other than its nearest); RQ-VAE encodes.
    """
    if isinstance(tokenizer, HierarchicalKMeans):
        return tokenizer.fit_codes
    return tokenizer.encode(embeddings)


def build_index(item_ids: np.ndarray, tokenizer: SemanticIdTokenizer, embeddings: np.ndarray) -> SemanticIdIndex:
    """item_ids (N,) aligned with embeddings (N, D) -> index with the collision level added."""
    codes = fitted_codes(tokenizer, embeddings)
    return SemanticIdIndex(item_ids=item_ids, codes=codes, codebook_sizes=tokenizer.codebook_sizes)


def fit_in_process(cfg: IdsConfig, embeddings: np.ndarray,
                   map_fn: Callable = map) -> SemanticIdTokenizer:
    tokenizer = make_tokenizer(cfg)
    if isinstance(tokenizer, HierarchicalKMeans):
        return tokenizer.fit(embeddings, map_fn=map_fn)
    return tokenizer.fit(embeddings)
