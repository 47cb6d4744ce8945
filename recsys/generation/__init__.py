"""Generation for semantic-ID models: batched beam search constrained by the prefix trie."""

from recsys.generation.beam import (
    BeamResult, StepFn, TrieEdges, advance, allowed_tokens, beam_search, trie_edges,
)

__all__ = ["BeamResult", "StepFn", "TrieEdges", "advance", "allowed_tokens", "beam_search", "trie_edges"]
