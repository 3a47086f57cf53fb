"""Quantised step graphs: standard Q/DQ around the in-scope GEMMs, and the calibration that
chooses activation scales (fp8) and AWQ pre-scales (int4-awq). docs/quantization.md.

Layout in the graph (weights stored transposed, [in, out], as ``common.linear`` stores them):

- int4: the codes as an INT4 initializer (two per byte) and a DequantizeLinear with blocked
  scales along the input axis (``block_size``); for AWQ a Mul by the per-channel pre-scale on
  the GEMM's input first.
- fp8: the codes as FLOAT8E4M3FN with per-output-channel scales (per-axis DequantizeLinear; the
  stacked experts use one block spanning the input axis, i.e. a scale per expert and output
  channel), and the input through QuantizeLinear → DequantizeLinear with its calibrated
  per-tensor scale. All routed experts of a layer share one input scale per projection (one
  activation tensor feeds them).

Codes and scales come from ``reference.quantization.quantize_weight``, the function the
fake-quantised reference uses too.

Calibration runs each tower layer by layer (``streamed_tower``), so it holds one layer's weights
at a time, as the export does: the context tower over held-out windows, then the denoiser over
the next block, partly masked, on the context tower's caches.
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from onnx import TensorProto
from torch import nn

from ..config import TwoTowerConfig
from ..reference.cache import TowerCache
from ..reference.denoiser import denoise
from ..reference.loading import expected_shapes
from ..reference.model import TwoTowerModel
from ..reference.quantization import (AWQ_MAX_ROWS, INT4_AWQ, Calibration, LinearStats,
                                      QuantizationError, QuantizedWeight, QuantRecipe,
                                      awq_pre_scale, in_scope, int4_block, quantize_weight)
from .graph import GraphBuilder, Value

Weights = Callable[[str], torch.Tensor]
QUANTIZATION_FILE = "quantization.safetensors"
ROUTED_EXPERT = re.compile(r"^(?P<layer>.+\.experts\.)\d+(?P<proj>\..+)$")
HEADS = ("context_lm_head.", "lm_head.")   # calibration never reads the LM heads


def pack_int4(codes: torch.Tensor) -> bytes:
    """Signed int4 codes (int8 in −8…7) in ONNX's INT4 layout: two per byte, the first element
    in the low nibble, an odd count padded with a zero nibble."""
    nibbles = (codes.flatten().to(torch.int16) & 0xF).to(torch.uint8).numpy()
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


class GraphQuantizer:
    """Emits the in-scope GEMMs of a step graph through Q/DQ (``GraphBuilder.quantizer``)."""

    def __init__(self, config: TwoTowerConfig, recipe: QuantRecipe,
                 calibration: Optional[Calibration]) -> None:
        if recipe.needs_calibration and calibration is None:
            raise QuantizationError(f"{recipe.mode} needs calibration statistics")
        self.config, self.recipe, self.calibration = config, recipe, calibration

    def covers(self, name: str) -> bool:
        return self.recipe.enabled and in_scope(name, self.config, self.recipe.scope)

    def _quantize(self, g: GraphBuilder, weight: torch.Tensor, name: str) -> QuantizedWeight:
        stats = self.calibration.stats.get(name) if self.calibration is not None else None
        return quantize_weight(weight, self.recipe, stats, g.dtype, name)

    def linear(self, g: GraphBuilder, x: Value, weight: torch.Tensor, name: str,
               bias: Optional[torch.Tensor] = None) -> Value:
        q = self._quantize(g, weight, name)
        x = self._input(g, x, name, q.pre_scale, q.input_scale)
        y = g.op("MatMul", x, self._weight(g, name, q.codes.t(), _scales_t(q)), hint="linear")
        if bias is not None:
            y = g.op("Add", y, g.weight(name.replace(".weight", ".bias"), bias))
        return y

    def stacked_matmul(self, g: GraphBuilder, x: Value, weights: Sequence[torch.Tensor],
                       names: Sequence[str], name: str) -> Value:
        qs = [self._quantize(g, w, n) for w, n in zip(weights, names)]
        input_scale = qs[0].input_scale
        if input_scale is not None and any(not torch.equal(q.input_scale, input_scale)
                                           for q in qs):
            raise QuantizationError(f"{name}: the routed experts' input scales differ; their "
                                    "calibration must share one range per projection")
        pre = (torch.stack([q.pre_scale for q in qs])[:, None, :]
               if qs[0].pre_scale is not None else None)                     # [E, 1, in]
        x = self._input(g, x, name, pre, input_scale)
        codes = torch.stack([q.codes.t() for q in qs])                        # [E, in, out]
        scales = torch.stack([_scales_t(q) for q in qs])
        if qs[0].codes.dtype == torch.float8_e4m3fn:
            scales = scales[:, None, :]                                       # [E, 1, out]
        return g.op("MatMul", x, self._weight(g, name, codes, scales))

    def _input(self, g: GraphBuilder, x: Value, name: str, pre_scale: Optional[torch.Tensor],
               input_scale: Optional[torch.Tensor]) -> Value:
        """AWQ's Mul by the pre-scale, or fp8's QuantizeLinear → DequantizeLinear."""
        if pre_scale is not None:
            x = g.op("Mul", x, g.weight(f"{name}.pre_scale", pre_scale), hint="awq_pre_scale")
        if input_scale is not None:
            scale = g.weight(f"{name}.input_scale", input_scale)
            q = g.op("QuantizeLinear", x, scale, output_dtype=TensorProto.FLOAT8E4M3FN,
                     hint="quantize_input")
            x = g.op("DequantizeLinear", q, scale, hint="dequantize_input")
        return x

    def _weight(self, g: GraphBuilder, name: str, codes: torch.Tensor, scales: torch.Tensor
                ) -> Value:
        """The DequantizeLinear of transposed codes [.., in, out]: blocked along the input
        axis for int4 (and for fp8's stacked experts, one block), per output channel for fp8."""
        axis = codes.dim() - 2
        scale = g.weight(f"{name}.scale", scales)
        if codes.dtype == torch.float8_e4m3fn:
            stored = g.weight(name, codes, torch.float8_e4m3fn)
            if codes.dim() == 2:
                return g.op("DequantizeLinear", stored, scale, axis=1, hint="dequantize_weight")
            return g.op("DequantizeLinear", stored, scale, axis=axis,
                        block_size=codes.shape[axis], hint="dequantize_weight")
        stored = g.raw_weight(name, pack_int4(codes.contiguous()), TensorProto.INT4,
                              codes.shape)
        return g.op("DequantizeLinear", stored, scale, axis=axis,
                    block_size=codes.shape[axis] // scales.shape[axis], hint="dequantize_weight")


def _scales_t(q: QuantizedWeight) -> torch.Tensor:
    """int4 scales [out, blocks] → [blocks, out]; fp8's per-channel scales [out] as they are."""
    return q.scales.t() if q.scales.dim() == 2 else q.scales


# --- calibration ------------------------------------------------------------------------------

@contextlib.contextmanager
def streamed_tower(model: TwoTowerModel, tower: str, weights: Weights,
                   on_block: Callable[[int, nn.Module], None]) -> Iterator[None]:
    """Make ``model``'s ``tower`` (built on meta) runnable one layer at a time: a block's
    weights are read as its norm starts and dropped back to meta after its mixer, once
    ``on_block(i, block)`` has seen it. The tower's forward code is the reference's own."""
    handles = []
    for i, block in enumerate(getattr(model, tower).layers):
        prefix = f"{tower}.layers.{i}."

        def load(_module: nn.Module, _args: tuple, block: nn.Module = block,
                 prefix: str = prefix) -> None:
            block.load_state_dict({k: weights(prefix + k).float()
                                   for k in block.state_dict()}, assign=True)

        def release(_module: nn.Module, _args: tuple, _out: object, i: int = i,
                    block: nn.Module = block) -> None:
            on_block(i, block)
            block.to("meta")

        handles += [block.norm.register_forward_pre_hook(load),
                    block.mixer.register_forward_hook(release)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _load_outside_layers(model: TwoTowerModel, group: str, weights: Weights) -> None:
    """A tower group's tensors that are not in its layers (embeddings, final norm, time
    conditioning), in fp32; the LM heads stay on meta."""
    wanted = [n for n in expected_shapes(model.config, [group])
              if ".layers." not in n and not n.startswith(HEADS)]
    model.load_state_dict({n: weights(n).float() for n in wanted}, strict=False, assign=True)


class _StatsCollector:
    """Forward pre-hooks on a tower's in-scope linears: their inputs, turned into
    ``LinearStats`` when the block that holds them finishes."""

    def __init__(self, model: TwoTowerModel, tower: str, recipe: QuantRecipe) -> None:
        self.recipe = recipe
        self.stats: dict[str, LinearStats] = {}
        self._inputs: dict[str, list[torch.Tensor]] = {}
        self._linears: dict[int, dict[str, nn.Linear]] = {}
        for i, block in enumerate(getattr(model, tower).layers):
            found = {f"{tower}.layers.{i}.{path}.weight": module
                     for path, module in block.named_modules()
                     if isinstance(module, nn.Linear)
                     and in_scope(f"{tower}.layers.{i}.{path}.weight", model.config,
                                  recipe.scope)}
            self._linears[i] = found
            for name, module in found.items():
                module.register_forward_pre_hook(
                    lambda _m, args, name=name: self._inputs.setdefault(name, []).append(
                        args[0].detach().reshape(-1, args[0].shape[-1])))

    def finish_block(self, i: int, _block: nn.Module) -> None:
        for name, module in self._linears[i].items():
            seen = self._inputs.pop(name, [])
            x = torch.cat(seen) if seen else torch.empty(0, module.in_features)
            amax = float(x.abs().max()) if x.numel() else 0.0
            pre = None
            if self.recipe.mode == INT4_AWQ:
                rows = x[torch.linspace(0, len(x) - 1, min(len(x), AWQ_MAX_ROWS)).long()]
                pre = awq_pre_scale(module.weight, rows,
                                    int4_block(module.in_features, self.recipe.block_size))
            self.stats[name] = LinearStats(amax, pre)
        share_expert_ranges(self.stats, self._linears[i])


def share_expert_ranges(stats: dict[str, LinearStats], names: Sequence[str]) -> None:
    """One input range per projection of a layer's routed experts (the largest any of them
    saw): the stacked graph quantises their common input tensor once."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in names:
        match = ROUTED_EXPERT.match(name)
        if match:
            groups.setdefault((match["layer"], match["proj"]), []).append(name)
    for members in groups.values():
        amax = max(stats[n].input_amax for n in members)
        for n in members:
            stats[n] = LinearStats(amax, stats[n].awq_pre_scale)


def calibration_blocks(windows: torch.Tensor, block_size: int, mask_token_id: int,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each window's prefix (the context tower's prompt), its next block with 1…S positions
    masked in turn over the rows, and each row's t (its masked fraction)."""
    prefix, block = windows[:, :-block_size], windows[:, -block_size:].clone()
    gen = torch.Generator().manual_seed(seed)
    masked = 1 + torch.arange(len(windows)) % block_size
    order = torch.rand(block.shape, generator=gen).argsort(-1)
    block[order < masked[:, None]] = mask_token_id
    return prefix, block, masked.float() / block_size


@torch.no_grad()
def calibrate(config: TwoTowerConfig, weights: Weights, recipe: QuantRecipe,
              windows: torch.Tensor, block_size: int = 16) -> Calibration:
    """Statistics of every in-scope GEMM's input over ``windows`` [P, L] of token ids: the
    context tower reads each window's first L − block_size tokens, then the denoiser its last
    block, partly masked, on the caches the context tower left. In fp32, one layer at a time."""
    if windows.dim() != 2 or windows.shape[1] <= block_size:
        raise QuantizationError(f"calibration windows must be [prompts, length > {block_size}]"
                                f", got {tuple(windows.shape)}")
    with torch.device("meta"):
        model = TwoTowerModel(config)
    prefix, block, t = calibration_blocks(windows, block_size, config.mask_token_id)
    stats: dict[str, LinearStats] = {}
    cache = TowerCache.empty(config, len(windows), torch.float32)
    for tower, group in (("context_tower", "context"), ("denoiser_tower", "denoiser")):
        _load_outside_layers(model, group, weights)
        collector = _StatsCollector(model, tower, recipe)
        with streamed_tower(model, tower, weights, collector.finish_block):
            if tower == "context_tower":
                model.context_tower(prefix, cache)
            else:
                denoise(model.denoiser_tower, block, model.time_embedding(t),
                        model.scale_shift_tables, cache)
        stats.update(collector.stats)
    return Calibration(stats, len(windows), windows.numel())
