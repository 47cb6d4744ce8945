"""The shared attention: score functions, masks and relative bias against slow references."""

import math

import pytest
import torch
import torch.nn.functional as F

from recsys.models.layers import (
    Attention, Block, Dropout, RelativeBias, attend, causal_mask, decode_step, inverted_dropout, keep_levels,
    reorder_cache, time_bucket,
)


def reference(q, k, v, score, allowed, bias, norm=None):
    """Per (batch, head, query), as the formulas read."""
    B, H, T, d = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                s = torch.stack([q[b, h, t] @ k[b, h, j] for j in range(k.shape[2])])
                extra = bias[b % bias.shape[0], h % bias.shape[1], t] if bias is not None else 0
                ok = allowed[b % allowed.shape[0], h % allowed.shape[1], t]
                if score == "softmax":  # softmax(q k / sqrt(d) + bias)
                    w = torch.softmax((s / math.sqrt(d) + extra).masked_fill(~ok, -math.inf), 0)
                else:  # SiLU(q k + bias) / n
                    w = F.silu(s + extra) / norm * ok
                out[b, h, t] = w @ v[b, h]
    return out


@pytest.mark.parametrize("score", ["softmax", "pointwise"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_attend_matches_the_formula_with_masks_and_bias(score, causal, with_bias):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64) for _ in range(3))
    valid = torch.tensor([[False, True, True, True, True], [True] * 5])
    mask = valid[:, None, None, :].expand(2, 1, 5, 5).clone()  # padding mask over keys
    mask[:, :, 0, 0] = True  # every query keeps a key
    bias = torch.randn(1, 1, 5, 5, dtype=torch.float64) if with_bias else None
    got = attend(q, k, v, score=score, mask=mask, causal=causal, bias=bias, norm=5.0)
    allowed = mask & torch.ones(5, 5, dtype=torch.bool).tril() if causal else mask
    torch.testing.assert_close(got, reference(q, k, v, score, allowed, bias, norm=5.0))


def test_pointwise_attention_needs_its_normaliser_and_unknown_scores_are_refused():
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match="pointwise attention needs norm > 0"):
        attend(q, q, q, score="pointwise")
    with pytest.raises(ValueError, match="attention score 'cosine' is not allowed"):
        Attention(8, 2, score="cosine")


def test_a_decoder_block_folds_beams_into_the_query_axis_without_changing_the_answer():
    torch.manual_seed(0)
    block = Block(16, 2, 32, 0.0, head_dim=8, activation="relu", cross=True).eval()
    memory = torch.randn(2, 6, 16)  # B = 2 users
    memory_mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    memory_mask[0, ..., :2] = False
    x = torch.randn(6, 3, 16)  # 3 beams per user, batch-major
    folded = block(x, causal=True, memory_kv=block.cross.keys_values(memory), memory_mask=memory_mask)
    for row in range(6):  # each beam alone, with its user's memory
        user = row // 3
        alone = block(x[row:row + 1], causal=True, memory_kv=block.cross.keys_values(memory[user:user + 1]),
                      memory_mask=memory_mask[user:user + 1])
        torch.testing.assert_close(folded[row:row + 1], alone, atol=1e-5, rtol=1e-5)


def test_the_relative_bias_reads_positions_and_changes_exactly_when_timestamps_differ():
    torch.manual_seed(0)
    rab = RelativeBias(max_len=6, time_buckets=128)
    positions = rab(4)
    assert positions.shape == (1, 1, 4, 4)
    assert positions[0, 0, 1, 0] == positions[0, 0, 3, 2] == rab.position[-1 + 5]  # j - i = -1
    ts = torch.tensor([[0, 10, 1000, 10 ** 6]])
    query = torch.tensor([[10, 1000, 10 ** 6, 2 * 10 ** 6]])  # the next event's time
    with_time = rab(4, ts, query)
    assert with_time.shape == (1, 1, 4, 4) and not torch.equal(with_time, positions.expand(1, 1, 4, 4))
    same_buckets = ts * 1 + 0  # identical times -> identical bias
    torch.testing.assert_close(rab(4, same_buckets, query), with_time)
    shifted = ts.clone()
    shifted[0, 0] = 999  # one event's gap changes bucket: only column 0 moves
    diff = (rab(4, shifted, query) != with_time)[0, 0]
    assert diff[:, 0].any() and not diff[:, 1:].any()
    assert time_bucket(torch.tensor([0, 1, 2, 10 ** 18])).tolist() == [0, 0, 2, 128]


def test_causal_mask_lets_padding_rows_see_themselves():
    mask = causal_mask(torch.tensor([[False, True, True]]))
    assert mask.shape == (1, 1, 3, 3)
    assert mask[0, 0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]


def test_dropout_keeps_the_expectation_and_its_gradient_is_the_mask():
    torch.manual_seed(0)
    x = torch.ones(400_000, requires_grad=True)
    y = inverted_dropout(x, 0.1)
    kept = y.detach() > 0
    assert abs(kept.float().mean().item() - 0.9) < 0.003  # 4.7e-4 is one standard deviation
    assert torch.all(y.detach()[kept] == 65536 / round(0.9 * 65536))  # 1 / the quantised keep rate
    assert abs(y.detach().mean().item() - 1.0) < 0.005
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.3])
def test_dropout_keeps_the_expectation_in_the_dtype_it_computes_in(p, dtype):
    # bf16 stores 1 / 0.9 as 1.109375: with the keep rate left at 0.9 the mean would be 0.99844, 9
    # standard deviations below 1 over these 4M elements (the standard deviation is 1.7e-4 at p = 0.1)
    torch.manual_seed(0)
    y = inverted_dropout(torch.ones(4_000_000, dtype=dtype), p)
    scale = y.max().item()
    assert keep_levels(p, dtype) / 65536 * scale == pytest.approx(1.0, abs=2e-5)
    assert y.double().mean().item() == pytest.approx(1.0, abs=4 * (p / (1 - p) / 4e6) ** 0.5)
    if dtype == torch.float32:
        assert keep_levels(p, dtype) == round((1 - p) * 65536)  # unchanged where the scale is exact
    assert inverted_dropout(torch.ones(8, dtype=torch.bfloat16), 0.001).equal(torch.ones(8, dtype=torch.bfloat16))


def test_dropout_is_fixed_by_the_seed_shapes_any_tensor_and_is_identity_when_off():
    x = torch.randn(6, 5, 7, dtype=torch.bfloat16).transpose(0, 2)  # not contiguous
    torch.manual_seed(3)
    a = inverted_dropout(x, 0.5)
    torch.manual_seed(3)
    b = inverted_dropout(x, 0.5)
    assert torch.equal(a, b) and a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a[a != 0], (x * 2)[a != 0])
    assert inverted_dropout(x, 0.5, training=False) is x and inverted_dropout(x, 0.0) is x
    assert torch.count_nonzero(inverted_dropout(x, 1.0)) == 0
    drop = Dropout(0.5).eval()
    assert drop(x) is x
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="dropout probability must be in"):
            Dropout(p)


def test_a_block_decodes_position_by_position_as_it_does_the_whole_causal_sequence():
    """Block.step over positions 0..t with its keys and values cached equals forward(causal=True)
    at each position; decoder rows fold onto their memory row (R = B * G), and reorder_cache makes
    a row continue another row's prefix."""
    torch.manual_seed(0)
    B, G, T, S, D = 2, 3, 4, 5, 16
    blocks = torch.nn.ModuleList(Block(D, 2, 32, 0.1, cross=True) for _ in range(2)).eval()
    memory = torch.randn(B, S, D)
    memory_mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    memory_mask[1, ..., -2:] = False
    kv = [block.cross.keys_values(memory) for block in blocks]
    x = torch.randn(B * G, T, D)
    full = x
    for block, m in zip(blocks, kv):
        full = block(full, causal=True, memory_kv=m, memory_mask=memory_mask)
    cache = None
    for t in range(T):
        out, cache = decode_step(blocks, x[:, t:t + 1], cache, kv, memory_mask)
        torch.testing.assert_close(out[:, 0], full[:, t], atol=1e-5, rtol=1e-5)
    # rows that swap prefixes within each memory row continue from each other's caches
    parents = torch.tensor([2, 0, 1, 4, 5, 3])
    swapped = torch.cat([x[parents, :T], x[:, :1]], 1)  # each row's past is its parent's; a new last position
    ref = swapped
    for block, m in zip(blocks, kv):
        ref = block(ref, causal=True, memory_kv=m, memory_mask=memory_mask)
    out, _ = decode_step(blocks, x[:, :1], reorder_cache(cache, parents), kv, memory_mask)
    torch.testing.assert_close(out[:, 0], ref[:, T], atol=1e-5, rtol=1e-5)
