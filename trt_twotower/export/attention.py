"""NoPE grouped-query attention as ONNX (spec §2.4, §4.3).

Context step: the new keys/values are written into the preallocated cache with TensorScatter
at each row's valid length (TensorRT maps it to its native KV-cache update layer), and the
standard Attention op reads the whole cache under a per-row causal mask.

Denoiser step: the block attends without a mask over the context cache's valid prefix followed
by its own keys/values. The native lowering concatenates and masks; the plugin lowering emits
one ``trt_twotower::BlockCrossAttention`` node that never materialises the concatenation.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config import TwoTowerConfig
from ..names import INT64
from .common import linear, reshape, unsqueeze
from .graph import CUSTOM_DOMAIN, GraphBuilder, Value

Weights = Callable[[str], torch.Tensor]
NATIVE, PLUGIN = "native", "plugin"
LOWERINGS = (NATIVE, PLUGIN)


def _project(g: GraphBuilder, c: TwoTowerConfig, w: Weights, prefix: str, h: Value
             ) -> tuple[Value, Value, Value]:
    """q [B, T, Hq, D] (token-major), k and v [B, Hkv, T, D] (head-major)."""
    def proj(name: str, heads: int) -> Value:
        bias = w(prefix + f"{name}.bias") if c.attention_bias else None
        y = linear(g, h, w(prefix + f"{name}.weight"), prefix + f"{name}.weight", bias)
        return reshape(g, y, [0, 0, heads, c.head_dim])

    q = proj("q_proj", c.num_attention_heads)
    k = g.op("Transpose", proj("k_proj", c.num_key_value_heads), perm=[0, 2, 1, 3])
    v = g.op("Transpose", proj("v_proj", c.num_key_value_heads), perm=[0, 2, 1, 3])
    return q, k, v


def _out_proj(g: GraphBuilder, c: TwoTowerConfig, w: Weights, prefix: str, attn_bshd: Value
              ) -> Value:
    bias = w(prefix + "o_proj.bias") if c.attention_bias else None
    flat = reshape(g, attn_bshd, [0, 0, c.num_attention_heads * c.head_dim])
    return linear(g, flat, w(prefix + "o_proj.weight"), prefix + "o_proj.weight", bias)


def context_attention(g: GraphBuilder, c: TwoTowerConfig, w: Weights, prefix: str, h: Value,
                      past_length: Value, past_k: Value, past_v: Value, max_context: int,
                      present_k_name: str, present_v_name: str) -> tuple[Value, Value, Value]:
    """Causal attention of T new tokens over the cache; returns (out, present k, present v)."""
    q, k, v = _project(g, c, w, prefix, h)
    # The updated caches are graph outputs straight from TensorScatter: TensorRT's KV-cache
    # update layer writes in place and requires its output to be a network output.
    present_k = g.op("TensorScatter", past_k, k, past_length, axis=2, names=[present_k_name])
    present_v = g.op("TensorScatter", past_v, v, past_length, axis=2, names=[present_v_name])
    tokens = g.op("Squeeze", g.op("Shape", h, start=1, end=2))
    query_limit = g.op("Add", unsqueeze(g, past_length, [1]),
                       unsqueeze(g, g.op("Range", g.const(1, INT64),
                                         g.op("Add", tokens, g.const(1, INT64)),
                                         g.const(1, INT64)), [0]))          # [B, T]
    positions = g.op("Range", g.const(0, INT64), g.const(max_context, INT64), g.const(1, INT64))
    mask = g.op("Less", positions, unsqueeze(g, query_limit, [2]))           # [B, T, Lmax]
    attn = g.op("Attention", g.op("Transpose", q, perm=[0, 2, 1, 3]), present_k, present_v,
                unsqueeze(g, mask, [1]))
    out = _out_proj(g, c, w, prefix, g.op("Transpose", attn, perm=[0, 2, 1, 3]))
    return out, present_k, present_v


def block_attention(g: GraphBuilder, c: TwoTowerConfig, w: Weights, prefix: str, h: Value,
                    past_length: Value, ctx_k: Value, ctx_v: Value, max_context: int,
                    lowering: str) -> Value:
    """The denoiser's block attention: no mask over [valid context prefix | block]."""
    q, k, v = _project(g, c, w, prefix, h)
    if lowering == PLUGIN:
        attn = g.op("BlockCrossAttention", q, ctx_k, ctx_v, past_length, k, v,
                    domain=CUSTOM_DOMAIN, hint="block_cross_attention")
        return _out_proj(g, c, w, prefix, attn)
    keys = g.op("Concat", ctx_k, k, axis=2)
    values = g.op("Concat", ctx_v, v, axis=2)
    block = g.op("Shape", h, start=1, end=2)
    total = g.op("Squeeze", g.op("Add", block, g.const([max_context], INT64)))
    positions = g.op("Range", g.const(0, INT64), total, g.const(1, INT64))
    in_prefix = g.op("Less", positions, unsqueeze(g, past_length, [1]))
    in_block = g.op("GreaterOrEqual", positions, g.const(max_context, INT64))
    mask = unsqueeze(g, g.op("Or", in_prefix, in_block), [1, 2])             # [B, 1, 1, L+S]
    mask = g.op("Expand", mask, g.op("Concat", g.const([1, 1], INT64), block,
                                     g.const([1], INT64), axis=0))            # [B, 1, S, L+S]
    attn = g.op("Attention", g.op("Transpose", q, perm=[0, 2, 1, 3]), keys, values, mask)
    return _out_proj(g, c, w, prefix, g.op("Transpose", attn, perm=[0, 2, 1, 3]))
