"""TensorRT plugin wrappers (IPluginV3 + IPluginCreatorV3One) for the two ``trt_twotower``
custom ops, calling the compiled kernels of ``plugin_library`` directly (no torch).

The plugin names match the ONNX nodes the plugin lowering emits (domain ``trt_twotower``,
version 1), so TensorRT's ONNX parser finds these creators for them once
``register_plugins`` has run. Built with the module of the TensorRT flavour in use
(``engine.flavor``); nothing here runs a kernel until an engine executes on a GPU.

Shapes the kernels cannot run are refused while the engine is built: ``check_plugin_shapes``
before parsing, and ``configure_plugin`` for each profile's actual ranges. Scratch memory is
TensorRT's workspace, sized by ``get_workspace_size`` for the profile's maximum shapes (the
launchers' sizes cover every smaller shape, twotower_plugins.h).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Sequence

import numpy as np

from ..config import TwoTowerConfig
from ..errors import TwoTowerError
from .plugin_library import (ATTENTION_HEAD_DIMS, MAX_BLOCK, MAX_UNMASK_POSITIONS,
                             load_plugin_library)

NAMESPACE = "trt_twotower"
VERSION = "1"
ATTENTION = "BlockCrossAttention"
UNMASK = "ConfidenceUnmask"


class PluginShapeError(TwoTowerError, ValueError):
    """A shape the plugin kernels do not handle, refused at build time."""


def _check_attention(head_dim: int, q_heads: int, kv_heads: int) -> None:
    if head_dim not in ATTENTION_HEAD_DIMS:
        raise PluginShapeError(f"{ATTENTION}: head size {head_dim} is not supported by the "
                               f"kernel; supported head sizes are {list(ATTENTION_HEAD_DIMS)}")
    if kv_heads <= 0 or q_heads % kv_heads:
        raise PluginShapeError(f"{ATTENTION}: {q_heads} query heads are not a multiple of "
                               f"{kv_heads} kv heads")


def _check_unmask(block_size: int, max_batch: int) -> None:
    if block_size > MAX_BLOCK:
        raise PluginShapeError(f"{UNMASK}: block size {block_size} exceeds the kernel's "
                               f"maximum of {MAX_BLOCK}; build with --block-size <= {MAX_BLOCK}")
    if max_batch * block_size > MAX_UNMASK_POSITIONS:
        raise PluginShapeError(f"{UNMASK}: batch {max_batch} x block size {block_size} exceeds "
                               f"the kernel's {MAX_UNMASK_POSITIONS} positions; lower --max-batch "
                               "or --block-size")


def check_plugin_shapes(config: TwoTowerConfig, block_size: int, max_batch: int) -> None:
    """Refuse, before any parsing, a model or build the plugin kernels cannot run: otherwise the
    engine builds and every launch fails on the GPU."""
    _check_attention(config.head_dim, config.num_attention_heads, config.num_key_value_heads)
    _check_unmask(block_size, max_batch)


def _static(desc: Any, axis: int, name: str) -> int:
    """A dimension a plugin needs fixed across the profile (head size, vocabulary)."""
    low, high = desc.min[axis], desc.max[axis]
    if low != high:
        raise PluginShapeError(f"{name} must be the same across the optimization profile, got "
                               f"{low}..{high}")
    return high


def _raise_on(lib: Any, code: int, op: str) -> None:
    if code:
        raise RuntimeError(f"{op}: {lib.tt_error_string(code).decode()} (code {code})")


def _plugin_classes(trt: ModuleType) -> dict[str, tuple[type, type]]:
    """Plugin and creator classes bound to one TensorRT module."""

    class _Base(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild,
                trt.IPluginV3OneRuntime):
        op_name = ""
        outputs = 1

        def __init__(self, fields: dict[str, Any]) -> None:
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_version = self.op_name, VERSION
            self.plugin_namespace, self.num_outputs = NAMESPACE, self.outputs
            self.fields = dict(fields)
            self.shapes: list[tuple[int, ...]] = []
            # A PluginField points into its array without holding it: the arrays must live as
            # long as the plugin, or the serialised value is whatever reuses their memory.
            self.field_arrays = {k: np.array([v], dtype=np.int64)
                                 for k, v in sorted(self.fields.items())}
            self.serialized = trt.PluginFieldCollection([
                trt.PluginField(k, data, trt.PluginFieldType.INT64)
                for k, data in self.field_arrays.items()])

        def get_capability_interface(self, kind: Any) -> Any:
            return self

        def clone(self) -> Any:
            copy = type(self)(self.fields)
            copy.shapes = list(self.shapes)
            return copy

        def on_shape_change(self, inputs: Any, outputs: Any) -> None:
            self.shapes = [tuple(d.dims) for d in inputs]

        def attach_to_context(self, context: Any) -> Any:
            return self.clone()

        def set_tactic(self, tactic: int) -> None:
            return None

        def get_valid_tactics(self) -> list[int]:
            return []

        def get_fields_to_serialize(self) -> Any:
            return self.serialized

    class BlockCrossAttentionPlugin(_Base):
        """inputs q [B,S,Hq,D], ctx_k, ctx_v [B,Hkv,L,D], ctx_len [B], blk_k, blk_v → [B,S,Hq,D]."""
        op_name = ATTENTION

        def get_output_data_types(self, input_types: list[Any]) -> list[Any]:
            return [input_types[0]]

        def get_output_shapes(self, inputs: list[Any], shape_inputs: Any, builder: Any
                              ) -> list[Any]:
            return [inputs[0]]

        def supports_format_combination(self, pos: int, desc: list[Any], num_inputs: int
                                        ) -> bool:
            d = desc[pos].desc
            if d.format != trt.TensorFormat.LINEAR:
                return False
            if pos == 3:
                return d.type == trt.int64
            return d.type in (trt.float16, trt.bfloat16) and d.type == desc[0].desc.type

        def configure_plugin(self, inputs: Sequence[Any], outputs: Any) -> None:
            """Build time, once per profile with its min/max: a raise fails the build."""
            _check_attention(_static(inputs[0], 3, f"{ATTENTION} head size"),
                             _static(inputs[0], 2, f"{ATTENTION} query heads"),
                             _static(inputs[1], 1, f"{ATTENTION} kv heads"))

        def get_workspace_size(self, inputs: Any, outputs: Any) -> int:
            b, s, hq, d = inputs[0].max
            return load_plugin_library().tt_block_cross_attention_workspace_bytes(
                b, s, hq, inputs[1].max[1], d, inputs[1].max[2])

        def enqueue(self, input_desc: list[Any], output_desc: list[Any], inputs: list[int],
                    outputs: list[int], workspace: int, stream: int) -> None:
            b, s, hq, d = input_desc[0].dims
            hkv, lmax = input_desc[1].dims[1], input_desc[1].dims[2]
            lib = load_plugin_library()
            # No larger than get_workspace_size's: the size grows with every dimension.
            size = lib.tt_block_cross_attention_workspace_bytes(b, s, hq, hkv, d, lmax)
            dtype = 2 if input_desc[0].type == trt.bfloat16 else 1
            _raise_on(lib, lib.tt_block_cross_attention(*inputs, outputs[0], workspace, size, b,
                                                        s, hq, hkv, d, lmax, dtype, stream),
                      ATTENTION)

    class ConfidenceUnmaskPlugin(_Base):
        """inputs logits [B,S,V], block [B,S], threshold [B], steps_left [B] (per row) →
        next_block [B,S], confidence [B,S] fp32, masked_count [B].

        threshold and steps_left reach the kernel as the device pointers TensorRT gives and are
        read there: reading them on the host would need the CUDA runtime found by name (pip and
        torch ship only versioned sonames), a copy and a stream synchronisation on every step,
        and would keep the engine out of CUDA graphs."""
        op_name = UNMASK
        outputs = 3

        def get_output_data_types(self, input_types: list[Any]) -> list[Any]:
            return [trt.int64, trt.float32, trt.int64]

        def get_output_shapes(self, inputs: list[Any], shape_inputs: Any, builder: Any
                              ) -> list[Any]:
            count = trt.DimsExprs(1)
            count[0] = inputs[1][0]
            return [inputs[1], inputs[1], count]

        def supports_format_combination(self, pos: int, desc: list[Any], num_inputs: int
                                        ) -> bool:
            d = desc[pos].desc
            wanted = {0: (trt.float32, trt.float16, trt.bfloat16), 1: (trt.int64,),
                      2: (trt.float32,),
                      3: (trt.int64,), 4: (trt.int64,), 5: (trt.float32,), 6: (trt.int64,)}
            return d.format == trt.TensorFormat.LINEAR and d.type in wanted[pos]

        def configure_plugin(self, inputs: Sequence[Any], outputs: Any) -> None:
            """Build time, once per profile with its min/max: a raise fails the build."""
            batch, block, _ = inputs[0].max
            _check_unmask(block, batch)
            vocab = _static(inputs[0], 2, f"{UNMASK} vocabulary")
            if not 0 <= self.fields["mask_token_id"] < vocab:
                raise PluginShapeError(f"{UNMASK}: mask token id {self.fields['mask_token_id']} "
                                       f"is outside the vocabulary of {vocab}")

        def get_workspace_size(self, inputs: Any, outputs: Any) -> int:
            b, s, v = inputs[0].max
            return load_plugin_library().tt_confidence_unmask_workspace_bytes(b, s, v)

        def enqueue(self, input_desc: list[Any], output_desc: list[Any], inputs: list[int],
                    outputs: list[int], workspace: int, stream: int) -> None:
            b, s, v = input_desc[0].dims
            lib = load_plugin_library()
            size = lib.tt_confidence_unmask_workspace_bytes(b, s, v)
            dtypes = {trt.float32: 0, trt.float16: 1, trt.bfloat16: 2}
            # The ONNX node is the greedy step (no temperature, no seeds): temperature 0.
            _raise_on(lib, lib.tt_confidence_unmask(
                inputs[0], inputs[1], outputs[0], outputs[1], outputs[2], None, workspace, size,
                b, s, v, self.fields["mask_token_id"], inputs[2], inputs[3], 0.0, 0,
                dtypes[input_desc[0].type], stream), UNMASK)

    def creator(plugin: type, field_names: tuple[str, ...]) -> type:
        class Creator(trt.IPluginCreatorV3One):
            def __init__(self) -> None:
                trt.IPluginCreatorV3One.__init__(self)
                self.name, self.plugin_namespace, self.plugin_version = (plugin.op_name,
                                                                         NAMESPACE, VERSION)
                # Kept alive with the creator, as the plugin keeps its fields' arrays.
                self.field_arrays = [np.array([], dtype=np.int64) for _ in field_names]
                self.field_names = trt.PluginFieldCollection(
                    [trt.PluginField(n, data, trt.PluginFieldType.INT64)
                     for n, data in zip(field_names, self.field_arrays)])

            def create_plugin(self, name: str, fields: Any, phase: Any) -> Any:
                return plugin({f.name: int(np.asarray(f.data).reshape(-1)[0]) for f in fields})
        return Creator

    return {ATTENTION: (BlockCrossAttentionPlugin, creator(BlockCrossAttentionPlugin, ())),
            UNMASK: (ConfidenceUnmaskPlugin, creator(ConfidenceUnmaskPlugin,
                                                     ("mask_token_id",)))}


_REGISTERED: dict[int, dict] = {}


def register_plugins(trt: ModuleType) -> dict[str, Any]:
    """Register both creators with this TensorRT module's registry (once per module)."""
    key = id(trt)
    if key not in _REGISTERED:
        registry = trt.get_plugin_registry()
        creators = {}
        for name, (_, creator_class) in _plugin_classes(trt).items():
            creator = creator_class()
            registry.register_creator(creator, NAMESPACE)
            creators[name] = creator
        _REGISTERED[key] = creators
    return _REGISTERED[key]
