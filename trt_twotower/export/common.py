"""Small ONNX emitters shared by every layer: linear maps, norms, activations, modulation.

Precision follows spec §8: norms reduce in fp32 and cast back; everything else computes in
the graph's dtype unless a caller casts.
"""

from __future__ import annotations

import torch

from ..names import INT64, MODEL
from .graph import GraphBuilder, Value

FLOAT = 1  # onnx.TensorProto.FLOAT


def cast_float(g: GraphBuilder, x: Value) -> Value:
    return g.op("Cast", x, to=FLOAT)


def cast_model(g: GraphBuilder, x: Value) -> Value:
    return g.op("Cast", x, to=g.onnx_dtype)


def linear(g: GraphBuilder, x: Value, weight: torch.Tensor, name: str,
           bias: torch.Tensor | None = None) -> Value:
    """x @ Wᵀ (+ b); the transposed weight is stored so the graph needs no Transpose. A weight
    the export quantises goes through its Q/DQ (``g.quantizer``)."""
    if g.quantizer is not None and g.quantizer.covers(name):
        return g.quantizer.linear(g, x, weight, name, bias)
    y = g.op("MatMul", x, g.weight(name, weight.t()), hint="linear")
    if bias is not None:
        y = g.op("Add", y, g.weight(name.replace(".weight", ".bias"), bias))
    return y


def silu(g: GraphBuilder, x: Value) -> Value:
    return g.op("Mul", x, g.op("Sigmoid", x))


def rms_norm(g: GraphBuilder, x: Value, weight: torch.Tensor, name: str, eps: float) -> Value:
    """weight ⊙ x / sqrt(mean(x²) + eps) in fp32, cast back (spec §2.2)."""
    xf = cast_float(g, x)
    mean_sq = g.op("ReduceMean", g.op("Mul", xf, xf), g.const([-1], INT64), keepdims=1)
    normed = g.op("Div", xf, g.op("Sqrt", g.op("Add", mean_sq, g.const(eps))))
    return cast_model(g, g.op("Mul", normed, g.weight(name, weight, torch.float32)))


def modulate(g: GraphBuilder, x: Value, shift: Value, scale: Value) -> Value:
    """x·(1 + scale) + shift (spec §4.1)."""
    return g.op("Add", g.op("Mul", x, g.op("Add", scale, g.const(1.0, MODEL))), shift)


def shape_of(g: GraphBuilder, x: Value, start: int, end: int | None = None) -> Value:
    """The dims [start, end) of x's shape as an int64 vector."""
    if end is None:
        return g.op("Shape", x, start=start)
    return g.op("Shape", x, start=start, end=end)


def reshape(g: GraphBuilder, x: Value, *parts: Value | list[int]) -> Value:
    """Reshape to the concatenation of shape vectors and literal dims."""
    pieces = [g.const(p, INT64) if isinstance(p, list) else p for p in parts]
    target = pieces[0] if len(pieces) == 1 else g.op("Concat", *pieces, axis=0)
    return g.op("Reshape", x, target)


def unsqueeze(g: GraphBuilder, x: Value, axes: list[int]) -> Value:
    return g.op("Unsqueeze", x, g.const(axes, INT64))


def squeeze(g: GraphBuilder, x: Value, axes: list[int]) -> Value:
    return g.op("Squeeze", x, g.const(axes, INT64))
