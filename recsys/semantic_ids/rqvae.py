"""RQ-VAE semantic IDs, after TIGER (Rajput et al., 2023), arXiv:2305.05065.

An MLP encoder maps an item embedding to a latent; L residual quantisation levels each pick
the nearest code vector of the residual left by the levels above; an MLP decoder reconstructs
the embedding from the sum of the chosen code vectors.
Departures from the paper:
- AdamW (lr 1e-3) instead of Adagrad (lr 0.4), and mean (not summed) squared errors, so the
  loss scale does not depend on D or on the batch size.
- Codebooks are initialised by faiss k-means on a large sample (``kmeans_init_samples``) of
  encoder outputs and their residuals level by level, not on the first batch.
- Codes unused during an epoch are re-seeded to random residuals seen in that epoch
  (``dead_code_threshold``), which keeps codebook utilisation high.
Training is split so Ray Train can drive it: ``rqvae_epoch`` runs one epoch over any iterable of
(B, D) float tensors (a Ray Data shard included); ``train_rqvae`` loops it over shuffled
minibatches in-process.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys.config import require, require_range
from recsys.semantic_ids.base import (
    SemanticIdTokenizer, make_config, register_tokenizer, validate_codes, validate_embeddings,
)
from recsys.semantic_ids.kmeans import faiss_kmeans


@dataclass
class RQVAEConfig:
    input_dim: int = 0  # D; 0 = take it from the data at fit
    hidden_dims: list[int] = field(default_factory=lambda: [512, 256, 128])
    latent_dim: int = 32
    n_levels: int = 3
    codebook_size: int = 256
    beta: float = 0.25  # commitment weight
    lr: float = 1e-3  # AdamW
    weight_decay: float = 0.0  # decay would shrink the codebooks towards 0
    epochs: int = 200
    batch_size: int = 1024
    kmeans_init_samples: int = 20000  # encoder outputs clustered to initialise the codebooks
    kmeans_niter: int = 25
    dead_code_threshold: int = 1  # codes used fewer times than this in an epoch are re-seeded; 0 = off
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        require_range("rqvae.input_dim", self.input_dim, 0, None)
        require(all(isinstance(h, int) and h >= 1 for h in self.hidden_dims),
                f"rqvae.hidden_dims={self.hidden_dims!r} must be a list of positive integers")
        require_range("rqvae.latent_dim", self.latent_dim, 1, 65536)
        require_range("rqvae.n_levels", self.n_levels, 1, 32)
        require_range("rqvae.codebook_size", self.codebook_size, 2, 1 << 20)
        require_range("rqvae.beta", self.beta, 0.0, None)
        require_range("rqvae.lr", self.lr, 0.0, 10.0)
        require(self.lr > 0, f"rqvae.lr={self.lr} must be > 0")
        require_range("rqvae.weight_decay", self.weight_decay, 0.0, 1.0)
        require_range("rqvae.epochs", self.epochs, 0, None)
        require_range("rqvae.batch_size", self.batch_size, 1, None)
        require_range("rqvae.kmeans_init_samples", self.kmeans_init_samples, 1, None)
        require_range("rqvae.kmeans_niter", self.kmeans_niter, 1, 10000)
        require_range("rqvae.dead_code_threshold", self.dead_code_threshold, 0, None)
        require_range("rqvae.seed", self.seed, 0, 2**31 - 1)


class RqVaeOutput(NamedTuple):
    reconstruction: torch.Tensor  # (B, D)
    latent: torch.Tensor  # (B, d) encoder output
    quantized: torch.Tensor  # (B, d) sum of the chosen code vectors (straight-through to latent)
    residuals: torch.Tensor  # (B, L, d) the residual each level quantised
    codes: torch.Tensor  # (B, L) int64
    quantize_loss: torch.Tensor  # () sum over levels of codebook + beta * commitment
    reconstruction_loss: torch.Tensor  # () MSE
    loss: torch.Tensor  # () reconstruction_loss + quantize_loss


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


def nearest_codes(residual: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """residual (B, d), codebook (K, d) -> (B,) index of the nearest code (squared L2)."""
    dist = residual.pow(2).sum(1, keepdim=True) - 2 * residual @ codebook.T + codebook.pow(2).sum(1)  # (B, K)
    return dist.argmin(dim=1)


class RQVAE(nn.Module):
    """The network: encoder, L codebooks (L, K, d), decoder. ``config.input_dim`` must be set."""

    def __init__(self, config: RQVAEConfig):
        super().__init__()
        require(config.input_dim > 0, "RQVAE needs config.input_dim > 0 (RQVAETokenizer.fit sets it from the data)")
        self.config = config
        dims = [config.input_dim, *config.hidden_dims, config.latent_dim]
        self.encoder = _mlp(dims)
        self.decoder = _mlp(dims[::-1])
        self.codebooks = nn.Parameter(torch.randn(config.n_levels, config.codebook_size, config.latent_dim) * 0.1)

    def quantize(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """latent (B, d) -> (codes (B, L), chosen code vectors (B, L, d), residuals (B, L, d))."""
        residual = latent
        codes, chosen, residuals = [], [], []
        for level in range(self.config.n_levels):
            idx = nearest_codes(residual.detach(), self.codebooks[level])  # (B,)
            e = self.codebooks[level][idx]  # (B, d)
            codes.append(idx)
            chosen.append(e)
            residuals.append(residual)
            residual = residual - e.detach()  # each codebook learns only from its own level's loss
        return torch.stack(codes, 1), torch.stack(chosen, 1), torch.stack(residuals, 1)

    def forward(self, x: torch.Tensor) -> RqVaeOutput:
        latent = self.encoder(x)  # (B, d)
        codes, chosen, residuals = self.quantize(latent)  # (B, L), (B, L, d), (B, L, d)
        codebook_loss = (residuals.detach() - chosen).pow(2).mean(dim=(0, 2)).sum()
        commitment = (residuals - chosen.detach()).pow(2).mean(dim=(0, 2)).sum()
        quantize_loss = codebook_loss + self.config.beta * commitment
        summed = chosen.sum(1)  # (B, d)
        quantized = latent + (summed - latent).detach()  # straight-through estimator
        reconstruction = self.decoder(quantized)  # (B, D)
        reconstruction_loss = F.mse_loss(reconstruction, x)
        return RqVaeOutput(reconstruction, latent, quantized, residuals, codes, quantize_loss,
                           reconstruction_loss, reconstruction_loss + quantize_loss)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, L) -> (B, D): the decoder applied to the sum of the code vectors."""
        levels = torch.arange(self.config.n_levels, device=codes.device)
        return self.decoder(self.codebooks[levels, codes].sum(1))  # (B, L, d) -> (B, d) -> (B, D)


# --- training --------------------------------------------------------------------------------
class EpochStats(NamedTuple):
    loss: float  # item-weighted means over the epoch
    reconstruction_loss: float
    quantize_loss: float
    n_items: int
    code_counts: torch.Tensor  # (L, K) int64 code usage during the epoch (before any reseed)
    reseeded: torch.Tensor  # (L,) int64 codes re-seeded at the end of the epoch
    residual_sample: torch.Tensor  # (P, L, d) recent residuals, the candidates for reseeding


def _core(model: nn.Module) -> RQVAE:
    return getattr(model, "module", model)  # unwrap DDP


@torch.no_grad()
def reseed_dead_codes(model: nn.Module, counts: torch.Tensor, residuals: torch.Tensor, threshold: int,
                      generator: torch.Generator | None = None,
                      optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
    """Move codes with counts (L, K) < threshold onto random rows of residuals (P, L, d).

    Their optimizer moments are zeroed so stale momentum does not drag them away. -> (L,) count.
    """
    core = _core(model)
    reseeded = torch.zeros(core.config.n_levels, dtype=torch.int64)
    if threshold <= 0 or len(residuals) == 0:
        return reseeded
    state = optimizer.state.get(core.codebooks, {}) if optimizer is not None else {}
    for level in range(core.config.n_levels):
        dead = torch.nonzero(counts[level] < threshold).flatten()
        if len(dead) == 0:
            continue
        pick = torch.randint(len(residuals), (len(dead),), generator=generator)
        core.codebooks[level, dead.to(core.codebooks.device)] = residuals[pick, level].to(core.codebooks.device)
        for moment in ("exp_avg", "exp_avg_sq"):
            if moment in state:
                state[moment][level, dead] = 0
        reseeded[level] = len(dead)
    return reseeded


def rqvae_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[torch.Tensor], *,
                dead_code_threshold: int = 1, generator: torch.Generator | None = None,
                residual_pool: int = 8192) -> EpochStats:
    """One pass over ``batches`` (any iterable of (B, D) float tensors), then dead-code reseeding.

    ``model`` may be DDP-wrapped. Under DDP pass ``dead_code_threshold=0`` and then call
    ``reseed_dead_codes_synced`` on every rank, which keeps the ranks' codebooks identical.
    """
    core = _core(model)
    device = core.codebooks.device
    model.train()
    counts = torch.zeros(core.config.n_levels, core.config.codebook_size, dtype=torch.int64)
    totals = torch.zeros(3, dtype=torch.float64)
    n_items = 0
    pool: list[torch.Tensor] = []  # recent residuals, the candidates for reseeding
    for x in batches:
        x = torch.as_tensor(x).to(device=device, dtype=torch.float32)
        out = model(x)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        for level in range(core.config.n_levels):
            counts[level] += torch.bincount(out.codes[:, level].cpu(), minlength=core.config.codebook_size)
        totals += torch.tensor([out.loss.item(), out.reconstruction_loss.item(), out.quantize_loss.item()],
                               dtype=torch.float64) * len(x)
        n_items += len(x)
        pool.append(out.residuals.detach().cpu())
        while sum(len(p) for p in pool) - len(pool[0]) >= residual_pool:
            pool.pop(0)
    residuals = torch.cat(pool) if pool else torch.empty(0, core.config.n_levels, core.config.latent_dim)
    reseeded = reseed_dead_codes(model, counts, residuals, dead_code_threshold, generator, optimizer)
    mean = (totals / max(n_items, 1)).tolist()
    return EpochStats(mean[0], mean[1], mean[2], n_items, counts, reseeded, residuals)


def reseed_dead_codes_synced(model: nn.Module, optimizer: torch.optim.Optimizer, stats: EpochStats,
                             threshold: int, generator: torch.Generator) -> torch.Tensor:
    """Dead-code reseeding under torch.distributed (DDP): counts are summed over ranks and
    rank 0's residuals are broadcast, so with equally seeded generators every rank applies the
    same update. Without an initialised process group it is plain ``reseed_dead_codes``."""
    import torch.distributed as dist

    counts, residuals = stats.code_counts.clone(), stats.residual_sample
    if dist.is_available() and dist.is_initialized():
        device = _core(model).codebooks.device  # NCCL needs CUDA tensors, gloo takes CPU ones
        counts = counts.to(device)
        dist.all_reduce(counts)
        shape = torch.tensor(list(residuals.shape), device=device)  # ranks' pools may differ in size
        dist.broadcast(shape, src=0)
        received = torch.empty(*shape.tolist(), device=device)
        if dist.get_rank() == 0:
            received.copy_(residuals.to(device))
        dist.broadcast(received, src=0)
        counts, residuals = counts.cpu(), received.cpu()
    return reseed_dead_codes(model, counts, residuals, threshold, generator, optimizer)


def shuffled_batches(embeddings: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """(N, D) -> shuffled (B, D) minibatches; the last one may be smaller."""
    order = torch.randperm(len(embeddings), generator=generator)
    for start in range(0, len(order), batch_size):
        yield embeddings[order[start:start + batch_size]]


def training_generators(seed: int, epoch: int = 0, rank: int = 0) -> tuple[torch.Generator, torch.Generator]:
    """(shuffle, reseed) generators for training from ``epoch`` on. Two streams, so the dead-code
    reseeding draws depend on (seed, epoch) only and every DDP rank applies the same update however
    many rows its shard holds; rank 0 at epoch 0 shuffles exactly as the in-process loop does, so a
    one-worker Ray Train run gives the same codes as ``train_rqvae``."""
    def make(*key: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *key]).generate_state(1)[0]))

    return make(0, epoch, rank), make(1, epoch)


def build_optimizer(model: nn.Module, cfg: RQVAEConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


EpochHook = Callable[[int, EpochStats], Any]  # (epoch, stats); returning False stops training


def train_rqvae(model: nn.Module, embeddings: np.ndarray, cfg: RQVAEConfig,
                on_epoch_end: EpochHook | None = None) -> list[EpochStats]:
    """Train in-process for cfg.epochs over shuffled minibatches of embeddings (N, D)."""
    x = torch.from_numpy(validate_embeddings(embeddings, dim=cfg.input_dim or None))
    optimizer = build_optimizer(model, cfg)
    shuffle, reseed = training_generators(cfg.seed)
    history = []
    for epoch in range(cfg.epochs):
        stats = rqvae_epoch(model, optimizer, shuffled_batches(x, cfg.batch_size, shuffle),
                            dead_code_threshold=cfg.dead_code_threshold, generator=reseed)
        history.append(stats)
        if on_epoch_end is not None and on_epoch_end(epoch, stats) is False:
            break
    return history


@torch.no_grad()
def init_codebooks(model: nn.Module, embeddings: np.ndarray, cfg: RQVAEConfig) -> None:
    """Set every level's codebook to faiss k-means centroids of a sample of residuals.

    Level l clusters what levels < l leave of the encoder outputs of up to
    ``kmeans_init_samples`` rows. With fewer rows than codes, the extra codes start on
    jittered copies of sampled residuals and dead-code reseeding sorts them out.
    """
    core = _core(model)
    rng = np.random.default_rng(cfg.seed)
    n = min(len(embeddings), cfg.kmeans_init_samples)
    sample = embeddings[np.sort(rng.choice(len(embeddings), n, replace=False))]
    device = core.codebooks.device
    residual = core.encoder(torch.from_numpy(np.ascontiguousarray(sample)).to(device)).cpu().numpy()  # (n, d)
    K = cfg.codebook_size
    for level in range(cfg.n_levels):
        k = min(K, n)
        centroids, labels = faiss_kmeans(residual, k, niter=cfg.kmeans_niter, seed=cfg.seed + level)
        if k < K:
            extra = residual[rng.integers(0, n, K - k)]
            centroids = np.concatenate([centroids, extra + 1e-3 * rng.standard_normal(extra.shape, dtype=np.float32)])
        core.codebooks[level] = torch.from_numpy(centroids).to(device)
        residual = residual - centroids[labels]



@register_tokenizer("rqvae")
class RQVAETokenizer(SemanticIdTokenizer):
    """``RQVAETokenizer(latent_dim=32, n_levels=3, codebook_size=256)`` or ``(config=RQVAEConfig(...))``."""

    def __init__(self, *, config: RQVAEConfig | None = None, **overrides: Any):
        self.config = make_config(RQVAEConfig, config, overrides)
        self.model: RQVAE | None = None
        self.history: list[EpochStats] = []

    def build_model(self, input_dim: int) -> RQVAE:
        """Fix input_dim in the config and create the (seeded) network."""
        require(self.config.input_dim in (0, input_dim),
                f"rqvae.input_dim={self.config.input_dim} does not match the embeddings' dimension {input_dim}")
        self.config = dataclasses.replace(self.config, input_dim=input_dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.model = RQVAE(self.config).to(self.config.device)
        return self.model

    def fit(self, embeddings: np.ndarray, on_epoch_end: EpochHook | None = None) -> "RQVAETokenizer":
        """k-means codebook init, then ``train_rqvae``; embeddings (N >= 2, D)."""
        x = validate_embeddings(embeddings, min_items=2)
        self.initialise(x)
        self.history = train_rqvae(self.model, x, self.config, on_epoch_end)
        return self

    def initialise(self, embeddings: np.ndarray) -> RQVAE:
        """The seeded network with k-means codebooks, before training; embeddings (N, D). Ray
        Train starts its workers from this state, so both paths train the same network."""
        self.build_model(embeddings.shape[1])
        init_codebooks(self.model, embeddings, self.config)
        return self.model

    @property
    def n_levels(self) -> int:
        return self.config.n_levels

    @property
    def codebook_sizes(self) -> list[int]:
        return [self.config.codebook_size] * self.config.n_levels

    @property
    def input_dim(self) -> int:
        return 0 if self.model is None else self.config.input_dim

    @torch.no_grad()
    def encode(self, embeddings: np.ndarray, batch_size: int = 8192) -> torch.Tensor:
        """(N, D) -> (N, L) int64: the nearest code per level of the encoder output's residuals."""
        self._require_fitted()
        x = torch.from_numpy(validate_embeddings(embeddings, dim=self.input_dim))
        self.model.eval()
        device = self.model.codebooks.device
        out = [self.model.quantize(self.model.encoder(x[i:i + batch_size].to(device)))[0].cpu()
               for i in range(0, len(x), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.n_levels, dtype=torch.int64)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
        """(N, L) -> (N, D): the decoder applied to the sum of the code vectors."""
        self._require_fitted()
        c = torch.from_numpy(validate_codes(codes, self.codebook_sizes))
        self.model.eval()
        device = self.model.codebooks.device
        out = [self.model.decode_codes(c[i:i + batch_size].to(device)).cpu() for i in range(0, len(c), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.input_dim)

    def reconstruction_error(self, embeddings: np.ndarray) -> float:
        """Mean squared error of decode(encode(x)) against x (N, D)."""
        x = torch.from_numpy(validate_embeddings(embeddings, dim=self.input_dim))
        return float((self.decode(self.encode(x)) - x).pow(2).mean())

    def _state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        meta = {"config": dataclasses.asdict(self.config)}
        return meta, dict(self.model.state_dict())

    @classmethod
    def _from_state(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> "RQVAETokenizer":
        tokenizer = cls(config=RQVAEConfig(**meta["config"]))
        tokenizer.model = RQVAE(tokenizer.config)
        tokenizer.model.load_state_dict(tensors)
        tokenizer.model.to(tokenizer.config.device).eval()
        return tokenizer
