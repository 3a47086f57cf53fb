"""The routed MoE and the squared-ReLU MLP as ONNX (spec §2.5, §2.6).

Routing: fp32 sigmoid scores (TensorRT has no fp64; the reference routes in fp64, so the two
can differ only where two experts' scores tie to within fp32 rounding), TopK on the biased
scores (ONNX orders ties by lower index, as the reference does), unbiased weights normalised
and scaled, scattered into a dense [tokens, experts] weight matrix.
Experts: the native lowering evaluates every expert on every token as one batched MatMul over
stacked weights and sums them under those weights in fp32. That costs E/k times the routed
arithmetic but reads each expert's weights once, which is what a decode or block step is bound
by; TensorRT's MoE layer does not build on these targets (see docs/edge-llm-interop.md).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config import TwoTowerConfig
from ..errors import TwoTowerError
from ..names import INT64
from .common import cast_float, cast_model, linear, reshape
from .graph import GraphBuilder, Value

Weights = Callable[[str], torch.Tensor]


class ExportError(TwoTowerError, ValueError):
    """A configuration or request the exporter cannot turn into a graph."""


def mlp(g: GraphBuilder, c: TwoTowerConfig, w: Weights, prefix: str, x: Value) -> Value:
    up = g.op("Relu", linear(g, x, w(prefix + "up_proj.weight"), prefix + "up_proj.weight"))
    return linear(g, g.op("Mul", up, up), w(prefix + "down_proj.weight"),
                  prefix + "down_proj.weight")


def moe(g: GraphBuilder, c: TwoTowerConfig, w: Weights, prefix: str, h: Value) -> Value:
    if c.n_group != 1:
        raise ExportError(f"group-limited routing (n_group={c.n_group}) is not exported; the "
                          "released model uses n_group=1")
    x = reshape(g, h, [-1, c.hidden_size])                                   # [N, hidden]
    logits = g.op("MatMul", cast_float(g, x),
                  g.weight(prefix + "gate.weight", w(prefix + "gate.weight").float().t(),
                           torch.float32))
    scores = g.op("Sigmoid", logits)
    bias = g.weight(prefix + "gate.e_score_correction_bias",
                    w(prefix + "gate.e_score_correction_bias"), torch.float32)
    _, chosen = g.op("TopK", g.op("Add", scores, bias), g.const([c.num_experts_per_tok], INT64),
                     axis=-1, largest=1, sorted=1, outputs=2)
    weights = g.op("GatherElements", scores, chosen, axis=1)
    if c.norm_topk_prob:
        total = g.op("ReduceSum", weights, g.const([-1], INT64), keepdims=1)
        weights = g.op("Div", weights, g.op("Add", total, g.const(1e-20)))
    weights = g.op("Mul", weights, g.const(c.routed_scaling_factor))
    dense = g.op("ScatterElements", g.op("Mul", scores, g.const(0.0)), chosen, weights, axis=1)

    inner = g.op("Relu", _experts_matmul(g, c, w, prefix, "up_proj", x))      # [E, N, I]
    expert_out = _experts_matmul(g, c, w, prefix, "down_proj",
                                 g.op("Mul", inner, inner))                  # [E, N, hidden]
    per_expert = g.op("Unsqueeze", g.op("Transpose", dense, perm=[1, 0]), g.const([2], INT64))
    routed = g.op("ReduceSum", g.op("Mul", cast_float(g, expert_out), per_expert),
                  g.const([0], INT64), keepdims=0)
    out = cast_model(g, routed)
    if c.n_shared_experts:
        out = g.op("Add", out, mlp(g, c, w, prefix + "shared_experts.", x))
    return g.op("Reshape", out, g.op("Shape", h))


def _experts_matmul(g: GraphBuilder, c: TwoTowerConfig, w: Weights, prefix: str, proj: str,
                    x: Value) -> Value:
    """x @ W_eᵀ for every routed expert e as one batched MatMul over the stacked [E, in, out]
    weights (through their Q/DQ where the export quantises the experts)."""
    names = [prefix + f"experts.{e}.{proj}.weight" for e in range(c.n_routed_experts)]
    if g.quantizer is not None and g.quantizer.covers(names[0]):
        return g.quantizer.stacked_matmul(g, x, [w(n) for n in names], names,
                                          prefix + f"experts.{proj}")
    stacked = torch.stack([w(n).t() for n in names])
    return g.op("MatMul", x, g.weight(prefix + f"experts.{proj}", stacked))
