"""Weight quantisation: which GEMMs, which scales, which rounding (issue 19).

One home for the arithmetic, so the exported Q/DQ graphs and the fake-quantised reference
(``reference/quantized.py``) hold the very same codes and scales:

- **fp8**: E4M3 weights with one scale per output channel (amax / 448), activations quantised
  per tensor with a calibrated scale (input amax / 448), saturating, round-to-nearest-even.
- **int4-rtn**: symmetric signed int4 weights (codes −8…7, scale amax / 7) in blocks of
  ``block_size`` input channels, round-to-nearest-even; activations stay in the build dtype.
- **int4-awq**: int4-rtn of W / p, with the input multiplied by p first: p = 1/s per input
  channel, s = mean|x|^α (AWQ), α searched on calibration inputs for the least output error.

Scopes name the GEMMs that are quantised. The router, norms, the conv, the SSM scan, attention
itself (softmax, scores), the embeddings, the LM heads and the time conditioning never are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..config import ATTENTION, MAMBA, MLP, MOE, TwoTowerConfig

NONE, FP8, INT4_AWQ, INT4_RTN = "none", "fp8", "int4-awq", "int4-rtn"
MODES = (NONE, FP8, INT4_AWQ, INT4_RTN)
EXPERTS, EXPERTS_MAMBA, ALL_GEMMS = "experts", "experts+mamba", "all-gemms"
SCOPES = (EXPERTS, EXPERTS_MAMBA, ALL_GEMMS)
DEFAULT_BLOCK_SIZE = 128
FP8_MAX = 448.0            # largest finite float8_e4m3fn
INT4_MIN, INT4_MAX = -8, 7
AWQ_GRID = 20              # α in 0, 1/20, …, 1
AWQ_MAX_ROWS = 512         # calibration rows one AWQ search reads per GEMM

LINEAR_WEIGHT = re.compile(r"^(?:context|denoiser)_tower\.layers\.(?P<layer>\d+)\.mixer\."
                           r"(?P<path>.+)\.weight$")


class QuantizationError(ValueError):
    """A quantisation setting or calibration that cannot be applied (says what to change)."""


@dataclass(frozen=True)
class QuantRecipe:
    """What ``--quantize``, ``--quantize-scope`` and ``--quantize-block-size`` ask for."""

    mode: str = NONE
    scope: str = EXPERTS
    block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise QuantizationError(f"unknown quantisation {self.mode!r}; choose one of "
                                    f"{', '.join(MODES)}")
        if self.scope not in SCOPES:
            raise QuantizationError(f"unknown quantisation scope {self.scope!r}; choose one "
                                    f"of {', '.join(SCOPES)}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise QuantizationError(f"the int4 block size must be a positive integer, got "
                                    f"{self.block_size!r}")

    @property
    def enabled(self) -> bool:
        return self.mode != NONE

    @property
    def is_int4(self) -> bool:
        return self.mode in (INT4_AWQ, INT4_RTN)

    @property
    def needs_calibration(self) -> bool:
        """fp8 needs activation ranges, AWQ needs activations to choose its scales."""
        return self.mode in (FP8, INT4_AWQ)


def in_scope(name: str, config: TwoTowerConfig, scope: str) -> bool:
    """Whether the checkpoint weight ``name`` is a GEMM that ``scope`` quantises. experts: the
    routed and shared experts of every MoE layer; experts+mamba: also Mamba's in_proj and
    out_proj; all-gemms: also attention's q/k/v/o and dense MLPs. Never the router (``gate``)."""
    match = LINEAR_WEIGHT.match(name)
    if match is None:
        return False
    kind, path = config.layer_types[int(match["layer"])], match["path"]
    if kind == MOE:
        return path.startswith(("experts.", "shared_experts."))
    if kind == MAMBA:
        return scope != EXPERTS and path in ("in_proj", "out_proj")
    if kind in (ATTENTION, MLP):
        return scope == ALL_GEMMS and path.endswith("_proj")
    return False


def int4_block(width: int, block_size: int) -> int:
    """The block an input width of ``width`` channels is quantised in: ``block_size`` where it
    divides the width, else the largest power of two below it that does (TensorRT takes whole
    blocks only, and int4 GEMM kernels want power-of-two groups: the released routed experts'
    down_proj has 1856 = 14.5 × 128 = 29 × 64 inputs, so it gets 64)."""
    if width % block_size == 0:
        return block_size
    return max(1 << e for e in range(block_size.bit_length())
               if 1 << e <= block_size and width % (1 << e) == 0)


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """An all-zero block or channel gets scale 1: its codes are 0 either way."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def quantize_int4(weight: torch.Tensor, block: int, scale_dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] → (int8 codes in −8…7 [N, K], scales [N, K / block] in ``scale_dtype``).
    The scale is rounded to its storage dtype before the codes are taken against it."""
    w = weight.float()
    blocks = w.reshape(w.shape[0], -1, block)
    scales = _nonzero((blocks.abs().amax(-1) / INT4_MAX).to(scale_dtype))
    codes = torch.round(blocks / scales.float()[..., None]).clamp(INT4_MIN, INT4_MAX)
    return codes.reshape(w.shape).to(torch.int8), scales


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes × scale in fp32, as ONNX's blocked DequantizeLinear computes it."""
    block = codes.shape[-1] // scales.shape[-1]
    return codes.float() * scales.float().repeat_interleave(block, dim=-1)


def quantize_fp8(weight: torch.Tensor, scale_dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] → (float8_e4m3fn codes [N, K], one scale per output channel [N])."""
    w = weight.float()
    scales = _nonzero((w.abs().amax(-1) / FP8_MAX).to(scale_dtype))
    return to_fp8(w / scales.float()[:, None]), scales


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """Saturating round-to-nearest-even to E4M3, as ONNX QuantizeLinear (saturate=1) does:
    clamped here, not left to how a torch version casts values beyond ±448."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fake_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """QuantizeLinear → DequantizeLinear of an activation with a per-tensor scale, in x's dtype:
    x / scale in fp32, E4M3, times scale."""
    s = scale.float()
    return (to_fp8(x.float() / s).float() * s).to(x.dtype)


def activation_scale(amax: float, dtype: torch.dtype) -> torch.Tensor:
    """The per-tensor fp8 scale of an input whose calibrated range is ±amax."""
    return _nonzero(torch.tensor(amax / FP8_MAX, dtype=torch.float32).to(dtype))


def awq_pre_scale(weight: torch.Tensor, inputs: torch.Tensor, block: int,
                  grid: int = AWQ_GRID) -> torch.Tensor:
    """AWQ's per-input-channel factor p (fp32 [K]): the input is multiplied by p and W divided
    by it before int4 rounding, so salient channels (large mean |x|) keep more precision.
    s = mean|x|^α normalised to a geometric mean of 1 and p = 1/s, with α chosen on the
    calibration inputs for the least squared output error; α = 0 (plain RTN) wins ties and is
    the answer where a GEMM saw no input (an expert no calibration token routed to)."""
    w = weight.float()
    ones = torch.ones(w.shape[1])
    if inputs.numel() == 0:
        return ones
    x = inputs.float()
    reference = x @ w.t()
    mean = x.abs().mean(0).clamp(min=1e-6)
    best, best_error = ones, float("inf")
    for step in range(grid + 1):
        s = mean.pow(step / grid)
        s = s / (s.max() * s.min()).sqrt()
        p = 1.0 / s
        codes, scales = quantize_int4(w / p, block, torch.float32)
        error = float(((x * p) @ dequantize_int4(codes, scales).t() - reference).square().mean())
        if error < best_error:
            best, best_error = p, error
    return best


@dataclass(frozen=True)
class LinearStats:
    """What calibration learnt of one GEMM's input: its largest magnitude (fp8's activation
    scale) and, for AWQ, the per-channel pre-scale."""

    input_amax: float
    awq_pre_scale: Optional[torch.Tensor] = None


@dataclass
class Calibration:
    """Per quantised weight name, its input statistics, and how many prompts/tokens they came
    from. Saved beside the graphs so that the reference can be quantised exactly alike."""

    stats: dict[str, LinearStats]
    prompts: int
    tokens: int

    def save(self, path: Path) -> Path:
        from safetensors.torch import save_file

        tensors = {}
        for name, s in self.stats.items():
            tensors[f"{name}:input_amax"] = torch.tensor([s.input_amax], dtype=torch.float32)
            if s.awq_pre_scale is not None:
                tensors[f"{name}:awq_pre_scale"] = s.awq_pre_scale.float().contiguous()
        save_file(tensors, str(path), metadata={"prompts": str(self.prompts),
                                                "tokens": str(self.tokens)})
        return path

    @classmethod
    def load(cls, path: Path) -> "Calibration":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, SafetensorError) as err:
            raise QuantizationError(f"cannot read the calibration {path}: {err}; convert "
                                    "again") from err
        stats = {}
        for key, value in tensors.items():
            name, _, kind = key.rpartition(":")
            if kind == "input_amax":
                stats[name] = LinearStats(float(value[0]), tensors.get(f"{name}:awq_pre_scale"))
        return cls(stats, int(meta.get("prompts", 0)), int(meta.get("tokens", 0)))


@dataclass(frozen=True)
class QuantizedWeight:
    """One GEMM's weight as the graph stores it, in the checkpoint's [N, K] orientation:
    codes (int8 holding int4, or float8_e4m3fn), scales ([N, K/block] for int4, [N] for fp8),
    and the optional input pre-scale [K] (AWQ) or per-tensor input scale (fp8)."""

    codes: torch.Tensor
    scales: torch.Tensor
    pre_scale: Optional[torch.Tensor] = None
    input_scale: Optional[torch.Tensor] = None

    def dequantize(self) -> torch.Tensor:
        """The weight the graph's DequantizeLinear yields, in fp32."""
        if self.codes.dtype == torch.float8_e4m3fn:
            return self.codes.float() * self.scales.float()[:, None]
        return dequantize_int4(self.codes, self.scales)


def quantize_weight(weight: torch.Tensor, recipe: QuantRecipe, stats: Optional[LinearStats],
                    dtype: torch.dtype, name: str = "weight") -> QuantizedWeight:
    """The one quantisation of a weight [N, K], for the graph and the reference alike: scales
    and pre-scales are stored in ``dtype`` (the graph's), codes are taken against the stored
    values."""
    if recipe.needs_calibration and stats is None:
        raise QuantizationError(f"{name}: {recipe.mode} needs calibration statistics for it "
                                "and the calibration has none; calibrate again")
    if recipe.mode == FP8:
        codes, scales = quantize_fp8(weight, dtype)
        return QuantizedWeight(codes, scales, input_scale=activation_scale(stats.input_amax,
                                                                           dtype))
    if not recipe.is_int4:
        raise QuantizationError(f"{name}: quantisation mode {recipe.mode!r} stores no codes")
    block = int4_block(weight.shape[1], recipe.block_size)
    if recipe.mode == INT4_RTN:
        return QuantizedWeight(*quantize_int4(weight, block, dtype))
    pre = (stats.awq_pre_scale if stats.awq_pre_scale is not None
           else torch.ones(weight.shape[1])).to(device=weight.device, dtype=dtype)
    codes, scales = quantize_int4(weight.float() / pre.float(), block, dtype)
    return QuantizedWeight(codes, scales, pre_scale=pre)
