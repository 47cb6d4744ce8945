"""Batched beam search constrained by the semantic-ID prefix trie; model-agnostic.

A model supplies ``step_fn(prefix, parents) -> log-probs`` for the next level (it keeps its
encoder output cached, and may keep its decoder's per-position keys and values, reordered by
``parents``); this module walks the trie so that only existing IDs can be produced. All of
it runs on the trie's device with tensor ops (no per-row Python): the trie's CSR edges are
expanded per beam with ``repeat_interleave`` and children are found by ``searchsorted`` over
sorted ``(node, token)`` keys.

Beams are laid out batch-major: row ``b * width + j`` of every tensor passed to ``step_fn`` is
beam ``j`` of batch row ``b``, so a model may share one encoder output across a row's beams.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from recsys.semantic_ids.index import TrieTable

# prefix tokens (R, t), parents -> log-probabilities over level t's vocabulary (R, V_t); R = B * G
# batch-major, G = 1 at t = 0 (each row's root is scored once) and G = width after. parents (R,): the
# row of the previous call's prefix that each row extends (None at t = 0), so that prefix[r, :-1] is
# that call's prefix[parents[r]]: a decoder's cache of earlier positions follows its beams by it.
StepFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]

NEG_INF = float("-inf")


class BeamResult(NamedTuple):
    items: torch.Tensor  # (B, k) item ids, best first; -1 only where fewer than k items could be found
    scores: torch.Tensor  # (B, k) sequence log-probabilities, descending; -inf exactly where items is -1
    codes: torch.Tensor  # (B, k, L + 1) the decoded semantic IDs; -1 where items is -1


class TrieEdges(NamedTuple):
    """The trie plus sorted ``node * base + token`` keys, for vectorised child lookup."""

    table: TrieTable
    keys: torch.Tensor  # (E,) ascending: nodes in id order, tokens ascending within a node
    base: int  # larger than every token
    n_levels: int  # tokens per full ID (L + 1)


def trie_edges(table: TrieTable) -> TrieEdges:
    """Precompute the lookup keys of a trie (one host sync; reuse across searches if you like)."""
    if len(table.tokens) == 0:
        raise ValueError("the trie holds no IDs; there is nothing to decode")
    base = int(table.tokens.max()) + 1
    n_nodes = len(table.depth)
    parent = torch.repeat_interleave(torch.arange(n_nodes, device=table.offsets.device), table.offsets.diff())
    return TrieEdges(table, parent * base + table.tokens, base, int(table.depth.max()))


def allowed_tokens(edges: TrieEdges, nodes: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """nodes (R,) -> BoolTensor (R, vocab_size), True where the token extends a valid ID.

    A node of -1 (a dead beam) allows nothing. Same answer as ``SemanticIdIndex.next_mask``,
    computed on ``nodes``' device without a Python loop.
    """
    offsets = edges.table.offsets
    alive = nodes >= 0
    safe = nodes.clamp(min=0)
    lo = offsets[safe]  # (R,)
    counts = torch.where(alive, offsets[safe + 1] - lo, torch.zeros_like(lo))  # (R,)
    rows = torch.repeat_interleave(torch.arange(len(nodes), device=nodes.device), counts)  # (E',)
    starts = torch.cumsum(counts, 0) - counts  # (R,) first slot of each row in the flat list
    edge = lo[rows] + torch.arange(len(rows), device=nodes.device) - starts[rows]  # (E',)
    cols = edges.table.tokens[edge]
    keep = cols < vocab_size
    mask = torch.zeros(len(nodes), vocab_size, dtype=torch.bool, device=nodes.device)
    mask[rows[keep], cols[keep]] = True
    return mask


def advance(edges: TrieEdges, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """nodes (...), tokens (...) -> child nodes (...), -1 where the edge does not exist."""
    keys = edges.keys
    ok = (nodes >= 0) & (tokens >= 0) & (tokens < edges.base)
    query = nodes.clamp(min=0) * edges.base + tokens.clamp(0, edges.base - 1)
    pos = torch.searchsorted(keys, query.reshape(-1)).reshape(query.shape).clamp(max=len(keys) - 1)
    ok &= keys[pos] == query
    return torch.where(ok, edges.table.children[pos], torch.full_like(pos, -1))


def _ban_excluded(scores: torch.Tensor, items: torch.Tensor, exclude: torch.Tensor) -> torch.Tensor:
    """scores, items (B, C); exclude (B, H) item ids (0 = none) -> scores with excluded items at -inf."""
    banned = (items[:, :, None] == exclude[:, None, :]).any(-1) & (items > 0)  # (B, C)
    return scores.masked_fill(banned, NEG_INF)


@torch.no_grad()
def beam_search(step_fn: StepFn, trie: TrieTable | TrieEdges, batch_size: int, k: int, beam: int,
                exclude: torch.Tensor | None = None) -> BeamResult:
    """Decode the k most likely existing IDs per batch row.

    step_fn: prefix (B * G, t), parents -> log-probs (B * G, V_t), called for t = 0 .. L, with G = 1 at
      t = 0 (every row has one live beam, at the root, so the root is scored once per row and
      not once per beam) and G = width after; the sequence score is the sum of the chosen tokens'
      log-probs (disallowed tokens get -inf; nothing is renormalised, so scores are the model's
      log-probabilities).
    exclude: (B, H) item ids never to return (0 = padding). They are masked at the leaf: the
      last step takes ``width + H`` candidates, drops excluded items and keeps the best
      ``width``; and the width is ``beam + H`` throughout, so k items come out whenever the
      catalogue holds k items outside ``exclude`` (each beam at depth L has >= 1 leaf).
    Returns BeamResult(items (B, k), scores (B, k), codes (B, k, L + 1)).

    With ``beam >=`` the number of IDs every prefix is kept and the result is exact.
    """
    if not 1 <= k <= beam:
        raise ValueError(f"k={k} is out of range; allowed: 1 <= k <= beam={beam}")
    edges = trie if isinstance(trie, TrieEdges) else trie_edges(trie)
    device = edges.keys.device
    B, H = batch_size, 0 if exclude is None else exclude.shape[1]
    width = beam + H
    R = B * width
    scores = torch.full((B, width), NEG_INF, device=device)  # (B, W)
    scores[:, 0] = 0.0  # one live beam per row to start; the rest are dead (-inf) copies
    nodes = torch.zeros(R, dtype=torch.long, device=device)  # (R,) all at the root
    prefix = torch.zeros(R, 0, dtype=torch.long, device=device)  # (R, t)
    offset = (torch.arange(B, device=device) * width)[:, None]  # (B, 1)
    parents = None
    for t in range(edges.n_levels):
        if t == 0:  # one live beam per row, at the root: score it once, copy it to the dead beams
            logp = step_fn(prefix[::width], None).float().repeat_interleave(width, dim=0)  # (R, V)
        else:
            logp = step_fn(prefix, parents).float()  # (R, V)
        V = logp.shape[1]
        mask = allowed_tokens(edges, nodes, V)  # (R, V)
        cand = (scores.reshape(R, 1) + logp).masked_fill(~mask, NEG_INF).reshape(B, width * V)  # (B, W * V)
        last = t == edges.n_levels - 1
        take = min(width + (H if last else 0), width * V)  # >= width: V >= 1
        # fewer valid candidates than beams: the rest are -inf picks, i.e. dead beams (node -1)
        top, flat = cand.topk(take, dim=1)  # (B, C) each, descending
        rows = (offset + flat // V).reshape(-1)  # (B * C,) parent beam rows
        tokens = (flat % V).reshape(-1)  # (B * C,)
        child = advance(edges, nodes[rows], tokens).reshape(B, take)  # (B, C)
        child = torch.where(top > NEG_INF, child, torch.full_like(child, -1))  # dead beams stay dead
        if last and exclude is not None:
            items = edges.table.leaf_item[child.clamp(min=0)].masked_fill(child < 0, -1)  # (B, C)
            top = _ban_excluded(top, items, exclude)
            top, keep = top.topk(width, dim=1)  # (B, W)
            child, rows, tokens = (child.gather(1, keep), rows.reshape(B, take).gather(1, keep).reshape(-1),
                                   tokens.reshape(B, take).gather(1, keep).reshape(-1))
            child = torch.where(top > NEG_INF, child, torch.full_like(child, -1))
        scores, nodes = top, child.reshape(-1)  # (B, W), (R,)
        prefix = torch.cat([prefix[rows], tokens[:, None]], 1)  # (R, t + 1)
        parents = rows // width if t == 0 else rows  # rows of this call's prefix (B of them at t = 0)
    return _finish(edges, scores, nodes, prefix, k)


def _finish(edges: TrieEdges, scores: torch.Tensor, nodes: torch.Tensor, prefix: torch.Tensor, k: int) -> BeamResult:
    """Final beams (already sorted best first) -> the top k as items, scores and codes."""
    B = scores.shape[0]
    scores = scores[:, :k]  # (B, k)
    nodes = nodes.reshape(B, -1)[:, :k]
    found = (nodes >= 0) & (scores > NEG_INF)
    items = edges.table.leaf_item[nodes.clamp(min=0)].masked_fill(~found, -1)  # (B, k)
    codes = prefix.reshape(B, -1, prefix.shape[1])[:, :k].masked_fill(~found[:, :, None], -1)  # (B, k, L + 1)
    return BeamResult(items, scores.masked_fill(~found, NEG_INF), codes)
