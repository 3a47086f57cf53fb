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
