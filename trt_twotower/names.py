"""The one home of the step graphs' tensor names, dtypes and dynamic axes.

The exporter writes these names into the ONNX graphs, the executors feed and read them, and
engine manifests record them: every consumer asks this module instead of spelling a name.
Caches are preallocated to ``max_context`` positions with a valid length per row, so no shape
grows from step to step.

Dtypes: ``MODEL`` is the dtype the graph was exported in (fp32 for CPU parity, bf16/fp16 for
engines); SSM states and logits are always fp32 (spec §8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from .config import TwoTowerConfig

MODEL, FLOAT32, INT64, BOOL = "model", "float32", "int64", "bool"

# Symbolic axes: the runtime's profiles give them ranges.
BATCH, TOKENS, BLOCK = "batch", "tokens", "block"

# Graph files of one converted model: one per tower, so that an engine built from each holds
# its tower's weights once (every step type of a tower is a profile or an input of its graph).
CONTEXT_STEP = "context_step"
DENOISER_STEP = "denoiser_step"
GRAPHS = (CONTEXT_STEP, DENOISER_STEP)
TOWER_OF_GRAPH = {CONTEXT_STEP: "context", DENOISER_STEP: "denoiser"}

Dim = Union[str, int]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[Dim, ...]


def past_key(layer: int) -> str:
    return f"past_key.{layer}"


def past_value(layer: int) -> str:
    return f"past_value.{layer}"


def present_key(layer: int) -> str:
    return f"present_key.{layer}"


def present_value(layer: int) -> str:
    return f"present_value.{layer}"


def conv_state(layer: int) -> str:
    return f"conv_state.{layer}"


def ssm_state(layer: int) -> str:
    return f"ssm_state.{layer}"


def new_conv_state(layer: int) -> str:
    return f"new_conv_state.{layer}"


def new_ssm_state(layer: int) -> str:
    return f"new_ssm_state.{layer}"


def _cache_specs(c: TwoTowerConfig, max_context: int, key: callable, value: callable,
                 conv: callable, ssm: callable) -> list[TensorSpec]:
    kv_shape = (BATCH, c.num_key_value_heads, max_context, c.head_dim)
    specs = []
    for i in c.attention_layers:
        specs += [TensorSpec(key(i), MODEL, kv_shape), TensorSpec(value(i), MODEL, kv_shape)]
    for i in c.mamba_layers:
        specs += [TensorSpec(conv(i), MODEL, (BATCH, c.conv_dim, c.conv_kernel - 1)),
                  TensorSpec(ssm(i), FLOAT32,
                             (BATCH, c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size))]
    return specs


def context_cache_inputs(c: TwoTowerConfig, max_context: int) -> list[TensorSpec]:
    """The context tower's cache as fed to any step graph (the denoiser reads the same)."""
    return _cache_specs(c, max_context, past_key, past_value, conv_state, ssm_state)


def context_step_io(c: TwoTowerConfig, max_context: int
                    ) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Prefill (T tokens), block commit (T = S) and AR decode (T = 1): one graph."""
    inputs = [TensorSpec("input_ids", INT64, (BATCH, TOKENS)),
              TensorSpec("past_length", INT64, (BATCH,)),
              *context_cache_inputs(c, max_context)]
    outputs = [TensorSpec("logits", FLOAT32, (BATCH, c.vocab_size)),
               *_cache_specs(c, max_context, present_key, present_value, new_conv_state,
                             new_ssm_state)]
    return inputs, outputs


def denoiser_step_io(c: TwoTowerConfig, max_context: int
                     ) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The denoiser over a block, reading the context tower's cache (never writing it).

    One graph serves all three denoiser step types: a block step (logits), the fused greedy
    unmask step (the same logits through the confidence-unmask op) and mock-AR (one token
    over the cache one token back, ``modulated`` false: no adaLN shift, scale or gate). γ and
    the steps left are per row: rows of different requests, at different steps, share a call."""
    inputs = [TensorSpec("block_ids", INT64, (BATCH, BLOCK)),
              TensorSpec("t", FLOAT32, (BATCH,)),
              TensorSpec("modulated", BOOL, (BATCH,)),
              TensorSpec("past_length", INT64, (BATCH,)),
              *context_cache_inputs(c, max_context),
              TensorSpec("confidence_threshold", FLOAT32, (BATCH,)),
              TensorSpec("steps_left", INT64, (BATCH,))]
    outputs = [TensorSpec("logits", FLOAT32, (BATCH, BLOCK, c.vocab_size)),
               TensorSpec("next_block", INT64, (BATCH, BLOCK)),
               TensorSpec("confidence", FLOAT32, (BATCH, BLOCK)),
               TensorSpec("masked_count", INT64, (BATCH,))]
    return inputs, outputs


def graph_io(c: TwoTowerConfig, max_context: int, graph: str
             ) -> tuple[list[TensorSpec], list[TensorSpec]]:
    if graph == CONTEXT_STEP:
        return context_step_io(c, max_context)
    if graph == DENOISER_STEP:
        return denoiser_step_io(c, max_context)
    raise ValueError(f"unknown graph {graph!r}; known: {', '.join(GRAPHS)}")
