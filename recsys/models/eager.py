"""EAGER: Two-Stream Generative Recommender with Behavior-Semantic Collaboration (Wang et al.,
KDD 2024), arXiv:2406.14017; official code github.com/yewzz/EAGER.

A shared encoder reads the history; two decoders, one per ID space (``behavior``: codes from
item vectors of a behaviour model, ``semantic``: codes from content vectors), each generate the
next item's ID in their space, constrained by their own prefix trie. Each decoder's input ends
in a summary token that reads the whole target ID (causally, so decoding never sees it).
- **GCT**: the summary state, projected and L2-normalised, is pulled towards that stream's
  vector of the target item (``IdTable.vectors``: the vectors the space's IDs were built from).
  ``gct: infonce`` (the official code): InfoNCE against ``gct_negatives`` random items (2,048),
  tau = 0.3, per-stream weights 1 (behaviour) and 10 (semantic). ``gct: smooth_l1`` (the paper):
  a smooth-L1 distance, summed over dimensions (on unit vectors an element-wise mean is ~1/D of
  it and barely trains). ``off``: none. A negative equal to the positive is masked (the official
  sampler does not).
- **STT**: a one-block transformer reads the target's behaviour codes (the behaviour decoder's
  token embeddings after a start vector) with cross-attention to the semantic summary (detached,
  as officially): *reconstruction* predicts masked codes (each with probability
  ``stt_mask_ratio``, at least one per row) against the level's detached token table;
  *recognition* tells each true code sequence from a copy whose codes are each replaced with the
  same probability (at least one), so half the examples are corrupted, by a linear judge on the
  start position. The official code masks or replaces one of its two codes (50 %).
- Loss: gen_behavior + gen_semantic + lambda_gct (w_b gct_behavior + w_s gct_semantic)
  + lambda_stt (stt_reconstruction + stt_recognition); every part is logged.
- **Inference**: constrained beam search in each stream, then a fusion (default ``sum``: it led
  ``confidence`` on validation by +0.0074 ± 0.0024 Recall@10, paired, on Beauty). ``confidence`` (the
  paper): the top k of each stream, 2k predictions ranked by their mean code log-probability (a
  perplexity-like confidence: the streams' IDs may differ in length); an item both streams found
  keeps its higher confidence. ``sum`` (the released code): the union of both top-k lists re-scored
  by the sum of both streams' log-probabilities (a candidate's score in the stream whose beam found
  it is its beam score; the other stream scores it teacher-forced); ``fusion_weight`` w weighs the
  two log-probabilities 2w : 2(1 - w), chosen on validation over a trained model (0.5: the plain
  sum). ``behavior`` / ``semantic``: one stream alone (an ablation of inference; both still train).
  ``recommend_streams`` says which stream produced each item.
- ``streams: behavior`` or ``semantic`` builds and trains that stream's decoder alone (the
  training side of the ablation; STT off and the fusion that stream, both required). A
  behaviour-only model refuses to register items (they would have semantic codes only).

Departures from the paper and the official code:
- The encoder reads learned item-ID embeddings (``encoder_input: item_ids``, as the official
  code), once, and both decoders attend to that memory. The official code gives each stream its
  own item rows and runs the shared encoder once per stream. ``encoder_input: codes`` reads each
  item as the sum of its code tokens in both spaces (the decoders' token tables) instead.
- Decoders have a linear head per level over that level's codes (as our TIGER), where the
  official code ties outputs to input embeddings and numbers level-2 tokens per parent. With
  ``prefix_outputs`` each child of the decoded prefix also scores by its own trie node's embedding
  (a table per decoder, not tied to the inputs), the per-parent freedom of the official numbering;
  an item registered after training has no node of its own and scores by its codes alone.
- IDs carry our collision level (L codes + 1), so each stream decodes L + 1 tokens.
- Optional last-item path (``last_item_start``, ``last_item_output``; neither paper nor code has
  it): each decoder's start token adds a projection of the newest history item as the encoder
  reads it, and its output states a second projection (zero at init), as our TIGER's. It targets
  the transitions seen in training, which the ID models and the last-item counts reproduce and the
  encoder's memory alone does not (docs/experiments/eager.md).

Cold start: an item registered after training (``register_items``) has semantic codes only (no
behaviour yet: it gets behaviour codes from a later behaviour ids run and a model trained with it;
registration never changes an existing ID). The behaviour beam never returns it; the semantic beam can. Rules for the missing stream:
- ``confidence``: it is ranked by its semantic confidence, like any item only that stream found;
- ``sum``: its behaviour log-probability is taken as its semantic mean code log-probability times the
  behaviour stream's code count (as confident in the stream it lacks as in the one it has);
- in a history, the encoder reads it as the sum of its semantic code tokens (the semantic decoder's
  input table): it has no learned ID row (``encoder_input: codes`` reads every item that way, and an
  item without behaviour codes by its semantic ones alone).
- its semantic ID ends in a collision token that was never a target (hierarchical k-means gives
  warm items unique tuples, collision token 0; a new item shares its nearest tuple and takes the
  next free token), so under ``collision_scoring: learned`` its last token scores low and the
  beams rarely keep it; ``content`` scores every collision token 0, so it ranks beside the item
  whose tuple it shares (``benchmarks/eager_cold_start.py`` measures both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from recsys.config import require, require_choice, require_range
from recsys.generation.beam import BeamResult, beam_search
from recsys.models.base import Batch, Capabilities, GenerativeRetriever, LossOutput, Recommendation
from recsys.models.layers import (
    Block, DecoderParts, DecoderStart, Dropout, SelfKV, decoder_start, last_item_linears, next_state, reorder_cache,
    with_child_scores,
)
from recsys.models.vocabulary import ABSENT, IdTable, SemanticVocabulary

SPACES = ("behavior", "semantic")  # stream ids 0 and 1 in FusedRecommendation.streams; 2 = both
ENCODER_INPUTS = ("item_ids", "codes")
GCT_LOSSES = ("infonce", "smooth_l1", "off")
FUSIONS = ("confidence", "sum", "behavior", "semantic")
TRAINED_STREAMS = ("both", *SPACES)


@dataclass
class EagerConfig:
    d_model: int = 128  # the paper's hidden size (official script: 96)
    n_encoder_layers: int = 1
    n_decoder_layers: int = 4  # per stream (official script: 2)
    n_heads: int = 4
    d_ff: int = 1024
    dropout: float = 0.1
    encoder_input: str = "item_ids"  # item_ids (official) | codes
    beam_size: int = 20  # each stream searches with max(k, beam_size) beams
    collision_vocab: int = 16
    # as TIGER's: "learned" scores the collision token by its head; "content" scores it 0 in both
    # streams, so an item registered after training (whose collision token was never a target)
    # ranks beside the siblings it shares a content tuple with. An inference setting.
    collision_scoring: str = "learned"
    gct: str = "infonce"  # infonce (official) | smooth_l1 (paper) | off
    lambda_gct: float = 1.0  # lambda_1
    gct_weight_behavior: float = 1.0  # official per-stream weights
    gct_weight_semantic: float = 10.0
    gct_negatives: int = 2048  # infonce: random items per batch (all items when fewer)
    gct_temperature: float = 0.3
    stt: bool = True
    lambda_stt: float = 1.0  # lambda_2
    stt_mask_ratio: float = 0.5  # share of behaviour codes masked (reconstruction) and replaced (recognition)
    # sum (released code; the default: better on validation, docs/experiments/eager.md) | confidence
    # (paper) | behavior | semantic
    fusion: str = "sum"
    # ``sum`` only: the behaviour stream's weight w; a candidate scores 2 (w log p_behavior +
    # (1 - w) log p_semantic), so 0.5 is the released code's plain sum. An inference setting, chosen
    # on validation over a trained model (benchmarks/eager_fusion_weight.py).
    fusion_weight: float = 0.5
    # the decoders built and trained: both (EAGER), or one stream alone (the training-side ablation;
    # needs stt=false and fusion=that stream)
    streams: str = "both"
    # each decoder's start token adds a projection of the newest history item as the encoder reads
    # it (before positions and dropout): a first-order path from the last item to the next ID
    last_item_start: bool = False
    # each decoder's output states add a second projection of it (zero at init): a bilinear last
    # item x next code term in every level's logits, past the decoder
    last_item_output: bool = False
    # each decoder scores every child of the decoded prefix by an embedding of that child's trie node
    # too (TIGER's prefix outputs, with a node table of the decoder's own): a level's code no longer
    # shares one output vector across all parents, and the last level scores each item by its own
    # vector. The official code numbers level-2 tokens per parent, which gives the same freedom.
    prefix_outputs: bool = False

    def __post_init__(self):
        require_range("model.d_model", self.d_model, 1, 4096)
        require_range("model.n_encoder_layers", self.n_encoder_layers, 1, 48)
        require_range("model.n_decoder_layers", self.n_decoder_layers, 1, 48)
        require_range("model.n_heads", self.n_heads, 1, self.d_model)
        require(self.d_model % self.n_heads == 0,
                f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
        require_range("model.d_ff", self.d_ff, 1, 65536)
        require_range("model.dropout", self.dropout, 0.0, 0.95)
        require_choice("model.encoder_input", self.encoder_input, ENCODER_INPUTS)
        require_range("model.beam_size", self.beam_size, 1, 100000)
        require_range("model.collision_vocab", self.collision_vocab, 1, 1 << 20)
        require_choice("model.collision_scoring", self.collision_scoring, ("learned", "content"))
        require_choice("model.gct", self.gct, GCT_LOSSES)
        for key in ("lambda_gct", "gct_weight_behavior", "gct_weight_semantic", "lambda_stt"):
            require_range(f"model.{key}", getattr(self, key), 0.0, 1000.0)
        require_range("model.gct_negatives", self.gct_negatives, 1, 1 << 20)
        require(self.gct_temperature > 0, f"model.gct_temperature={self.gct_temperature} is out of range; allowed: > 0")
        require(isinstance(self.stt, bool), f"model.stt must be true or false, got {self.stt!r}")
        require(0.0 < self.stt_mask_ratio <= 1.0,
                f"model.stt_mask_ratio={self.stt_mask_ratio} is out of range; allowed: 0 < ratio <= 1")
        require_choice("model.fusion", self.fusion, FUSIONS)
        require_range("model.fusion_weight", self.fusion_weight, 0.0, 1.0)
        require(self.fusion == "sum" or self.fusion_weight == 0.5,
                f"model.fusion_weight={self.fusion_weight} weighs the streams of the sum fusion, and model.fusion="
                f"{self.fusion} does not sum them: set model.fusion=sum, or leave model.fusion_weight at 0.5")
        for flag in ("last_item_start", "last_item_output", "prefix_outputs"):
            value = getattr(self, flag)
            require(isinstance(value, bool), f"model.{flag} must be true or false, got {value!r}")
        require_choice("model.streams", self.streams, TRAINED_STREAMS)
        if self.streams != "both":
            require(not self.stt, f"model.streams={self.streams} trains one stream, and STT needs both (it reads the "
                                  "behaviour codes with cross-attention to the semantic summary): set model.stt=false")
            require(self.fusion == self.streams, f"model.streams={self.streams} trains one stream, which model.fusion="
                                                 f"{self.fusion} cannot fuse: set model.fusion={self.streams}")

    @property
    def trained_streams(self) -> tuple[str, ...]:
        return SPACES if self.streams == "both" else (self.streams,)


class FusedRecommendation(NamedTuple):
    items: torch.Tensor  # (B, k) item ids, best first
    scores: torch.Tensor  # (B, k) fused scores, descending
    streams: torch.Tensor  # (B, k) 0: behaviour stream, 1: semantic, 2: both found it


class StreamCandidates(NamedTuple):
    """Both streams' top k for each row: items (B, 2k), behaviour's k then semantic's (-1: none);
    streams (B, 2k) which stream found each (0, 1); found_by: each stream's beam scores of its own
    k (B, k); log_probs: each stream's log-probability of all 2k (B, 2k), None when not scored."""

    items: torch.Tensor
    streams: torch.Tensor
    found_by: dict[str, torch.Tensor]
    log_probs: dict[str, torch.Tensor] | None

    def summed(self, weight: float) -> torch.Tensor:
        """The ``sum`` fusion's scores (B, 2k) at behaviour weight ``weight``: 2 (w log p_b + (1 - w)
        log p_s), the released code's plain sum at 0.5."""
        if self.log_probs is None:
            raise ValueError("these candidates were not scored in both streams: get them with score_both=True")
        return 2 * (weight * self.log_probs["behavior"] + (1 - weight) * self.log_probs["semantic"])


class StreamDecoder(nn.Module):
    """One stream's decoder over its vocabulary (passed to each call, held by the model): token
    embeddings, BOS, the summary token, causal blocks with cross-attention, a head per level, the
    GCT projection to the stream's vector size (``vector_dim``; 0: none), and the last-item path's
    projections (``last_item_start``/``last_item_output``; None when off)."""

    def __init__(self, vocab: SemanticVocabulary, config: EagerConfig, vector_dim: int):
        super().__init__()
        D = config.d_model
        self.token_emb = nn.Embedding(vocab.n_token_rows, D)
        self.pos = nn.Embedding(vocab.n_tokens + 2, D)  # BOS, L + 1 codes, summary
        self.bos, self.summary = nn.Parameter(torch.zeros(D)), nn.Parameter(torch.zeros(D))
        self.blocks = nn.ModuleList(Block(D, config.n_heads, config.d_ff, config.dropout, cross=True)
                                    for _ in range(config.n_decoder_layers))
        self.ln, self.drop = nn.LayerNorm(D), Dropout(config.dropout)
        self.heads = nn.ModuleList(nn.Linear(D, v) for v in vocab.level_sizes)
        # prefix_outputs: node 0 (no node: a prefix first seen after training) is the zero padding row
        self.out_nodes = nn.Embedding(vocab.n_nodes, D, padding_idx=0) if config.prefix_outputs else None
        self.project = nn.Linear(D, vector_dim) if vector_dim else None
        self.last_start, self.last_output = last_item_linears(D, config.last_item_start, config.last_item_output)
        for p in (self.token_emb.weight, self.pos.weight, self.bos, self.summary):
            nn.init.normal_(p, std=0.02)
        if self.out_nodes is not None:
            nn.init.normal_(self.out_nodes.weight, std=0.02)
            self.out_nodes.weight.data[0] = 0

    def memory_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [block.cross.keys_values(memory) for block in self.blocks]

    def start(self, item: torch.Tensor, present: torch.Tensor) -> DecoderStart:
        """item (B, D) the newest history item's encoder input, present (B, 1) -> this stream's start."""
        return decoder_start(self.bos, item, present, self.last_start, self.last_output)

    def forward(self, vocab: SemanticVocabulary, prefix: torch.Tensor, memory_kv: list, memory_mask: torch.Tensor,
                start: DecoderStart, summary: bool = False) -> torch.Tensor:
        """prefix (R, t) codes of levels < t, R = B * G batch-major, ``start`` of the B rows -> states
        (R, t + 1 [+ 1], D); position j has read the start token and prefix[:, :j] and predicts level
        j; with ``summary`` the last position is the summary token, which reads them all (the
        last-item output vector is added to the code positions only)."""
        R, t = prefix.shape
        G = R // len(start.token)
        parts = [start.token.repeat_interleave(G, dim=0)[:, None], self.token_emb(vocab.tokens(prefix))]
        if summary:
            parts.append(self.summary.expand(R, 1, -1))
        x = torch.cat([part.to(parts[1].dtype) for part in parts], 1)
        x = self.drop(x + self.pos.weight[: x.shape[1]])  # (R, t + 1 [+ 1], D)
        for block, kv in zip(self.blocks, memory_kv):
            x = block(x, causal=True, memory_kv=kv, memory_mask=memory_mask)
        x = self.ln(x)
        if start.output is None:
            return x
        codes = x[:, :t + 1] + start.output.repeat_interleave(G, dim=0)[:, None].to(x.dtype)
        return torch.cat([codes, x[:, t + 1:]], 1)

    def step(self, vocab: SemanticVocabulary, prefix: torch.Tensor, cache: list[SelfKV] | None, memory_kv: list,
             memory_mask: torch.Tensor, start: DecoderStart) -> tuple[torch.Tensor, list[SelfKV]]:
        """Incremental decoding (``next_state``): the state that predicts level prefix.shape[1], (R, D),
        and the cache with its position. Equals ``forward(...)[:, -1]``."""
        parts = DecoderParts(self.token_emb, self.pos.weight, self.drop, self.blocks, self.ln)
        return next_state(parts, vocab.tokens(prefix), cache, memory_kv, memory_mask, start)

    def logits(self, vocab: SemanticVocabulary, h: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """h (R, D) states for level t = prefix.shape[1], prefix (R, t) -> logits (R, V_t): the level's
        code head, plus with ``prefix_outputs`` h . e(child node) for every child of the prefix."""
        out = self.heads[prefix.shape[1]](h)
        if self.out_nodes is None:
            return out
        return with_child_scores(out, h, vocab.child_nodes(prefix), self.out_nodes)

    def code_log_probs(self, vocab: SemanticVocabulary, states: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """states (R, >= L + 1, D) from a prefix of the full ``codes`` (R, L + 1) -> log p of each
        code given the ones before it, (R, L + 1)."""
        return torch.cat([F.log_softmax(self.logits(vocab, states[:, l], codes[:, :l]).float(), -1)
                          .gather(1, codes[:, l:l + 1]) for l in range(len(self.heads))], 1)


class SemanticGuidedTransfer(nn.Module):
    """STT: one block over [start, behaviour code embeddings] with cross-attention to a guide."""

    def __init__(self, config: EagerConfig, n_tokens: int):
        super().__init__()
        D = config.d_model
        self.start, self.mask = nn.Parameter(torch.zeros(D)), nn.Parameter(torch.zeros(D))
        self.pos = nn.Embedding(n_tokens + 1, D)
        self.guide = nn.Linear(D, D)
        self.block = Block(D, config.n_heads, config.d_ff, config.dropout, cross=True)
        self.ln = nn.LayerNorm(D)
        self.judge = nn.Linear(D, 1)
        for p in (self.start, self.mask, self.pos.weight):
            nn.init.normal_(p, std=0.02)

    def states(self, codes_emb: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        """codes_emb (B, L + 1, D), guide (B, D) -> (B, L + 2, D); position 0 is the start."""
        x = torch.cat([self.start.expand(len(codes_emb), 1, -1), codes_emb], 1) + self.pos.weight
        kv = self.block.cross.keys_values(self.guide(guide)[:, None])  # a memory of one token
        return self.ln(self.block(x, memory_kv=kv))

    def forward(self, vocab: SemanticVocabulary, token_emb: nn.Embedding, codes: torch.Tensor,
                guide: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        """codes (B, L + 1) behaviour IDs, guide (B, D) -> (reconstruction, recognition) per row, (B,) each."""
        B, n = codes.shape
        emb = token_emb(vocab.tokens(codes))  # (B, L + 1, D)
        masked = torch.rand(B, n, device=codes.device) < mask_ratio
        masked[torch.arange(B), torch.randint(0, n, (B,), device=codes.device)] |= ~masked.any(1)
        corrupt = token_emb(vocab.tokens(corrupted(codes, vocab.level_sizes, mask_ratio)))
        inputs = torch.cat([torch.where(masked[..., None], self.mask.expand_as(emb), emb), emb, corrupt])
        h = self.states(inputs, guide.repeat(3, 1)).split(B)  # masked, true, corrupted: (B, L + 2, D) each
        table, offsets = token_emb.weight.detach(), vocab.level_offsets.tolist()
        recon = torch.zeros(B, device=codes.device)
        for l, size in enumerate(vocab.level_sizes):
            logits = h[0][:, l + 1] @ table[offsets[l]:offsets[l] + size].T  # (B, V_l)
            recon = recon + F.cross_entropy(logits.float(), codes[:, l], reduction="none") * masked[:, l]
        recon = recon / masked.sum(1)
        logits = self.judge(torch.cat([h[1][:, 0], h[2][:, 0]]))  # (2B, 1)
        labels = torch.cat([torch.ones(B, 1), torch.zeros(B, 1)]).to(logits.device)
        recog = F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none").reshape(2, B).mean(0)
        return recon, recog


def corrupted(codes: torch.Tensor, level_sizes: list[int], ratio: float) -> torch.Tensor:
    """codes (B, L + 1) -> a copy where each code of a level with more than one code is replaced,
    with probability ``ratio`` (at least one per row), by a different code of its level."""
    sizes = torch.tensor(level_sizes, device=codes.device)
    can = (sizes > 1).expand_as(codes)
    if not can.any():
        raise ValueError(f"STT recognition needs a level with more than one code; level sizes are {level_sizes}")
    replace = (torch.rand(codes.shape, device=codes.device) < ratio) & can
    # rows with nothing replaced replace one random eligible code
    pick = torch.multinomial(can.float(), 1).squeeze(1)  # (B,)
    replace[torch.arange(len(codes), device=codes.device), pick] |= ~replace.any(1)
    shift = (torch.rand(codes.shape, device=codes.device) * (sizes - 1)).long() + 1  # 1 .. V - 1
    return torch.where(replace, (codes + shift) % sizes, codes)


class Eager(GenerativeRetriever):
    """``ids``: {"behavior": IdTable, "semantic": IdTable}; with GCT on, each table carries the
    vectors its IDs were built from (``IdTable.vectors``). ``vector_dims`` gives their sizes when
    the vectors are absent (a model rebuilt from a checkpoint for inference); ``trained_items``,
    the items that have learned ID rows when some were registered after training (default all)."""

    capabilities = Capabilities(id_spaces=SPACES, id_vectors=True, registers_items=True, new_item_spaces=("semantic",),
                                inference_settings=("beam_size", "fusion", "fusion_weight", "collision_scoring"))

    def __init__(self, config: EagerConfig, n_items: int, max_len: int, *, ids: dict[str, IdTable] | None = None,
                 vector_dims: dict[str, int] | None = None, trained_items: int | None = None):
        self.require_ids(ids)
        vocabs = {space: SemanticVocabulary(ids[space], n_items, collision_vocab=config.collision_vocab, space=space,
                                            prefix_nodes=config.prefix_outputs, child_tables=config.prefix_outputs)
                  for space in SPACES}
        super().__init__(n_items, max_len, vocabs)
        self.config, D = config, config.d_model
        streams = config.trained_streams
        dims = {space: 0 if config.gct == "off" or space not in streams else
                vector_dim(ids[space], n_items, space, (vector_dims or {}).get(space)) for space in SPACES}
        for space in SPACES:
            vectors = None if config.gct == "off" or ids[space].vectors is None else \
                F.normalize(torch.as_tensor(ids[space].vectors).float(), dim=-1)
            self.register_buffer(f"vectors_{space}", vectors, persistent=False)  # training only; not saved
        self.vector_dims, self.trained_items = dims, n_items if trained_items is None else trained_items
        require(1 <= self.trained_items <= n_items, f"trained_items={trained_items} must be in 1..{n_items}")
        self.item_emb = nn.Embedding(self.trained_items + 1, D, padding_idx=0) \
            if config.encoder_input == "item_ids" else None
        self.enc_pos = nn.Embedding(max_len, D)
        self.encoder = nn.ModuleList(Block(D, config.n_heads, config.d_ff, config.dropout)
                                     for _ in range(config.n_encoder_layers))
        self.enc_ln, self.drop = nn.LayerNorm(D), Dropout(config.dropout)
        self.decoders = nn.ModuleDict({space: StreamDecoder(vocabs[space], config, dims[space]) for space in streams})
        self.stt = SemanticGuidedTransfer(config, vocabs["behavior"].n_tokens) if config.stt else None
        for emb in (self.item_emb, self.enc_pos):
            if emb is not None:
                nn.init.normal_(emb.weight, std=0.02)
        if self.item_emb is not None:
            self.item_emb.weight.data[0] = 0

    @property
    def gct_weights(self) -> dict[str, float]:
        return {"behavior": self.config.gct_weight_behavior, "semantic": self.config.gct_weight_semantic}

    def beam_width(self, k: int) -> int:
        return max(k, self.config.beam_size)

    def checkpoint_context(self) -> dict[str, Any]:
        return {**super().checkpoint_context(), "vector_dims": self.vector_dims, "trained_items": self.trained_items}

    @classmethod
    def context_from_checkpoint(cls, context: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, Any]:
        recorded = context["id_spaces"]
        ids = {}
        for space in SPACES:
            table = weights[f"vocabs.{space}.item_codes"]
            if list(table.shape) != list(recorded[space]["shape"]):
                raise ValueError(f"the {space} ID table has shape {list(table.shape)}, model.json says "
                                 f"{recorded[space]['shape']}")
            ids[space] = IdTable(table, recorded[space]["level_sizes"], weights.get(f"vocabs.{space}.item_nodes"))
        return {"ids": ids, "vector_dims": context["vector_dims"], "trained_items": context["trained_items"]}

    # --- encoder and decoders -----------------------------------------------------------
    def encode(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """history (B, T) -> memory (B, T, D) and its key mask (B, 1, 1, T)."""
        B, T = history.shape
        if T > self.max_len:
            raise ValueError(f"history length {T} exceeds max_len={self.max_len}")
        positions = torch.arange(self.max_len - T, self.max_len, device=history.device)  # right-aligned
        x = self.drop(self.item_inputs(history) + self.enc_pos(positions))
        valid = history > 0
        valid[:, -1] |= ~valid.any(1)  # an empty history still has one key (no NaN)
        mask = valid[:, None, None, :]
        for block in self.encoder:
            x = block(x, mask=mask)
        return self.enc_ln(x), mask

    def item_inputs(self, history: torch.Tensor) -> torch.Tensor:
        """history (B, T) -> (B, T, D): each item as the encoder reads it, before positions."""
        if self.item_emb is None:  # each item as the sum of its code tokens in both spaces
            return self.code_inputs(history, tuple(self.decoders))
        learned = history <= self.trained_items
        x = self.item_emb(history * learned)  # (B, T, D)
        if not learned.all():  # registered after training: no learned row, read by its semantic codes
            x = torch.where(learned[..., None], x, self.code_inputs(history, ("semantic",)))
        return x

    def starts(self, history: torch.Tensor) -> dict[str, DecoderStart]:
        """history (B, T) -> each stream's decoder start: BOS, plus with the last-item path a
        projection of the newest history item as the encoder reads it (0 for an empty history)."""
        if not (self.config.last_item_start or self.config.last_item_output):
            return {space: DecoderStart(decoder.bos.expand(len(history), -1), None)
                    for space, decoder in self.decoders.items()}
        last = history[:, -1:]  # left padding: the last column is the newest item
        item, present = self.item_inputs(last)[:, 0], last > 0
        return {space: decoder.start(item, present) for space, decoder in self.decoders.items()}

    def code_inputs(self, history: torch.Tensor, spaces: tuple[str, ...]) -> torch.Tensor:
        """history (B, T) -> (B, T, D): each item as the sum of its code tokens in ``spaces`` (the
        decoders' input tables); a space where the item has no ID adds nothing."""
        out = 0
        for space in spaces:
            vocab = self.vocabs[space]
            codes = vocab.item_codes[history]  # (B, T, L + 1)
            emb = self.decoders[space].token_emb(vocab.tokens(codes.clamp(min=0)))  # (B, T, L + 1, D)
            out = out + (emb * (codes != ABSENT)[..., None]).sum(2)
        return out

    def stream_states(self, space: str, history: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: history (B, T), full IDs (B, L + 1) in ``space`` -> decoder states
        (B, L + 3, D): positions 0..L predict the codes, the last is the summary."""
        memory, mask = self.encode(history)
        decoder = self.decoders[space]
        return decoder(self.vocabs[space], codes, decoder.memory_kv(memory), mask, self.starts(history)[space],
                       summary=True)

    # --- the contract --------------------------------------------------------------------
    def loss(self, batch: Batch) -> LossOutput:
        """Target ``targets[:, -1]`` (else ``target``); rows whose target is 0 are ignored."""
        target = batch.targets[:, -1] if batch.targets is not None else batch.target
        if target is None:
            raise ValueError("EAGER's loss needs batch.targets (training windows) or batch.target")
        keep = (target > 0).float()  # masked, not indexed: the same graph on every DDP rank
        count = keep.sum().clamp(min=1.0)
        memory, mask = self.encode(batch.history)
        starts = self.starts(batch.history)
        parts, summaries, total = {}, {}, 0.0
        for space, decoder in self.decoders.items():
            vocab = self.vocabs[space]
            codes = vocab.item_codes[target]  # (B, L + 1)
            states = decoder(vocab, codes, decoder.memory_kv(memory), mask, starts[space], summary=True)  # (B, L+3, D)
            gen = (-decoder.code_log_probs(vocab, states, codes).mean(1) * keep).sum() / count
            parts[f"gen_{space}"], total = gen, total + gen
            summaries[space] = states[:, -1]
            if self.config.gct != "off":
                gct = (self.gct_loss(space, states[:, -1], target) * keep).sum() / count
                parts[f"gct_{space}"], total = gct, total + self.config.lambda_gct * self.gct_weights[space] * gct
        if self.stt is not None:
            codes = self.vocabs["behavior"].item_codes[target]
            recon, recog = self.stt(self.vocabs["behavior"], self.decoders["behavior"].token_emb, codes,
                                    summaries["semantic"].detach(), self.config.stt_mask_ratio)
            recon, recog = (recon * keep).sum() / count, (recog * keep).sum() / count
            parts.update(stt=recon + recog, stt_reconstruction=recon, stt_recognition=recog)
            total = total + self.config.lambda_stt * (recon + recog)
        return LossOutput(total, {name: value.detach() for name, value in parts.items()})

    def gct_loss(self, space: str, summary: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """summary (B, D) states, target (B,) items -> the GCT loss of each row (B,)."""
        vectors = self.get_buffer(f"vectors_{space}")
        if vectors is None:
            raise ValueError(f"GCT (model.gct={self.config.gct}) needs the {space} stream's item vectors "
                             "(IdTable.vectors, loaded from its ids run when training); this model was built "
                             "without them, e.g. from a checkpoint: it can recommend but not train")
        z = F.normalize(self.decoders[space].project(summary).float(), dim=-1)  # (B, Dv)
        positive = vectors[target]  # (B, Dv), unit rows
        if self.config.gct == "smooth_l1":
            return F.smooth_l1_loss(z, positive, reduction="none").sum(-1)
        n = min(self.config.gct_negatives, self.n_items)
        negatives = torch.randperm(self.n_items, device=target.device)[:n] + 1  # (n,) shared by the batch
        logits = torch.cat([(z * positive).sum(-1, keepdim=True), z @ vectors[negatives].T], 1)  # (B, 1 + n)
        logits[:, 1:] = logits[:, 1:].masked_fill(negatives[None, :] == target[:, None], float("-inf"))
        return F.cross_entropy(logits / self.config.gct_temperature,
                               torch.zeros(len(target), dtype=torch.long, device=target.device), reduction="none")

    def search(self, space: str, memory: torch.Tensor, mask: torch.Tensor, start: DecoderStart, k: int,
               exclude: torch.Tensor | None) -> BeamResult:
        """Constrained beam search in one stream over an encoded batch; scores are sums of log-probs."""
        decoder, vocab = self.decoders[space], self.vocabs[space]
        kv = decoder.memory_kv(memory)
        last = vocab.n_tokens - 1
        cache: list[SelfKV] | None = None  # the decoder's keys and values of the positions so far

        def step(prefix: torch.Tensor, parents: torch.Tensor | None) -> torch.Tensor:  # (R, t) -> (R, V_t)
            nonlocal cache
            if prefix.shape[1] == last and self.config.collision_scoring == "content":
                return torch.zeros(len(prefix), vocab.level_sizes[last], device=prefix.device)
            if parents is not None:
                cache = reorder_cache(cache, parents)
            h, cache = decoder.step(vocab, prefix, cache, kv, mask, start)
            return F.log_softmax(decoder.logits(vocab, h, prefix).float(), -1)

        return beam_search(step, vocab.trie, len(memory), k, self.beam_width(k), exclude=exclude)

    def scored_codes(self, space: str) -> int:
        """How many of an ID's codes carry a score in ``space``: all L + 1, or L when
        ``collision_scoring`` is content (the collision token then scores 0)."""
        return self.vocabs[space].n_tokens - (self.config.collision_scoring == "content")

    def sequence_log_prob(self, space: str, memory: torch.Tensor, mask: torch.Tensor, start: DecoderStart,
                          items: torch.Tensor) -> torch.Tensor:
        """items (B, G) -> log p(the item's ID in ``space`` | history), (B, G); -inf where item < 1
        or the item has no ID in ``space``."""
        decoder, vocab = self.decoders[space], self.vocabs[space]
        found = (items >= 1) & vocab.has_id(items.clamp(min=0))
        codes = vocab.item_codes[items.clamp(min=0)].clamp(min=0).reshape(-1, vocab.n_tokens)  # (B * G, L + 1)
        states = decoder(vocab, codes[:, :-1], decoder.memory_kv(memory), mask, start)
        per_code = decoder.code_log_probs(vocab, states, codes)  # (B * G, L + 1)
        if self.config.collision_scoring == "content":
            per_code = per_code[:, :-1]
        out = per_code.sum(1).reshape(items.shape)
        return out.masked_fill(~found, float("-inf"))

    @torch.no_grad()
    def recommend_streams(self, batch: Batch, k: int, exclude_history: bool = False) -> FusedRecommendation:
        """The fused top k with the stream that produced each item (``model.fusion``)."""
        self.check_k(k)
        if self.config.fusion in SPACES:
            memory, mask = self.encode(batch.history)
            space = self.config.fusion
            out = self.search(space, memory, mask, self.starts(batch.history)[space], k,
                              batch.history if exclude_history else None)
            return FusedRecommendation(out.items, out.scores, torch.full_like(out.items, SPACES.index(space)))
        confidence = self.config.fusion == "confidence"
        found = self.stream_candidates(batch, k, exclude_history, score_both=not confidence)
        if confidence:
            scores = torch.cat([found.found_by[s] / self.scored_codes(s) for s in SPACES], 1)
        else:
            scores = found.summed(self.config.fusion_weight)
        return merge_streams(found.items, scores, found.streams, k)

    @torch.no_grad()
    def stream_candidates(self, batch: Batch, k: int, exclude_history: bool = False,
                          score_both: bool = True) -> "StreamCandidates":
        """Both streams' top k (2k candidates: behaviour's, then semantic's): what the ``confidence``
        and ``sum`` fusions rank. With ``score_both`` each is also scored in both streams (the other
        stream's k teacher-forced; ``confidence`` needs neither), what a fusion weight is chosen over
        without decoding again."""
        self.check_k(k)
        memory, mask = self.encode(batch.history)
        starts = self.starts(batch.history)
        exclude = batch.history if exclude_history else None
        found = {s: self.search(s, memory, mask, starts[s], k, exclude) for s in SPACES}
        items = torch.cat([found[s].items for s in SPACES], 1)  # (B, 2k)
        streams = torch.arange(2, device=items.device).repeat_interleave(k).expand_as(items)
        found_by = {s: found[s].scores for s in SPACES}
        return StreamCandidates(items, streams, found_by,
                                self.summed_log_probs(memory, mask, starts, found) if score_both else None)

    def summed_log_probs(self, memory: torch.Tensor, mask: torch.Tensor, starts: dict[str, DecoderStart],
                         found: dict[str, BeamResult]) -> dict[str, torch.Tensor]:
        """Each stream's log-probability of both streams' candidates (B, 2k: behaviour's k, then
        semantic's), which the released code's fusion sums. A candidate's log-probability in the
        stream that found it is its beam score (the same sum of code log-probabilities), so each
        stream decodes only the other stream's k. An item without behaviour codes counts its
        semantic mean code log-probability for each of the behaviour stream's codes."""
        items = torch.cat([found[s].items for s in SPACES], 1)  # (B, 2k)
        semantic = torch.cat([self.sequence_log_prob("semantic", memory, mask, starts["semantic"],
                                                     found["behavior"].items), found["semantic"].scores], 1)
        behavior = torch.cat([found["behavior"].scores, self.sequence_log_prob(
            "behavior", memory, mask, starts["behavior"], found["semantic"].items)], 1)
        lacking = (items >= 1) & ~self.vocabs["behavior"].has_id(items.clamp(min=0))
        stand_in = semantic / self.scored_codes("semantic") * self.scored_codes("behavior")
        return {"behavior": torch.where(lacking, stand_in, behavior), "semantic": semantic}

    @torch.no_grad()
    def recommend(self, batch: Batch, k: int, exclude_history: bool = False) -> Recommendation:
        out = self.recommend_streams(batch, k, exclude_history)
        return Recommendation(items=out.items, scores=out.scores)

    def register_items(self, item_ids: Any, ids: dict[str, Any]) -> None:
        """As every generative retriever; refused by a model that trained its behaviour stream alone,
        which can neither decode nor read an item that has semantic codes only."""
        if "semantic" not in self.decoders:
            raise ValueError("this EAGER trained its behavior stream alone (model.streams=behavior): an item "
                             "registered after training has semantic codes only, which it can neither decode nor "
                             "read in a history; register new items with a model that has the semantic stream")
        super().register_items(item_ids, ids)


def merge_streams(items: torch.Tensor, scores: torch.Tensor, streams: torch.Tensor, k: int) -> FusedRecommendation:
    """items, scores, streams (B, C) from both streams (-1: no item) -> the best k distinct items;
    an item found by both keeps its best score and is marked 2 (both)."""
    scores = scores.masked_fill(items < 1, float("-inf"))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    items, scores, streams = items.gather(1, order), scores.gather(1, order), streams.gather(1, order)
    same = (items[:, :, None] == items[:, None, :]) & (items[:, :, None] > 0)  # (B, C, C)
    earlier = same.tril(-1).any(2)  # a better copy comes first
    both = (same & (streams[:, :, None] != streams[:, None, :])).any(2)
    scores = scores.masked_fill(earlier, float("-inf"))
    top, keep = scores.topk(k, dim=1)
    return FusedRecommendation(items.gather(1, keep), top, torch.where(both, 2, streams).gather(1, keep))


def vector_dim(ids: IdTable, n_items: int, space: str, recorded: int | None) -> int:
    """The size of a stream's GCT vectors: of ``ids.vectors`` (checked: (n_items + 1, D), row i is
    item i), else as recorded in the checkpoint."""
    if ids.vectors is None:
        if recorded is None:
            raise ValueError(f"GCT needs the {space} stream's item vectors: give its IdTable the vectors its IDs were "
                             "built from (IdTable.vectors, (n_items + 1, D)), or set model.gct=off")
        return int(recorded)
    shape = tuple(torch.as_tensor(ids.vectors).shape)
    if len(shape) != 2 or shape[0] != n_items + 1 or shape[1] < 1:
        raise ValueError(f"the {space} stream's item vectors must be ({n_items + 1}, D) (row i: item i, row 0 "
                         f"padding), got {shape}")
    return shape[1]
