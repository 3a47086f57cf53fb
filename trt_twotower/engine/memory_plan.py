"""What each GPU holds when one engine per tower serves TwoTower, in bytes, before anything runs.

A 30B tower in bf16 nearly fills an 80 GB GPU, so whether a build's max batch × max context fits
is decided by a few GiB. The plan adds up, per device:

- weights: the tower's parameters as the exporter writes them, in the build dtype except the
  tensors it pins to fp32 (``ENGINE_FP32_SUFFIXES``);
- caches, preallocated by the runtime at max batch × max context (``names.context_cache_inputs``):
  the context tower's on its GPU and their mirror on the denoiser's GPU, which reads them;
- activations: the engine's one activation buffer, which its profiles' execution contexts share
  (runtime/trt_executor.py) and which the builder sizes for the largest profile: the builder's
  figure where a build reported one, else ``activation_estimate``;
- runtime buffers: per-step outputs the runtime allocates outside the engine (logits, the context
  step's new Mamba states, mock-AR's Mamba snapshot);
- a reserve for the CUDA context, kernel libraries and allocator slack (``RESERVE_BYTES``).

One device may hold both towers: then it holds both engines, the context cache and its mirror.
Quantised builds (``--quantize``) store their in-scope GEMMs as codes and scales
(``quantized_weight_bytes``); ``step_traffic`` says what a batch-1 step reads of them and the
step-time floor that HBM bandwidth sets (docs/quantization.md).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Mapping, Optional

from .. import names
from ..config import ATTENTION, MAMBA, MLP, MOE, TwoTowerConfig
from ..errors import TwoTowerError
from ..reference.quantization import (FP8, INT4_AWQ, MODES, NONE, QuantRecipe, in_scope,
                                      int4_block)

GIB = 1 << 30
MIB = 1 << 20
FP32 = 4
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
TOWERS = ("context", "denoiser")

# Checkpoint tensors the exporter writes in fp32 whatever the build dtype (spec §8): every RMSNorm
# weight (export/common.rms_norm and the Mamba gated norm), the Mamba dt/A/D parameters
# (export/mamba.py writes A = −exp(A_log)) and the MoE router (export/moe.py).
ENGINE_FP32_SUFFIXES = ("norm.weight", "norm_f.weight", ".A_log", ".dt_bias", ".D",
                        ".gate.weight", ".gate.e_score_correction_bias")

# CUDA context (about 0.5 GiB on Hopper), cuBLAS/TensorRT kernel images and the caching
# allocator's slack: an allowance, not a measurement.
RESERVE_BYTES = GIB

# Largest rows searched by ``largest_batch``; beyond it the table says "≥".
BATCH_SEARCH_LIMIT = 1 << 16


class MemoryPlanError(TwoTowerError, RuntimeError):
    """A plan that does not fit the GPU memory it was checked against."""


@dataclass(frozen=True)
class Gpu:
    """A GPU model by the memory CUDA lets a process allocate on it and its HBM bandwidth
    (NVIDIA's datasheet figure, bytes per second)."""

    label: str
    memory_bytes: int
    bandwidth: float


# Memory as CUDA reports it (torch ``total_memory``, cudaDeviceProp.totalGlobalMem), which is
# below nvidia-smi's total (H100 81,559 MiB, H200 143,771 MiB): see docs/memory-plan.md.
# Bandwidth: H100 SXM 3.35 TB/s, H200 4.8 TB/s.
GPUS = {
    "h100-80gb": Gpu("H100 80GB", 81_082 * MIB, 3.35e12),
    "h200-141gb": Gpu("H200 141GB", 143_156 * MIB, 4.8e12),
}

# Distinct routed experts a 16-token denoiser step touches per MoE layer (issue 19): 41 of 128
# measured on the nano-30b-a3b-slice with random routing, 60–90 reported with the real router;
# the plan brackets it with 41 and 69. An AR step touches ``num_experts_per_tok`` (6).
DENOISER_EXPERTS_TOUCHED = (41, 69)


@dataclass(frozen=True)
class TowerMemory:
    """One tower's share of its GPU."""

    tower: str
    weights: int
    fp32_weights: int           # the part of ``weights`` stored in fp32
    kv_cache: int
    mamba_state: int
    activations: int
    activations_reported: bool  # the builder's figure rather than the estimate
    runtime_buffers: int


@dataclass(frozen=True)
class GpuPlan:
    """One device: the towers it holds (with their caches or mirrors) and its reserve."""

    device: int
    towers: tuple[TowerMemory, ...]
    reserve: int

    def _sum(self, field: str) -> int:
        return sum(getattr(t, field) for t in self.towers)

    @property
    def role(self) -> str:
        """The device's job in words: context GPU, denoiser GPU, or GPU (both towers)."""
        return f"{self.towers[0].tower} GPU" if len(self.towers) == 1 else "GPU"

    @property
    def weights(self) -> int:
        return self._sum("weights")

    @property
    def fp32_weights(self) -> int:
        return self._sum("fp32_weights")

    @property
    def kv_cache(self) -> int:
        return self._sum("kv_cache")

    @property
    def mamba_state(self) -> int:
        return self._sum("mamba_state")

    @property
    def activations(self) -> int:
        return self._sum("activations")

    @property
    def runtime_buffers(self) -> int:
        return self._sum("runtime_buffers")

    @property
    def total(self) -> int:
        return (self.weights + self.kv_cache + self.mamba_state + self.activations
                + self.runtime_buffers + self.reserve)


@dataclass(frozen=True)
class MemoryPlan:
    """The settings a plan was made for (so it can be re-made at others) and its GPUs."""

    config: TwoTowerConfig
    dtype: str
    max_batch: int
    max_context: int
    block_size: int
    max_prefill: int
    context_device: int
    denoiser_device: int
    reserve_bytes: int
    gpus: tuple[GpuPlan, ...]
    quantization: Optional[QuantRecipe] = None


@dataclass(frozen=True)
class EngineActivation:
    """What a build says of one engine: its tower and the builder's "Total Activation Memory"
    (None or 0 where the build log reported none)."""

    tower: str
    activation_bytes: Optional[int]


def reported_activation(engines: Iterable[EngineActivation]) -> dict[str, int]:
    """Per tower, the builder-reported activation memory of its engines (one per tower; a build
    with several engines per tower holds each one's buffer). A tower with an engine that
    reported no figure is left out, so the plan estimates it."""
    totals: dict[str, int] = {}
    unknown = set()
    for e in engines:
        if not e.activation_bytes:
            unknown.add(e.tower)
        totals[e.tower] = totals.get(e.tower, 0) + (e.activation_bytes or 0)
    return {tower: total for tower, total in totals.items() if tower not in unknown}


# --- weights -----------------------------------------------------------------------------------

@lru_cache(maxsize=8)
def _checkpoint_shapes(config: TwoTowerConfig) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor's shape, built on meta once per config (seconds at 30B)."""
    from ..reference.loading import expected_shapes

    return expected_shapes(config)


@lru_cache(maxsize=8)
def tower_parameters(config: TwoTowerConfig) -> dict[str, tuple[int, int]]:
    """Per tower (all parameters, those the engine keeps in fp32), counted from the checkpoint
    shapes once per config: building the 30B model on meta takes seconds, searches re-plan often."""
    from ..reference.loading import TOWER_GROUPS

    shapes = _checkpoint_shapes(config)
    counts = {}
    for tower, prefixes in TOWER_GROUPS.items():
        mine = {n: math.prod(s) for n, s in shapes.items() if n.startswith(prefixes)}
        counts[tower] = (sum(mine.values()),
                         sum(v for n, v in mine.items() if n.endswith(ENGINE_FP32_SUFFIXES)))
    return counts


def weight_bytes(config: TwoTowerConfig, tower: str, dtype: str,
                 quantization: Optional[QuantRecipe] = None) -> tuple[int, int]:
    """(all weight bytes of the tower's engine, the fp32 part of them); a quantised build
    stores its in-scope GEMMs as ``quantized_weight_bytes`` plus one fp8 input scale per GEMM
    input (``activation_scales``)."""
    total, fp32 = tower_parameters(config)[tower]
    plain = (total - fp32) * DTYPE_BYTES[dtype] + fp32 * FP32
    if quantization is None or not quantization.enabled:
        return plain, fp32 * FP32
    return plain + _quantization_saving(config, tower, dtype, quantization), fp32 * FP32


@lru_cache(maxsize=64)
def _quantization_saving(config: TwoTowerConfig, tower: str, dtype: str,
                         quantization: QuantRecipe) -> int:
    """What quantisation adds to the tower's bytes (negative), once per setting: the fit
    searches re-plan hundreds of times."""
    item, change = DTYPE_BYTES[dtype], 0
    for shape in quantized_shapes(config, quantization.scope)[tower]:
        change += quantized_weight_bytes(shape, quantization, item) - math.prod(shape) * item
    if quantization.mode == FP8:
        change += activation_scales(config, quantization.scope)[tower] * item
    return change


def _tower_of(name: str) -> str:
    from ..reference.loading import TOWER_GROUPS

    return next(t for t, prefixes in TOWER_GROUPS.items() if name.startswith(prefixes))


@lru_cache(maxsize=32)
def quantized_shapes(config: TwoTowerConfig, scope: str) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Per tower, the shapes of the checkpoint weights ``scope`` quantises."""
    out: dict[str, list[tuple[int, ...]]] = {t: [] for t in TOWERS}
    for name, shape in _checkpoint_shapes(config).items():
        if in_scope(name, config, scope):
            out[_tower_of(name)].append(shape)
    return {t: tuple(v) for t, v in out.items()}


def quantized_weight_bytes(shape: tuple[int, ...], recipe: QuantRecipe, item: int) -> int:
    """One [N, K] GEMM weight as the exporter stores it: fp8 codes and a scale per output
    channel; int4 codes two per byte, a scale per block of ``int4_block`` inputs, and for AWQ
    a pre-scale per input channel. Scales in the build dtype (``item`` bytes)."""
    n, k = shape
    if recipe.mode == FP8:
        return n * k + n * item
    block = int4_block(k, recipe.block_size)
    return (n * k + 1) // 2 + n * (k // block) * item + (k * item if recipe.mode == INT4_AWQ
                                                         else 0)


def activation_scales(config: TwoTowerConfig, scope: str) -> dict[str, int]:
    """Per tower, the fp8 graphs' per-tensor input scales: one per quantised GEMM, except
    that a layer's routed experts share one per projection (one input tensor feeds them)."""
    counts = {t: 0 for t in TOWERS}
    for name in _checkpoint_shapes(config):
        if in_scope(name, config, scope) and (".experts." not in name
                                              or ".experts.0." in name):
            counts[_tower_of(name)] += 1
    return counts


# --- caches -------------------------------------------------------------------------------------

def cache_bytes(config: TwoTowerConfig, batch: int, max_context: int, dtype: str
                ) -> tuple[int, int]:
    """(KV cache, Mamba conv + SSM states) of ``batch`` rows, as ``StepCache.allocate`` lays
    them out: KV and conv state in the model dtype, SSM state in fp32."""
    kv_names = {f(i) for i in config.attention_layers for f in (names.past_key, names.past_value)}
    kv = mamba = 0
    for spec in names.context_cache_inputs(config, max_context):
        size = batch * math.prod(d for d in spec.shape if d != names.BATCH) * \
            (FP32 if spec.dtype == names.FLOAT32 else DTYPE_BYTES[dtype])
        if spec.name in kv_names:
            kv += size
        else:
            mamba += size
    return kv, mamba


# --- activations (estimate) ---------------------------------------------------------------------

def _moe(c: TwoTowerConfig, tokens: int, item: int) -> int:
    """The native lowering runs every expert on every token (export/moe.py): the squared-ReLU
    inner [E, N, I] in the model dtype and the expert outputs [E, N, hidden] cast to fp32."""
    shared = tokens * c.moe_shared_expert_intermediate_size * item * c.n_shared_experts
    return c.n_routed_experts * tokens * (c.moe_intermediate_size * item + c.hidden_size * FP32) \
        + shared


def _mamba(c: TwoTowerConfig, batch: int, length: int, item: int) -> int:
    """in_proj's output, then the chunked scan in fp32 over the length padded to whole chunks:
    B and C spread to every head, the intra-chunk decay/score products, the chunk states."""
    q = c.chunk_size
    padded = math.ceil(length / q) * q
    heads = c.mamba_num_heads
    scan = batch * padded * heads * (2 * c.ssm_state_size + 2 * q) * FP32
    states = 2 * batch * heads * (padded // q + 1) * c.mamba_head_dim * c.ssm_state_size * FP32
    return batch * length * c.in_proj_dim * item + scan + states


def _attention(c: TwoTowerConfig, tower: str, batch: int, length: int, max_context: int,
               item: int) -> int:
    """q and the output; the boolean mask over the keys; for the denoiser's native lowering, the
    context cache concatenated with the block's keys and values. A fused attention kernel keeps
    the score matrix out of memory (an unfused one adds batch × heads × length × keys × 4)."""
    keys = max_context + (length if tower == "denoiser" else 0)
    qo = 2 * batch * length * c.num_attention_heads * c.head_dim * item
    concat = (2 * batch * c.num_key_value_heads * keys * c.head_dim * item
              if tower == "denoiser" else 0)
    return qo + batch * length * keys + concat


def _head(c: TwoTowerConfig, tower: str, batch: int, length: int, item: int) -> int:
    """Logits in the model dtype and cast to fp32; the context step projects only the last
    position, the fused unmask step adds the masked logits and their exponentials (fp32)."""
    if tower == "context":
        return batch * c.vocab_size * (item + FP32)
    return batch * length * c.vocab_size * (item + 3 * FP32)


def activation_estimate(config: TwoTowerConfig, tower: str, dtype: str, batch: int,
                        max_context: int, block_size: int, max_prefill: int) -> int:
    """The tower engine's activation memory, estimated at its largest profile (context:
    ``max_prefill`` tokens; denoiser: a block) as the residual stream plus the largest
    working set of any one layer kind or the head, tensors counted as the ONNX graph writes them.
    An estimate for a build that has not run: TensorRT's fusions and memory reuse can only
    lower it; the builder's figure replaces it (``reported_activation``)."""
    c, item = config, DTYPE_BYTES[dtype]
    length = max(max_prefill, block_size) if tower == "context" else block_size
    tokens = batch * length
    kinds = {
        MOE: lambda: _moe(c, tokens, item),
        MLP: lambda: 2 * tokens * c.intermediate_size * item,
        MAMBA: lambda: _mamba(c, batch, length, item),
        ATTENTION: lambda: _attention(c, tower, batch, length, max_context, item),
    }
    largest = max([kinds[k]() for k in set(c.layer_types)] + [_head(c, tower, batch, length,
                                                                    item)])
    return tokens * c.hidden_size * (2 * item + FP32) + largest


def runtime_buffer_bytes(config: TwoTowerConfig, tower: str, batch: int, block_size: int,
                         mamba_state: int) -> int:
    """What the runtime allocates per step beside the engine: the context step's fp32 logits
    [B, V] and scratch for its new Mamba states; the denoiser's fp32 logits [B, S, V] and
    mock-AR's snapshot of the mirrored Mamba states."""
    length = 1 if tower == "context" else block_size
    return batch * length * config.vocab_size * FP32 + mamba_state


# --- the plan -----------------------------------------------------------------------------------

def _check_settings(dtype: str, sizes: Mapping[str, int], devices: Mapping[str, int]) -> None:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, value in devices.items():
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a GPU index (0 or more), got {value!r}")


def _tower_memory(config: TwoTowerConfig, tower: str, dtype: str, max_batch: int,
                  max_context: int, block_size: int, max_prefill: int,
                  activations: Optional[int], quantization: Optional[QuantRecipe]
                  ) -> TowerMemory:
    weights, fp32 = weight_bytes(config, tower, dtype, quantization)
    kv, mamba = cache_bytes(config, max_batch, max_context, dtype)
    reported = activations is not None
    if not reported:
        activations = activation_estimate(config, tower, dtype, max_batch, max_context,
                                          block_size, max_prefill)
    return TowerMemory(tower, weights, fp32, kv, mamba, activations, reported,
                       runtime_buffer_bytes(config, tower, max_batch, block_size, mamba))


def plan_memory(config: TwoTowerConfig, dtype: str, max_batch: int, max_context: int,
                block_size: int, max_prefill: int, context_device: int = 0,
                denoiser_device: int = 1,
                activation_bytes: Optional[Mapping[str, int]] = None,
                reserve_bytes: int = RESERVE_BYTES,
                quantization: Optional[QuantRecipe] = None) -> MemoryPlan:
    """Each GPU's memory at these build settings. ``activation_bytes`` maps a tower to its
    engine's builder-reported activation memory (``reported_activation``); towers it leaves
    out are estimated. ``quantization``: the build's ``--quantize`` recipe (None: none)."""
    _check_settings(dtype, {"max_batch": max_batch, "max_context": max_context,
                            "block_size": block_size, "max_prefill": max_prefill},
                    {"context_device": context_device, "denoiser_device": denoiser_device})
    if reserve_bytes < 0:
        raise ValueError(f"reserve_bytes must not be negative, got {reserve_bytes}")
    reported = dict(activation_bytes or {})
    devices = {"context": context_device, "denoiser": denoiser_device}
    towers = [_tower_memory(config, t, dtype, max_batch, max_context, block_size, max_prefill,
                            reported.get(t), quantization) for t in TOWERS]
    gpus = tuple(GpuPlan(d, tuple(t for t in towers if devices[t.tower] == d), reserve_bytes)
                 for d in sorted(set(devices.values())))
    return MemoryPlan(config, dtype, max_batch, max_context, block_size, max_prefill,
                      context_device, denoiser_device, reserve_bytes, gpus, quantization)


def _replan(plan: MemoryPlan, **changes: int) -> MemoryPlan:
    """The same plan at other settings; activations estimated (other settings are another
    build, which the builder has not reported on)."""
    settings = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)
                if f.name != "gpus"}
    return plan_memory(**{**settings, **changes})


def _largest(fits: Callable[[int], bool], high: int) -> int:
    """The largest n in [0, high] with fits(n), for a fits that holds up to some n, not after."""
    low = 0
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def _fits(plan: MemoryPlan, device: int, memory_bytes: int, max_batch: int,
          max_context: int) -> bool:
    return _gpu(_replan(plan, max_batch=max_batch, max_context=max_context),
                device).total <= memory_bytes


def largest_batch(plan: MemoryPlan, memory_bytes: int, max_context: int) -> dict[int, int]:
    """Per device, the most rows whose plan fits ``memory_bytes`` at ``max_context`` (0: none;
    ``BATCH_SEARCH_LIMIT``: that many or more)."""
    return {g.device: _largest(lambda b, d=g.device: b == 0 or _fits(plan, d, memory_bytes, b,
                                                                     max_context),
                               BATCH_SEARCH_LIMIT) for g in plan.gpus}


def largest_context(plan: MemoryPlan, memory_bytes: int, max_batch: int) -> dict[int, int]:
    """Per device, the longest max context that fits at ``max_batch`` rows, up to the model's
    ``max_position_embeddings`` (0: none)."""
    return {g.device: _largest(lambda n, d=g.device: n == 0 or _fits(plan, d, memory_bytes,
                                                                     max_batch, n),
                               plan.config.max_position_embeddings) for g in plan.gpus}


def _gpu(plan: MemoryPlan, device: int) -> GpuPlan:
    return next(g for g in plan.gpus if g.device == device)


def gib(n: int) -> str:
    """Bytes as GiB with two decimals: every figure the plan prints reads the same way."""
    return f"{n / GIB:,.2f}"


def _what_fits(plan: MemoryPlan, device: int, memory_bytes: int) -> str:
    """The settings to lower, with the largest values that fit this device."""
    batch = largest_batch(plan, memory_bytes, plan.max_context)[device]
    context = largest_context(plan, memory_bytes, plan.max_batch)[device]
    options = []
    if batch:
        options.append(f"--max-batch to {batch} (at max context {plan.max_context:,})")
    if context:
        options.append(f"--max-context to {context:,} (at max batch {plan.max_batch})")
    if not options:
        one_row = largest_context(plan, memory_bytes, 1)[device]
        options.append(f"--max-batch to 1 and --max-context to {one_row:,}" if one_row else
                       f"--max-prefill (now {plan.max_prefill}) and --block-size (now "
                       f"{plan.block_size}): even one row of one token does not fit")
    return "lower " + " or ".join(options)


def check_fits(plan: MemoryPlan, memory_bytes: int, gpu_label: str = "the GPU") -> None:
    """Raise ``MemoryPlanError`` naming the first GPU the plan overfills, by how much, and what
    to lower (with the largest batch and context that would fit instead)."""
    for gpu in plan.gpus:
        if gpu.total <= memory_bytes:
            continue
        where = (f"GPU {gpu.device} (both towers)" if len(gpu.towers) > 1
                 else f"the {gpu.role} (GPU {gpu.device})")
        need = (f"{where} needs {gib(gpu.total)} GiB but {gpu_label} has "
                f"{gib(memory_bytes)} GiB ({gib(gpu.total - memory_bytes)} GiB short)")
        fixed = gpu.weights + gpu.reserve
        if fixed > memory_bytes:
            raise MemoryPlanError(f"{need}: its weights and reserve alone need {gib(fixed)} GiB; "
                                  "use a GPU with more memory")
        raise MemoryPlanError(f"{need}: {_what_fits(plan, gpu.device, memory_bytes)}, or use a "
                              "GPU with more memory")


# --- bandwidth: what a batch-1 step reads --------------------------------------------------------

ROUTED_EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")


@dataclass(frozen=True)
class StepTraffic:
    """Bytes one batch-1 step moves through HBM: the weights it reads and the cache traffic."""

    weights: int
    caches: int

    @property
    def total(self) -> int:
        return self.weights + self.caches

    def floor_seconds(self, gpu: Gpu) -> float:
        """The step time HBM bandwidth alone allows (no kernel reaches the datasheet figure)."""
        return self.total / gpu.bandwidth


def _stored_bytes(name: str, shape: tuple[int, ...], config: TwoTowerConfig, dtype: str,
                  quantization: Optional[QuantRecipe]) -> int:
    """One checkpoint tensor as the engine stores it (``weight_bytes`` tensor by tensor)."""
    item = DTYPE_BYTES[dtype]
    if quantization is not None and quantization.enabled and in_scope(name, config,
                                                                      quantization.scope):
        return quantized_weight_bytes(shape, quantization, item)
    return math.prod(shape) * (FP32 if name.endswith(ENGINE_FP32_SUFFIXES) else item)


def step_traffic(config: TwoTowerConfig, tower: str, dtype: str,
                 quantization: Optional[QuantRecipe], tokens: int, experts_touched: int,
                 context: int) -> StepTraffic:
    """A batch-1 step of ``tokens`` tokens over ``context`` cached positions, for a MoE kernel
    that reads only the routed experts its tokens chose (``experts_touched`` per layer, plus
    the shared expert): every other weight once, ``tokens`` embedding rows, the KV cache read
    and the Mamba states read (and, for the context tower, written back). The native ONNX
    lowering runs every expert (export/moe.py), so it reads all the weights instead."""
    weights = 0
    for name, shape in _checkpoint_shapes(config).items():
        if _tower_of(name) != tower:
            continue
        expert = ROUTED_EXPERT_INDEX.search(name)
        if expert is not None and int(expert[1]) >= experts_touched:
            continue
        stored = _stored_bytes(name, shape, config, dtype, quantization)
        weights += (stored // shape[0] * tokens if name.endswith("embeddings.weight")
                    else stored)
    if quantization is not None and quantization.mode == FP8:
        weights += activation_scales(config, quantization.scope)[tower] * DTYPE_BYTES[dtype]
    kv, mamba = cache_bytes(config, 1, context, dtype)
    return StepTraffic(weights, kv + (2 if tower == "context" else 1) * mamba)


def format_traffic(config: TwoTowerConfig, dtype: str, scope: str, block_size: int,
                   context: int, block: int = 16,
                   gpus: tuple[Gpu, ...] = (GPUS["h100-80gb"], GPUS["h200-141gb"])) -> str:
    """Per quantisation mode: weights per GPU, the bytes an AR step (context tower, one token,
    top-k experts) and a ``block``-token denoiser step (``DENOISER_EXPERTS_TOUCHED``) read at
    batch 1 over ``context`` cached tokens, and the step-time floor each GPU's bandwidth sets,
    as a Markdown table."""
    low, high = DENOISER_EXPERTS_TOUCHED
    header = (["quantization", "context GPU weights (GiB)", "denoiser GPU weights (GiB)",
               "AR step reads (GB)", f"denoiser step reads (GB, {low}–{high} experts)"]
              + [f"AR floor {g.label.split()[0]} (ms)" for g in gpus]
              + [f"denoiser floor {g.label.split()[0]} (ms)" for g in gpus])
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for mode in MODES:
        recipe = QuantRecipe(mode, scope, block_size)
        ar = step_traffic(config, "context", dtype, recipe, 1, config.num_experts_per_tok,
                          context)
        den = [step_traffic(config, "denoiser", dtype, recipe, block, n, context)
               for n in (low, high)]
        cells = [mode if mode != NONE else f"none ({dtype})",
                 gib(weight_bytes(config, "context", dtype, recipe)[0]),
                 gib(weight_bytes(config, "denoiser", dtype, recipe)[0]),
                 f"{ar.total / 1e9:.2f}",
                 f"{den[0].total / 1e9:.2f}–{den[1].total / 1e9:.2f}"]
        cells += [f"{ar.floor_seconds(g) * 1e3:.2f}" for g in gpus]
        cells += [f"{den[0].floor_seconds(g) * 1e3:.2f}–{den[1].floor_seconds(g) * 1e3:.2f}"
                  for g in gpus]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- formatting ---------------------------------------------------------------------------------

def _gpu_header(gpu: GpuPlan) -> str:
    return f"{gpu.role} {gpu.device}"


def format_plan(plan: MemoryPlan, memory_bytes: Optional[int] = None,
                gpu_label: str = "GPU") -> str:
    """The plan as a Markdown table in GiB (readable in a terminal, pasteable into a report)."""
    reported = [t.activations_reported for g in plan.gpus for t in g.towers]
    activation = ("builder" if all(reported) else "estimate" if not any(reported)
                  else "builder/estimate")
    rows = [("weights", lambda g: g.weights),
            ("  of which fp32", lambda g: g.fp32_weights),
            ("KV cache", lambda g: g.kv_cache),
            ("Mamba state", lambda g: g.mamba_state),
            (f"activations ({activation})", lambda g: g.activations),
            ("runtime buffers", lambda g: g.runtime_buffers),
            ("CUDA context reserve", lambda g: g.reserve),
            ("**total**", lambda g: g.total)]
    if memory_bytes is not None:
        rows += [(f"{gpu_label} memory", lambda g: memory_bytes),
                 ("headroom", lambda g: memory_bytes - g.total)]
    lines = ["| GiB | " + " | ".join(_gpu_header(g) for g in plan.gpus) + " |",
             "|---|" + "---:|" * len(plan.gpus)]
    lines += [f"| {label} | " + " | ".join(gib(value(g)) for g in plan.gpus) + " |"
              for label, value in rows]
    return "\n".join(lines)


def describe_settings(plan: MemoryPlan) -> str:
    """The settings a plan is for, in one line, so a printed table says what it assumed."""
    c = plan.config
    where = (f"both towers on GPU {plan.context_device}"
             if plan.context_device == plan.denoiser_device else
             f"context tower on GPU {plan.context_device}, denoiser tower on GPU "
             f"{plan.denoiser_device} (with a mirror of the context caches)")
    return (f"{c.num_hidden_layers} layers ({c.hybrid_override_pattern}), {plan.dtype}, "
            f"max batch {plan.max_batch}, max context {plan.max_context:,}, block "
            f"{plan.block_size}, max prefill {plan.max_prefill}; {where}")


def format_largest(plan: MemoryPlan, memory_bytes: int, contexts: Iterable[int]) -> str:
    """The largest batch per max context, per GPU and for all of them, as a Markdown table."""
    header = ["max context"] + [_gpu_header(g) for g in plan.gpus]
    if len(plan.gpus) > 1:
        header.append("all GPUs")
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]

    def cell(n: int) -> str:
        return f"≥{n:,}" if n >= BATCH_SEARCH_LIMIT else f"{n:,}"

    for context in contexts:
        best = largest_batch(plan, memory_bytes, context)
        values = [best[g.device] for g in plan.gpus]
        if len(values) > 1:
            values.append(min(values))
        lines.append(f"| {context:,} | " + " | ".join(cell(v) for v in values) + " |")
    return "\n".join(lines)


def describe_largest_context(plan: MemoryPlan, memory_bytes: int) -> str:
    """The longest max context each GPU fits at the plan's max batch, in one line."""
    limit = plan.config.max_position_embeddings
    best = largest_context(plan, memory_bytes, plan.max_batch)
    parts = [f"{_gpu_header(g)}: {best[g.device]:,}"
             + (" (the model's limit)" if best[g.device] == limit else "") for g in plan.gpus]
    return f"largest max context at max batch {plan.max_batch}: " + ", ".join(parts)
