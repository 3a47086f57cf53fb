"""A small ONNX graph builder that streams weights to external data as they are added.

Each weight is written to the ``.onnx.data`` file the moment a layer emits it and only its
location is kept, so exporting a 30B tower holds one layer's tensors in memory at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Protocol, Sequence, Union

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ..names import BOOL, FLOAT32, INT64, MODEL, TensorSpec

OPSET = 24            # TensorScatter (native KV-cache update) and Attention-23/24
IR_VERSION = 10       # the newest IR that ONNX Runtime 1.2x/1.3x loads
CUSTOM_DOMAIN = "trt_twotower"
CUSTOM_OPSET = 1

TORCH_TO_ONNX = {torch.float32: TensorProto.FLOAT, torch.bfloat16: TensorProto.BFLOAT16,
                 torch.float16: TensorProto.FLOAT16, torch.int64: TensorProto.INT64,
                 torch.bool: TensorProto.BOOL, torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN}
ALIGN = 64  # byte alignment of each weight in the external data file

Value = str


class LinearQuantizer(Protocol):
    """What the layer emitters ask of a quantised export (``export/quantize.GraphQuantizer``)."""

    def covers(self, name: str) -> bool:
        """Whether the checkpoint weight ``name`` is exported quantised."""
        ...

    def linear(self, g: "GraphBuilder", x: Value, weight: torch.Tensor, name: str,
               bias: Optional[torch.Tensor]) -> Value:
        """x @ Wᵀ (+ b) through the weight's Q/DQ."""
        ...

    def stacked_matmul(self, g: "GraphBuilder", x: Value, weights: Sequence[torch.Tensor],
                       names: Sequence[str], name: str) -> Value:
        """x @ W_eᵀ for every expert e at once ([E, N, out]) through the stack's Q/DQ."""
        ...


class GraphBuilder:
    """Nodes, graph inputs/outputs and streamed initializers of one step graph."""

    def __init__(self, name: str, dtype: torch.dtype, data_path: Path) -> None:
        self.name = name
        self.dtype = dtype
        self.onnx_dtype = TORCH_TO_ONNX[dtype]
        self.data_path = data_path
        self._data = open(data_path, "wb")
        self._nodes: list[onnx.NodeProto] = []
        self._inputs: list[onnx.ValueInfoProto] = []
        self._outputs: list[onnx.ValueInfoProto] = []
        self._initializers: list[onnx.TensorProto] = []
        self._counter = 0
        self.uses_custom_domain = False
        self.scope = ""  # e.g. "context.layers.3.mamba": prefixes node names (readable layers)
        self.quantizer: Optional[LinearQuantizer] = None  # None: every GEMM in the graph dtype

    # --- values -------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}_{self._counter}"

    def input(self, spec: TensorSpec) -> Value:
        self._inputs.append(self._value_info(spec))
        return spec.name

    def output(self, value: Value, spec: TensorSpec) -> None:
        """Mark ``value`` as the graph output ``spec.name`` (an Identity renames it unless the
        value already carries that name, see ``op(names=...)``)."""
        if value != spec.name:
            self._nodes.append(helper.make_node("Identity", [value], [spec.name],
                                                name=f"output/{spec.name}"))
        self._outputs.append(self._value_info(spec))

    def _value_info(self, spec: TensorSpec) -> onnx.ValueInfoProto:
        elem = {MODEL: self.onnx_dtype, FLOAT32: TensorProto.FLOAT,
                INT64: TensorProto.INT64, BOOL: TensorProto.BOOL}[spec.dtype]
        return helper.make_tensor_value_info(spec.name, elem, list(spec.shape))

    def weight(self, name: str, tensor: torch.Tensor, dtype: Optional[torch.dtype] = None
               ) -> Value:
        """A parameter, cast to ``dtype`` (default: the graph's), written to external data."""
        t = tensor.detach().to(dtype or self.dtype).contiguous().cpu()
        return self.raw_weight(name, _raw_bytes(t), TORCH_TO_ONNX[t.dtype], t.shape)

    def raw_weight(self, name: str, raw: bytes, onnx_dtype: int, dims: Sequence[int]) -> Value:
        """A parameter given as its bytes in ONNX's layout (packed int4 has no torch dtype),
        written to external data."""
        offset = self._data.tell()
        pad = (-offset) % ALIGN
        if pad:
            self._data.write(b"\0" * pad)
            offset += pad
        self._data.write(raw)
        proto = TensorProto()
        proto.name = name
        proto.data_type = onnx_dtype
        proto.dims.extend(dims)
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_path.name), ("offset", str(offset)),
                           ("length", str(len(raw)))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        self._initializers.append(proto)
        return name

    def const(self, value: Union[float, int, Sequence, np.ndarray], dtype: str = FLOAT32,
              hint: str = "const") -> Value:
        """A small constant embedded in the graph (shapes, axes, scalars)."""
        np_dtype = {FLOAT32: np.float32, INT64: np.int64, "bool": np.bool_}.get(dtype)
        if dtype == MODEL:
            array = torch.tensor(value, dtype=self.dtype)
            name = self.fresh(hint)
            proto = helper.make_tensor(name, self.onnx_dtype, list(array.shape),
                                       _raw_bytes(array), raw=True)
        else:
            array = np.asarray(value, dtype=np_dtype)
            name = self.fresh(hint)
            proto = onnx.numpy_helper.from_array(array, name)
        self._nodes.append(helper.make_node("Constant", [], [name], value=proto,
                                            name=f"const/{name}"))
        return name

    # --- nodes ----------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: Optional[Value], outputs: int = 1,
           domain: str = "", hint: Optional[str] = None,
           names: Optional[Sequence[str]] = None, **attrs: object
           ) -> Union[Value, list[Value]]:
        """Add a node; ``names`` gives its outputs fixed names (graph outputs that must be the
        node's own, e.g. TensorRT's in-place KV-cache update)."""
        names = list(names) if names else [self.fresh(hint or op_type.lower())
                                           for _ in range(outputs)]
        node_name = self.fresh(f"{self.scope}/{hint or op_type}" if self.scope
                               else hint or op_type)
        self._nodes.append(helper.make_node(op_type, ["" if i is None else i for i in inputs],
                                            names, name=node_name, domain=domain, **attrs))
        if domain == CUSTOM_DOMAIN:
            self.uses_custom_domain = True
        return names[0] if outputs == 1 else names

    # --- file -------------------------------------------------------------------------------
    def save(self, path: Path) -> Path:
        """Write the graph next to its data file and close the data file."""
        self._data.close()
        graph = helper.make_graph(self._nodes, self.name, self._inputs, self._outputs,
                                  self._initializers)
        opsets = [helper.make_opsetid("", OPSET)]
        if self.uses_custom_domain:
            opsets.append(helper.make_opsetid(CUSTOM_DOMAIN, CUSTOM_OPSET))
        model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION,
                                  producer_name="trt-twotower")
        onnx.save(model, str(path))
        return path


def _raw_bytes(t: torch.Tensor) -> bytes:
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().tobytes()
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().tobytes()
    return t.numpy().tobytes()
