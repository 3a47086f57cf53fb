"""The two fused ops of the plugin lowering, as plain torch functions.

These are the definitions: the ONNX Runtime custom ops of the plugin graphs call them, and the
CUDA kernels in ``plugins/`` are tested against them. ``block_cross_attention`` never
concatenates the context cache with the block (it merges two softmax parts), and
``confidence_unmask`` is the decoding policy's step, nothing more.
"""

from __future__ import annotations

import math

import torch

from . import policy


def _part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unnormalised attention of q [B,Hkv,G,S,D] over k/v [B,Hkv,L,D] where ``valid`` [B,L]:
    (row max, sum of exp, exp-weighted values), all fp32."""
    scores = torch.einsum("bhgsd,bhld->bhgsl", q, k)
    scores = scores.masked_fill(~valid[:, None, None, None, :], float("-inf"))
    peak = scores.amax(-1, keepdim=True)
    safe_peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weights = torch.exp(scores - safe_peak)
    return safe_peak, weights.sum(-1, keepdim=True), torch.einsum("bhgsl,bhld->bhgsd", weights, v)


def block_cross_attention(q: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor,
                          ctx_len: torch.Tensor, blk_k: torch.Tensor, blk_v: torch.Tensor
                          ) -> torch.Tensor:
    """q [B,S,Hq,D] attends, unmasked, over the first ctx_len[b] positions of ctx_k/ctx_v
    [B,Hkv,Lmax,D] followed by blk_k/blk_v [B,Hkv,S,D]; GQA; scale 1/sqrt(D); fp32 inside,
    the result in q's dtype, [B,S,Hq,D]."""
    b, s, hq, d = q.shape
    hkv = ctx_k.shape[1]
    qf = q.float().permute(0, 2, 1, 3).reshape(b, hkv, hq // hkv, s, d) / math.sqrt(d)
    positions = torch.arange(ctx_k.shape[2], device=q.device)
    ctx_valid = positions[None] < ctx_len.to(q.device).long()[:, None]
    blk_valid = torch.ones(b, s, dtype=torch.bool, device=q.device)
    m1, l1, o1 = _part(qf, ctx_k.float(), ctx_v.float(), ctx_valid)
    m2, l2, o2 = _part(qf, blk_k.float(), blk_v.float(), blk_valid)
    peak = torch.maximum(m1, m2)
    a1, a2 = torch.exp(m1 - peak) * (l1 > 0), torch.exp(m2 - peak)
    out = (a1 * o1 + a2 * o2) / (a1 * l1 + a2 * l2)
    return out.reshape(b, hq, s, d).permute(0, 2, 1, 3).to(q.dtype)


def confidence_unmask(logits: torch.Tensor, block: torch.Tensor, mask_token_id: int,
                      threshold: float | torch.Tensor, steps_left: int | torch.Tensor,
                      temperature: float = 0.0,
                      seeds: torch.Tensor | None = None, step_key: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One diffusion step from logits [B,S,V]: (next block [B,S], confidences [B,S] with
    +inf at unmasked positions, masked positions left [B]). ``threshold`` and ``steps_left``
    are one value or one per row ([B])."""
    pred, conf = policy.diffusion_predictions(logits, mask_token_id, temperature, seeds,
                                              step_key)
    nxt, conf = policy.commit_step(block, pred.to(block.dtype), conf, mask_token_id, threshold,
                                   steps_left)
    return nxt, conf, (nxt == mask_token_id).sum(-1)
