"""The quantised reference: the PyTorch model with every in-scope GEMM fake-quantised exactly as
the exported Q/DQ graph computes it (same codes, same scales, same rounding).

Each in-scope ``nn.Linear`` becomes a ``FakeQuantLinear`` holding its dequantised weight; the
rest of the model (router, norms, the SSM scan, attention, routing of tokens to experts) is
untouched, so parity of a quantised graph with this model is parity of the graph's arithmetic,
and the quality cost of quantisation is measured against the unquantised model separately.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from .model import TwoTowerModel
from .quantization import (Calibration, QuantizationError, QuantizedWeight, QuantRecipe,
                           fake_fp8, in_scope, quantize_weight)


class FakeQuantLinear(nn.Module):
    """y = (x · p) W_qᵀ + b for AWQ, y = fq(x) W_qᵀ + b for fp8, y = x W_qᵀ + b for int4-rtn,
    with W_q the dequantised codes (``QuantizedWeight.dequantize``) in the model's dtype."""

    def __init__(self, quantized: QuantizedWeight, bias: Optional[torch.Tensor],
                 dtype: torch.dtype) -> None:
        super().__init__()
        device = quantized.codes.device
        self.register_buffer("weight", quantized.dequantize().to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("pre_scale", None if quantized.pre_scale is None
                             else quantized.pre_scale.to(device=device, dtype=dtype))
        self.register_buffer("input_scale", None if quantized.input_scale is None
                             else quantized.input_scale.to(device))
        self.nudge = 0.0   # see ``rounding_nudge``

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_scale is not None:
            x = x * self.pre_scale
        if self.input_scale is not None:
            x = fake_fp8(x * (1.0 + self.nudge) if self.nudge else x, self.input_scale)
        return nn.functional.linear(x, self.weight, self.bias)


@torch.no_grad()
def fake_quantize(model: TwoTowerModel, recipe: QuantRecipe,
                  calibration: Optional[Calibration]) -> TwoTowerModel:
    """Replace, in place, every loaded in-scope linear of ``model`` by its fake-quantised twin
    (scales stored in the model's dtype, as the graph of that dtype stores them). Towers left on
    ``meta`` (not loaded) are skipped. Returns the model."""
    if not recipe.enabled:
        return model
    if recipe.needs_calibration and calibration is None:
        raise QuantizationError(f"{recipe.mode} needs the build's calibration "
                                "(quantization.safetensors); convert again")
    stats = calibration.stats if calibration is not None else {}
    for name, module in list(model.named_modules()):
        weight_name = f"{name}.weight"
        if (not isinstance(module, nn.Linear) or module.weight.is_meta
                or not in_scope(weight_name, model.config, recipe.scope)):
            continue
        quantized = quantize_weight(module.weight, recipe, stats.get(weight_name),
                                    module.weight.dtype, weight_name)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                FakeQuantLinear(quantized, module.bias, module.weight.dtype))
    return model


@contextlib.contextmanager
def rounding_nudge(model: TwoTowerModel, relative: float) -> Iterator[int]:
    """Scale every fp8-quantised activation by (1 + ``relative``) before it is rounded (the
    rounded value itself is unchanged unless it crosses an E4M3 rounding boundary). Two fp32
    executors differ in the last bits of an activation, so where one lies within a few ulps of
    a boundary they round it to neighbouring codes: this is the reference's own measure of how
    far such flips move the logits (``docs/quantization.md``, fp8 parity). Yields how many
    linears it nudges."""
    nudged = [m for m in model.modules()
              if isinstance(m, FakeQuantLinear) and m.input_scale is not None]
    for m in nudged:
        m.nudge = relative
    try:
        yield len(nudged)
    finally:
        for m in nudged:
            m.nudge = 0.0
