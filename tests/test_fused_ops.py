"""The fused ops' definitions equal the plain computations they replace."""

import math

import pytest
import torch

from trt_twotower import fused_ops, policy

MASK = 3


def _concat_attention(q, ctx_k, ctx_v, ctx_len, blk_k, blk_v):
    """Per row: concatenate the valid prefix with the block, repeat KV heads, softmax."""
    out = []
    groups = q.shape[2] // ctx_k.shape[1]
    for b in range(q.shape[0]):
        k = torch.cat([ctx_k[b, :, :ctx_len[b]], blk_k[b]], 1).repeat_interleave(groups, 0)
        v = torch.cat([ctx_v[b, :, :ctx_len[b]], blk_v[b]], 1).repeat_interleave(groups, 0)
        qb = q[b].transpose(0, 1)                                   # [Hq, S, D]
        w = torch.softmax(qb @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), -1)
        out.append((w @ v).transpose(0, 1))
    return torch.stack(out)


@pytest.mark.parametrize("hq,hkv,d", [(4, 2, 16), (8, 1, 32), (6, 6, 8)])
def test_block_cross_attention_equals_concatenated_attention(rng, hq, hkv, d):
    b, s, lmax = 3, 5, 11
    q = torch.randn(b, s, hq, d, generator=rng)
    ctx_k, ctx_v = (torch.randn(b, hkv, lmax, d, generator=rng) for _ in range(2))
    blk_k, blk_v = (torch.randn(b, hkv, s, d, generator=rng) for _ in range(2))
    ctx_len = torch.tensor([0, 7, lmax])
    got = fused_ops.block_cross_attention(q, ctx_k, ctx_v, ctx_len, blk_k, blk_v)
    expected = _concat_attention(q, ctx_k, ctx_v, ctx_len, blk_k, blk_v)
    assert float((got - expected).abs().max()) < 1e-5


def test_confidence_unmask_is_the_policy_step(rng):
    logits = torch.randn(2, 8, 50, generator=rng) * 3
    block = torch.full((2, 8), MASK)
    block[0, :3] = torch.tensor([7, 8, 9])
    for steps_left in (4, 1):
        nxt, conf, count = fused_ops.confidence_unmask(logits, block, MASK, 0.3, steps_left)
        pred, c = policy.diffusion_predictions(logits, MASK)
        expected, _ = policy.commit_step(block, pred, c, MASK, 0.3, steps_left)
        assert torch.equal(nxt, expected)
        assert torch.equal(count, (expected == MASK).sum(-1))
        assert torch.isinf(conf[0, :3]).all()
    assert int(count.sum()) == 0  # the last step commits everything


def test_block_cross_attention_keeps_the_input_dtype_and_needs_no_prefix(rng):
    """bf16 in, bf16 out; with every ctx_len 0 the result is attention over the block alone."""
    q = torch.randn(2, 4, 4, 16, generator=rng)
    ctx = torch.randn(2, 2, 6, 16, generator=rng)
    blk_k, blk_v = (torch.randn(2, 2, 4, 16, generator=rng) for _ in range(2))
    no_prefix = torch.zeros(2, dtype=torch.int64)
    got = fused_ops.block_cross_attention(q, ctx, ctx, no_prefix, blk_k, blk_v)
    expected = _concat_attention(q, ctx[:, :, :0], ctx[:, :, :0], no_prefix, blk_k, blk_v)
    assert float((got - expected).abs().max()) < 1e-5
    half = fused_ops.block_cross_attention(q.bfloat16(), ctx.bfloat16(), ctx.bfloat16(),
                                           torch.tensor([6, 3]), blk_k.bfloat16(),
                                           blk_v.bfloat16())
    assert half.dtype == torch.bfloat16 and half.shape == q.shape


def _block(rows: int, width: int, committed: dict[int, list[int]]) -> torch.Tensor:
    block = torch.full((rows, width), MASK)
    for row, tokens in committed.items():
        block[row, :len(tokens)] = torch.tensor(tokens)
    return block


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_whole_block_of_steps_equals_the_policy_step_by_step(rng, temperature):
    logits = torch.randn(3, 8, 40, generator=rng) * 2
    seeds = torch.tensor([5, -1, 2**33 + 7])
    block = _block(3, 8, {1: [11, 12]})
    expected = block.clone()
    for step, steps_left in enumerate((4, 3, 2, 1)):
        logits = logits + torch.randn(logits.shape, generator=rng)
        block, conf, count = fused_ops.confidence_unmask(logits, block, MASK, 0.6, steps_left,
                                                         temperature, seeds, step)
        pred, c = policy.diffusion_predictions(logits, MASK, temperature, seeds, step)
        expected, expected_conf = policy.commit_step(expected, pred, c, MASK, 0.6, steps_left)
        assert torch.equal(block, expected) and torch.equal(conf, expected_conf)
        assert torch.equal(count, (expected == MASK).sum(-1))
    assert not (block == MASK).any()


def test_sampling_differs_from_greedy_and_follows_the_seed(rng):
    logits = torch.randn(2, 16, 50, generator=rng)  # flat: sampling rarely picks the argmax
    block = _block(2, 16, {})
    greedy, _, _ = fused_ops.confidence_unmask(logits, block, MASK, 0.0, 1)
    seeds = torch.tensor([1, 2])
    sampled, _, _ = fused_ops.confidence_unmask(logits, block, MASK, 0.0, 1, 1.0, seeds, 0)
    again, _, _ = fused_ops.confidence_unmask(logits, block, MASK, 0.0, 1, 1.0, seeds, 0)
    other, _, _ = fused_ops.confidence_unmask(logits, block, MASK, 0.0, 1, 1.0, seeds + 10, 0)
    assert torch.equal(sampled, again)
    assert not torch.equal(sampled, greedy) and not torch.equal(sampled, other)


def test_the_mask_token_is_never_predicted(rng):
    logits = torch.randn(2, 6, 30, generator=rng)
    logits[..., MASK] = 1e4  # by far the largest logit, yet suppressed
    for temperature in (0.0, 2.0):
        nxt, _, count = fused_ops.confidence_unmask(logits, _block(2, 6, {}), MASK, 0.5, 1,
                                                    temperature, torch.tensor([3, 4]), 9)
        assert not (nxt == MASK).any() and int(count.sum()) == 0


@pytest.mark.parametrize("steps_left,expected_commits", [(4, 2), (3, 3), (8, 1), (1, 7)])
def test_a_threshold_of_one_commits_the_minimum(rng, steps_left, expected_commits):
    """γ = 1: no probability exceeds it, so each row commits max(1, ceil(n / steps_left)) of
    its n = 7 masked positions (all of them on the last step), the most confident first."""
    logits = torch.randn(2, 8, 30, generator=rng) * 3
    block = _block(2, 8, {0: [20], 1: [21]})
    nxt, conf, count = fused_ops.confidence_unmask(logits, block, MASK, 1.0, steps_left)
    committed = (block == MASK) & (nxt != MASK)
    assert committed.sum(-1).tolist() == [expected_commits] * 2
    assert count.tolist() == [7 - expected_commits] * 2
    assert torch.equal(nxt[:, 0], block[:, 0]) and torch.isinf(conf[:, 0]).all()
    for row in range(2):
        chosen, left = conf[row][committed[row]], conf[row][(nxt[row] == MASK)]
        assert left.numel() == 0 or float(chosen.min()) >= float(left.max())
