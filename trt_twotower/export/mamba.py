"""The Mamba-2 mixer as ONNX (spec §2.3), one graph for any token count.

The SSD scan is written in its fully parallel chunked form: quadratic products inside chunks of
``chunk_size`` tokens and, between chunks, a second small segment-sum product over the chunk
states (the entering state of chunk 0 is the seeded state). Every op is a standard one that
ONNX Runtime runs and TensorRT maps (CumSum, Exp, MatMul, Where), with no loop, so the same
graph serves prefill, the denoiser's seeded block and single-token decode.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..config import TwoTowerConfig
from ..names import INT64
from .common import cast_float, cast_model, linear, reshape, silu, unsqueeze
from .graph import GraphBuilder, Value

Weights = Callable[[str], torch.Tensor]
INT64_MAX = np.iinfo(np.int64).max


def mamba_mixer(g: GraphBuilder, c: TwoTowerConfig, w: Weights, prefix: str, h: Value,
                conv_state: Value, ssm_state: Value) -> tuple[Value, Value, Value]:
    """h [B, T, hidden] → (out, new conv state, new SSM state), seeded from the states given."""
    zxbcdt = linear(g, h, w(prefix + "in_proj.weight"), prefix + "in_proj.weight")
    z, xbc, dt = g.op("Split", zxbcdt, g.const([c.d_inner, c.conv_dim, c.mamba_num_heads], INT64),
                      axis=-1, outputs=3)
    xbc, new_conv = _causal_conv(g, c, w, prefix, xbc, conv_state)
    x, B, C = g.op("Split", xbc, g.const([c.d_inner, c.n_groups * c.ssm_state_size,
                                          c.n_groups * c.ssm_state_size], INT64),
                   axis=-1, outputs=3)
    x = cast_float(g, reshape(g, x, [0, 0, c.mamba_num_heads, c.mamba_head_dim]))
    B = cast_float(g, reshape(g, B, [0, 0, c.n_groups, c.ssm_state_size]))
    C = cast_float(g, reshape(g, C, [0, 0, c.n_groups, c.ssm_state_size]))
    dt = g.op("Softplus", g.op("Add", cast_float(g, dt),
                               g.weight(prefix + "dt_bias", w(prefix + "dt_bias"), torch.float32)))
    lo, hi = c.time_step_limit
    if lo > 0.0 or hi < float("inf"):
        dt = g.op("Clip", dt, g.const(lo), g.const(min(hi, 3.0e38)))
    A = -torch.exp(w(prefix + "A_log").float())
    y, new_ssm = ssd_scan(g, c, x, dt, g.weight(prefix + "A", A, torch.float32), B, C, ssm_state)
    D = g.weight(prefix + "D", w(prefix + "D").float().reshape(-1, 1), torch.float32)
    y = g.op("Add", y, g.op("Mul", x, D))
    y = cast_model(g, reshape(g, y, [0, 0, c.d_inner]))
    y = _gated_norm(g, c, w, prefix, y, z)
    return linear(g, y, w(prefix + "out_proj.weight"), prefix + "out_proj.weight"), new_conv, \
        new_ssm


def _causal_conv(g: GraphBuilder, c: TwoTowerConfig, w: Weights, prefix: str, xbc: Value,
                 conv_state: Value) -> tuple[Value, Value]:
    """Depthwise causal conv seeded with the last K−1 raw inputs, then SiLU; also returns the
    new conv state (the last K−1 raw inputs of history + new tokens)."""
    history = g.op("Concat", conv_state, g.op("Transpose", xbc, perm=[0, 2, 1]), axis=2)
    new_state = g.op("Slice", history, g.const([-(c.conv_kernel - 1)], INT64),
                     g.const([INT64_MAX], INT64), g.const([2], INT64))
    bias = (g.weight(prefix + "conv1d.bias", w(prefix + "conv1d.bias"))
            if c.use_conv_bias else None)
    out = g.op("Conv", history, g.weight(prefix + "conv1d.weight", w(prefix + "conv1d.weight")),
               bias, group=c.conv_dim, kernel_shape=[c.conv_kernel])
    return silu(g, g.op("Transpose", out, perm=[0, 2, 1])), new_state


def _gated_norm(g: GraphBuilder, c: TwoTowerConfig, w: Weights, prefix: str, y: Value,
                z: Value) -> Value:
    """u = y ⊙ silu(z), RMS over each group of channels, × weight; fp32 (spec §2.3 step 6)."""
    u = g.op("Mul", cast_float(g, y), silu(g, cast_float(g, z)))
    grouped = reshape(g, u, [0, 0, c.n_groups, c.d_inner // c.n_groups])
    mean_sq = g.op("ReduceMean", g.op("Mul", grouped, grouped), g.const([-1], INT64), keepdims=1)
    normed = g.op("Div", grouped, g.op("Sqrt", g.op("Add", mean_sq, g.const(c.layer_norm_epsilon))))
    weight = g.weight(prefix + "norm.weight", w(prefix + "norm.weight"), torch.float32)
    return cast_model(g, g.op("Mul", reshape(g, normed, [0, 0, c.d_inner]), weight))


def ssd_scan(g: GraphBuilder, c: TwoTowerConfig, x: Value, dt: Value, A: Value, B: Value,
             C: Value, state: Value) -> tuple[Value, Value]:
    """x [B,T,H,P], dt [B,T,H], A [H], B/C [B,T,G,N], state [B,H,P,N] (all fp32) →
    (y without the D term [B,T,H,P], final state). Mirrors ``reference.ssd.ssd_chunked``."""
    q, heads, p = c.chunk_size, c.mamba_num_heads, c.mamba_head_dim
    length = g.op("Shape", x, start=1, end=2)
    pad = g.op("Mod", g.op("Sub", g.const([q], INT64), g.op("Mod", length, g.const([q], INT64))),
               g.const([q], INT64))

    def pad_time(t: Value, rank: int) -> Value:
        zeros_before, zeros_after = g.const([0] * rank, INT64), g.const([0] * (rank - 2), INT64)
        pads = g.op("Concat", zeros_before, g.const([0], INT64), pad, zeros_after, axis=0)
        return g.op("Pad", t, pads)

    def heads_major(t: Value, tail: list[int]) -> Value:
        """[B, Tp, H, *tail] → [B, H, c, Q, *tail]."""
        chunked = reshape(g, t, [0, -1, q, heads, *tail])
        return g.op("Transpose", chunked, perm=[0, 3, 1, 2, *range(4, 4 + len(tail))])

    def expand_groups(t: Value) -> Value:
        per = heads // c.n_groups
        t = g.op("Expand", unsqueeze(g, t, [3]), g.const([1, 1, 1, per, 1], INT64))
        return reshape(g, t, [0, 0, heads, c.ssm_state_size])

    xh = heads_major(pad_time(x, 4), [p])
    dth = heads_major(pad_time(dt, 3), [])
    Bh = heads_major(expand_groups(pad_time(B, 4)), [c.ssm_state_size])
    Ch = heads_major(expand_groups(pad_time(C, 4)), [c.ssm_state_size])

    a_cum = g.op("CumSum", g.op("Mul", dth, reshape(g, A, [heads, 1, 1])), g.const(3, INT64))
    diff = g.op("Sub", unsqueeze(g, a_cum, [4]), unsqueeze(g, a_cum, [3]))
    causal = g.const(np.tril(np.ones((q, q), dtype=bool)), "bool")
    decay = g.op("Exp", g.op("Where", causal, diff, g.const(-np.inf)))
    scores = g.op("MatMul", Ch, g.op("Transpose", Bh, perm=[0, 1, 2, 4, 3]))
    scores = g.op("Mul", g.op("Mul", scores, decay), unsqueeze(g, dth, [3]))
    y = g.op("MatMul", scores, xh)                                          # [B,H,c,Q,P]

    a_last = g.op("Gather", a_cum, g.const(-1, INT64), axis=3)              # [B,H,c]
    weight = g.op("Mul", g.op("Exp", g.op("Sub", unsqueeze(g, a_last, [3]), a_cum)), dth)
    xw = g.op("Mul", xh, unsqueeze(g, weight, [4]))
    chunk_states = g.op("MatMul", g.op("Transpose", xw, perm=[0, 1, 2, 4, 3]), Bh)  # [B,H,c,P,N]

    states = g.op("Concat", unsqueeze(g, state, [2]), chunk_states, axis=2)  # [B,H,c+1,P,N]
    cum = g.op("CumSum", g.op("Pad", a_last, g.const([0, 0, 1, 0, 0, 0], INT64)),
               g.const(2, INT64))                                             # [B,H,c+1]
    seg = g.op("Sub", unsqueeze(g, cum, [3]), unsqueeze(g, cum, [2]))
    n = g.op("Shape", cum, start=2, end=3)
    idx = g.op("Range", g.const(0, INT64), g.op("Squeeze", n), g.const(1, INT64))
    tril = g.op("GreaterOrEqual", unsqueeze(g, idx, [1]), unsqueeze(g, idx, [0]))
    chunk_decay = g.op("Exp", g.op("Where", tril, seg, g.const(-np.inf)))
    flat = reshape(g, states, [0, 0, 0, p * c.ssm_state_size])
    carried = g.op("MatMul", chunk_decay, flat)                              # [B,H,c+1,P·N]
    entering = g.op("Slice", carried, g.const([0], INT64), g.const([-1], INT64),
                    g.const([2], INT64))
    final = reshape(g, g.op("Gather", carried, g.const(-1, INT64), axis=2),
                    [0, 0, p, c.ssm_state_size])
    entering = reshape(g, entering, [0, 0, 0, p, c.ssm_state_size])
    y_prev = g.op("MatMul", Ch, g.op("Transpose", entering, perm=[0, 1, 2, 4, 3]))
    y = g.op("Add", y, g.op("Mul", y_prev, unsqueeze(g, g.op("Exp", a_cum), [4])))

    y = reshape(g, g.op("Transpose", y, perm=[0, 2, 3, 1, 4]), [0, -1, heads, p])
    y = g.op("Slice", y, g.const([0], INT64), length, g.const([1], INT64))
    return y, final

