"""The contract every model honours: ``loss(batch)``, and by role ``recommend`` or ``score``.

Two roles (RecBole's ``calculate_loss`` / ``full_sort_predict`` split, plus a ranking stage):
- a **Retriever** recommends the top k of the whole catalogue: ``recommend(batch, k)``;
- a **Ranker** scores the candidates it is given: ``score(batch) -> (B, C)``.

A model declares what it needs and what it can do in ``capabilities`` (its ID spaces, whether it
reads users or timestamps, registers new items, exposes user and item vectors). Training,
evaluation, Tune and Serve read those declarations; they never probe a model with ``hasattr``
and never branch on its name. ``forward`` is ``loss`` so that DDP, which only synchronises
gradients through ``forward``, wraps any model unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

ROLES = ("retriever", "ranker")


@dataclass(kw_only=True)
class Batch:
    """What a model reads. Fields are named, never positional; all but ``history`` optional.

    history: (B, T) item ids, left-padded with 0, newest last.
    targets: (B, T) next item at every position (0 = no target); training windows.
    target: (B,) the item to rank; evaluation.
    users: (B,) user index of each row (``EvalSet.user_index``, ``split.train_users``), for
        models that declare ``reads_users``; others ignore it.
    timestamps: (B, T) event times in seconds, aligned with ``history`` (0 at padding); for
        models that declare ``reads_timestamps``, when the dataset has times.
    target_time: (B,) the time of the event being predicted (the query time): at serving, the
        request's time. Needed by relative time biases that read the next event's time.
    candidates: (B, C) item ids a Ranker scores (0 = padding).
    labels: (B, C) float, 1 where the candidate is the user's next item; ranker training.
    candidate_ranks: (B, C) the retriever's 0-based rank of each candidate, -1 for an item it did
        not propose (a random negative in ranker training); candidate_scores: (B, C) its score
        for it (0 where the rank is -1). Rankers that read retriever features need both.
    long_items, long_sizes, long_positions, long_vectors: the whole history before the target as
        M entries per row (0-padded): raw behaviours (size 1 each, TWIN) or clusters of them
        (TWIN-V2's virtual items, ``recsys.history.cluster_history``). long_items (B, M) the item
        standing for each entry, long_sizes (B, M) its number of events (0 = padding),
        long_positions (B, M) float the mean position of its events (0 = oldest), long_vectors
        (B, M, Dv) float the mean of its events' item vectors. A ranker that reads them derives
        them from ``history`` when they are absent (``Ranker.prepare``); serving may pass stored ones.
    """

    history: torch.Tensor
    targets: torch.Tensor | None = None
    target: torch.Tensor | None = None
    users: torch.Tensor | None = None
    timestamps: torch.Tensor | None = None
    target_time: torch.Tensor | None = None
    candidates: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    candidate_ranks: torch.Tensor | None = None
    candidate_scores: torch.Tensor | None = None
    long_items: torch.Tensor | None = None
    long_sizes: torch.Tensor | None = None
    long_positions: torch.Tensor | None = None
    long_vectors: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return Batch(**{name: None if t is None else t.to(device, non_blocking=True) for name, t in moved.items()})


class LossOutput(NamedTuple):
    """The loss a model trains on and its named parts (each logged per epoch, detached).
    With one part, it is the total under the loss's own name, e.g. ``{"ce": total}``."""

    total: torch.Tensor  # () the loss to backpropagate
    parts: dict[str, torch.Tensor]  # name -> () tensor


class Recommendation(NamedTuple):
    items: torch.Tensor  # (B, k) item ids, best first; never 0
    scores: torch.Tensor  # (B, k) the model's scores for them, descending


@dataclass(frozen=True)
class Capabilities:
    """What a model class needs and offers, read by training, evaluation, Tune and Serve.

    id_spaces: the named ID spaces it is built with, e.g. ("semantic",); each needs an ids run.
    registers_items: new items can be added after training (cold start): a retriever's from their
        IDs, a ranker's from their content vectors (``register_items`` of each role).
    reads_users: it may condition on ``Batch.users`` (whether a given model requires them is
        its ``users_required``).
    reads_timestamps: it reads ``Batch.timestamps`` when the dataset has them.
    item_vectors: its score is ``user_embedding(batch) . item_embeddings()``: servable from a
        maximum-inner-product index, and a source of behaviour IDs.
    id_vectors: training reads, per ID space, the item vectors that space's IDs were built from
        (``IdTable.vectors``; EAGER's GCT distils towards them).
    new_item_spaces: with ``registers_items``, the spaces an item registered after training has IDs
        in (None: every declared space). EAGER: ("semantic",), as a new item has no behaviour yet.
    min_batch_size: the fewest training examples per batch its loss works with (2 for in-batch
        negatives: one row's negatives are the other rows' targets).
    content_vectors: it can read each item's content vector (an embed run's, ``recsys train
        --embed``) as the build context ``content_vectors`` (n_items + 1, Dc), row 0 for padding.
    inference_settings: the config keys that change only how a trained model answers, never its
        weights (e.g. a beam width, EAGER's fusion): a checkpoint may be loaded with them changed
        (``load_model(..., inference=)``, Serve's ``inference``).
    """

    id_spaces: tuple[str, ...] = ()
    registers_items: bool = False
    reads_users: bool = False
    reads_timestamps: bool = False
    item_vectors: bool = False
    id_vectors: bool = False
    new_item_spaces: tuple[str, ...] | None = None
    content_vectors: bool = False
    min_batch_size: int = 1
    inference_settings: tuple[str, ...] = ()

    @property
    def registration_spaces(self) -> tuple[str, ...]:
        """The spaces a new item must come with IDs in."""
        return self.id_spaces if self.new_item_spaces is None else self.new_item_spaces


class SequenceModel(nn.Module):
    """Base class of both roles. Subclasses implement ``loss`` and their role's method."""

    role: ClassVar[str]
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, n_items: int, max_len: int):
        super().__init__()
        if n_items < 1:
            raise ValueError(f"n_items={n_items} is out of range; allowed: >= 1")
        if max_len < 1:
            raise ValueError(f"max_len={max_len} is out of range; allowed: >= 1")
        self.n_items = n_items
        self.max_len = max_len

    def forward(self, batch: Batch) -> LossOutput:
        return self.loss(batch)

    def loss(self, batch: Batch) -> LossOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement loss()")

    @property
    def users_required(self) -> bool:
        """True when every batch must carry ``users`` (e.g. TIGER with a user token)."""
        return False

    @property
    def timestamps_required(self) -> bool:
        """True when every batch must carry ``timestamps`` and ``target_time`` (e.g. HSTU with
        model.time_bias=on)."""
        return False

    # --- what a checkpoint records besides the weights -----------------------------------
    def checkpoint_context(self) -> dict[str, Any]:
        """JSON-able facts written to model.json's ``context`` (e.g. vocabulary sizes)."""
        return {}

    @classmethod
    def context_from_checkpoint(cls, context: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, Any]:
        """model.json's ``context`` and the weights -> the keyword arguments of ``build_model``."""
        return {}

    @classmethod
    def upgrade_state(cls, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a state_dict saved in an earlier weight layout of this class to today's."""
        return weights


class Retriever(SequenceModel):
    """Recommends from the whole catalogue."""

    role: ClassVar[str] = "retriever"

    def recommend(self, batch: Batch, k: int, exclude_history: bool = False) -> Recommendation:
        raise NotImplementedError(f"{type(self).__name__} must implement recommend()")

    def beam_width(self, k: int) -> int | None:
        """The beam ``recommend(batch, k)`` searches with, or None when it scores every item
        (then rows of one call never change each other's answers)."""
        return None

    def check_k(self, k: int) -> None:
        if not 1 <= k <= self.n_items:
            raise ValueError(f"k={k} is out of range; allowed: 1 <= k <= {self.n_items} (the catalogue size)")

    def register_items(self, item_ids: torch.Tensor, ids: dict[str, torch.Tensor]) -> None:
        """Cold start: add items ``n_items + 1 ..`` with their IDs per space, (n, L_space + 1).
        Only models that declare ``registers_items``."""
        raise NotImplementedError(f"{type(self).__name__} cannot register items after training "
                                  "(capabilities.registers_items is false)")

    def item_ids(self, space: str, items: torch.Tensor) -> torch.Tensor:
        """items (n,) -> their full IDs in ``space`` (n, L + 1), for a declared ID space."""
        raise ValueError(f"{type(self).__name__} has no ID space {space!r}; it declares "
                         f"{list(self.capabilities.id_spaces)}")


class GenerativeRetriever(Retriever):
    """A retriever that decodes item IDs: ``self.vocabs`` (an ``nn.ModuleDict``) holds one
    ``recsys.models.vocabulary.SemanticVocabulary`` per ID space the class declares, built from
    ``ids`` (space -> ``IdTable``). Reading IDs, registering items and the checkpoint's record of
    the vocabularies are written once here."""

    def __init__(self, n_items: int, max_len: int, vocabs: dict[str, nn.Module]):
        super().__init__(n_items, max_len)
        self.require_ids(vocabs)
        self.vocabs = nn.ModuleDict(vocabs)

    @classmethod
    def require_ids(cls, ids: dict[str, Any] | None) -> None:
        """Raise unless ``ids`` names exactly the ID spaces the class declares."""
        declared, given = sorted(cls.capabilities.id_spaces), sorted(ids or {})
        if given != declared:
            raise ValueError(f"{cls.__name__} is built with the ID spaces {declared}, got {given}; give an ids run "
                             f"for each (recsys train --ids RUN, or --ids SPACE=RUN per space)")

    def vocabulary(self, space: str) -> nn.Module:
        """The ``SemanticVocabulary`` of a declared space (its level sizes, trie, ``fits``)."""
        if space not in self.vocabs:
            raise ValueError(f"{type(self).__name__} has no ID space {space!r}; it declares {sorted(self.vocabs)}")
        return self.vocabs[space]

    def item_ids(self, space: str, items: torch.Tensor) -> torch.Tensor:
        return self.vocabulary(space).item_codes[items]

    @torch.no_grad()
    def register_items(self, item_ids: Any, ids: dict[str, Any]) -> None:
        """Cold start: add items ``n_items + 1 .. n_items + n`` (any order) with their full IDs,
        ``ids[space]`` (n, L + 1), in every space of ``capabilities.registration_spaces`` (and
        optionally the others; a space left out gets ``ABSENT`` rows: not decodable there). They
        become decodable and usable in histories without retraining; no weight changes. Every space
        is checked before any changes."""
        required = set(self.capabilities.registration_spaces)
        if not required <= set(ids) <= set(self.vocabs):
            raise ValueError(f"{type(self).__name__} registers items with IDs in {sorted(required)}"
                             + (f" (and optionally {sorted(set(self.vocabs) - required)})" if required != set(self.vocabs)
                                else "") + f", got {sorted(ids)}")
        new = torch.as_tensor(item_ids, dtype=torch.long).reshape(-1).cpu()
        expected = torch.arange(self.n_items + 1, self.n_items + len(new) + 1)
        if not torch.equal(new.sort().values, expected):
            raise ValueError(f"new item ids must be exactly {self.n_items + 1}..{self.n_items + len(new)} "
                             f"(ids index the ID tables), got {new.tolist()[:10]}")
        for apply in [self.vocabs[space].prepare_registration(new, ids.get(space)) for space in self.vocabs]:
            apply()
        self.n_items += len(new)

    def checkpoint_context(self) -> dict[str, Any]:
        return {"id_spaces": {space: vocab.context() for space, vocab in self.vocabs.items()}}


class Ranker(SequenceModel):
    """Scores the candidates it is given, over the user's whole history."""

    role: ClassVar[str] = "ranker"

    def score(self, batch: Batch) -> torch.Tensor:
        """batch.candidates (B, C) -> scores (B, C), higher first; padding candidates -inf."""
        raise NotImplementedError(f"{type(self).__name__} must implement score()")

    def prepare(self, batch: Batch) -> Batch:
        """The batch with whatever the ranker derives from the whole history filled in (TWIN-V2:
        the clusters), outside autograd. Training calls it once per fixed batch and caches the
        result; ``score`` and ``loss`` call it too, and it returns a prepared batch unchanged."""
        return batch

    def register_items(self, item_ids: torch.Tensor, vectors: torch.Tensor) -> None:
        """Cold start in a cascade: add items ``n_items + 1 ..`` with their content vectors (n, D),
        in the space of the vectors the ranker was trained with. Only rankers that declare
        ``registers_items``."""
        raise NotImplementedError(f"{type(self).__name__} cannot score items it was not trained on "
                                  "(capabilities.registers_items is false)")


class AtomicIdModel(Retriever):
    """A retriever that scores every item id at once (SASRec, HSTU): ranking is a top-k."""

    def score_items(self, batch: Batch) -> torch.Tensor:
        """-> scores (B, n_items + 1) for the next item; column 0 is padding."""
        raise NotImplementedError

    @torch.no_grad()
    def recommend(self, batch: Batch, k: int, exclude_history: bool = False) -> Recommendation:
        self.check_k(k)
        scores = self.score_items(batch).float()  # (B, N + 1)
        scores[:, 0] = float("-inf")
        if exclude_history:
            scores.scatter_(1, batch.history, float("-inf"))  # padding 0 is already -inf
        top = torch.topk(scores, k, dim=1)
        return Recommendation(items=top.indices, scores=top.values)


def item_vector_table(vectors: Any, n_items: int, name: str) -> torch.Tensor:
    """A frozen per-item table given as build context -> float32 (n_items + 1, D), row 0 for
    padding; a ValueError naming ``name`` when its shape is not that."""
    table = torch.as_tensor(vectors, dtype=torch.float32)
    if table.dim() != 2 or len(table) != n_items + 1:
        raise ValueError(f"{name} must be (n_items + 1, D) = ({n_items + 1}, D) with row 0 for padding, got "
                         f"{tuple(table.shape)}")
    return table
