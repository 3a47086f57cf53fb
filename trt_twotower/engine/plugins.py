"""TensorRT plugin wrappers (IPluginV3 + IPluginCreatorV3One) for the two ``trt_twotower``
custom ops, calling the compiled kernels through ``kernel_library``.

The plugin names match the ONNX nodes the plugin lowering emits (domain ``trt_twotower``,
version 1), so TensorRT's ONNX parser finds these creators for them once
``register_plugins`` has run. Built with the module of the TensorRT flavour in use
(``engine.flavor``); nothing here runs a kernel until an engine executes on a GPU.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

NAMESPACE = "trt_twotower"
VERSION = "1"
ATTENTION = "BlockCrossAttention"
UNMASK = "ConfidenceUnmask"


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

        def get_capability_interface(self, kind: Any) -> Any:
            return self

        def clone(self) -> Any:
            copy = type(self)(self.fields)
            copy.shapes = list(self.shapes)
            return copy

        def configure_plugin(self, inputs: Any, outputs: Any) -> None:
            return None

        def on_shape_change(self, inputs: Any, outputs: Any) -> None:
            self.shapes = [tuple(d.dims) for d in inputs]

        def attach_to_context(self, context: Any) -> Any:
            return self.clone()

        def set_tactic(self, tactic: int) -> None:
            return None

        def get_valid_tactics(self) -> list[int]:
            return []

        def get_fields_to_serialize(self) -> Any:
            return trt.PluginFieldCollection([
                trt.PluginField(k, np.array([v], dtype=np.int64), trt.PluginFieldType.INT64)
                for k, v in sorted(self.fields.items())])

        def get_workspace_size(self, inputs: Any, outputs: Any) -> int:
            return 0

        def _library(self) -> Any:
            from .kernel_library import KernelLibrary
            return KernelLibrary().lib

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

        def enqueue(self, input_desc: list[Any], output_desc: list[Any], inputs: list[int],
                    outputs: list[int], workspace: int, stream: int) -> None:
            b, s, hq, d = input_desc[0].dims
            hkv, lmax = input_desc[1].dims[1], input_desc[1].dims[2]
            lib = self._library()
            size = lib.tt_block_cross_attention_workspace_bytes(b, s, hq, hkv, d, lmax)
            import torch
            scratch = torch.empty(size, dtype=torch.uint8, device="cuda")
            dtype = 2 if input_desc[0].type == trt.bfloat16 else 1
            code = lib.tt_block_cross_attention(*inputs, outputs[0], scratch.data_ptr(), size, b, s,
                                                hq, hkv, d, lmax, dtype, stream)
            if code:
                raise RuntimeError(f"{ATTENTION}: {lib.tt_error_string(code).decode()}")

    class ConfidenceUnmaskPlugin(_Base):
        """inputs logits [B,S,V], block [B,S], threshold [], steps_left [] →
        next_block [B,S], confidence [B,S] fp32, masked_count [B]."""
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

        def enqueue(self, input_desc: list[Any], output_desc: list[Any], inputs: list[int],
                    outputs: list[int], workspace: int, stream: int) -> None:
            import torch
            b, s, v = input_desc[0].dims
            torch.cuda.ExternalStream(stream).synchronize()
            lib = self._library()
            size = lib.tt_confidence_unmask_workspace_bytes(b, s, v)
            scratch = torch.empty(size, dtype=torch.uint8, device="cuda")
            dtypes = {trt.float32: 0, trt.float16: 1, trt.bfloat16: 2}
            host = _read_scalars(inputs[2], inputs[3])
            # The ONNX node is the greedy step (no temperature, no seeds): temperature 0.
            code = lib.tt_confidence_unmask(inputs[0], inputs[1], outputs[0], outputs[1],
                                            outputs[2], None, scratch.data_ptr(), size, b, s, v,
                                            self.fields["mask_token_id"], host[0], int(host[1]),
                                            0.0, 0, dtypes[input_desc[0].type], stream)
            if code:
                raise RuntimeError(f"{UNMASK}: {lib.tt_error_string(code).decode()}")

    def creator(plugin: type, field_names: tuple[str, ...]) -> type:
        class Creator(trt.IPluginCreatorV3One):
            def __init__(self) -> None:
                trt.IPluginCreatorV3One.__init__(self)
                self.name, self.plugin_namespace, self.plugin_version = (plugin.op_name,
                                                                         NAMESPACE, VERSION)
                self.field_names = trt.PluginFieldCollection(
                    [trt.PluginField(n, np.array([], dtype=np.int64), trt.PluginFieldType.INT64)
                     for n in field_names])

            def create_plugin(self, name: str, fields: Any, phase: Any) -> Any:
                return plugin({f.name: int(np.asarray(f.data).reshape(-1)[0]) for f in fields})
        return Creator

    return {ATTENTION: (BlockCrossAttentionPlugin, creator(BlockCrossAttentionPlugin, ())),
            UNMASK: (ConfidenceUnmaskPlugin, creator(ConfidenceUnmaskPlugin,
                                                     ("mask_token_id",)))}


def _read_scalars(threshold_ptr: int, steps_ptr: int) -> tuple[float, int]:
    """The two scalar inputs live in device memory: copy them to the host (the stream was
    synchronised by the caller)."""
    import ctypes

    cuda = ctypes.CDLL("libcudart.so")
    value, steps = ctypes.c_float(), ctypes.c_int64()
    device_to_host = 2
    cuda.cudaMemcpy(ctypes.byref(value), ctypes.c_void_p(threshold_ptr), 4, device_to_host)
    cuda.cudaMemcpy(ctypes.byref(steps), ctypes.c_void_p(steps_ptr), 8, device_to_host)
    return value.value, steps.value


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
