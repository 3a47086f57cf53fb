"""ONNX → TensorRT network definition, the TwoTower passes over it, and its profiles.

Networks are strongly typed (the only kind TensorRT-RTX and TensorRT 11 build), so precision
comes from the graph's dtypes; the exporter already casts the router, the norms' reductions and
the Mamba dt/A/scan math to fp32, and ``check_precision`` proves it on the parsed network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

from .. import names
from ..config import TwoTowerConfig


class NetworkError(RuntimeError):
    """A graph TensorRT cannot parse, or a network that breaks a TwoTower precision rule."""


@dataclass(frozen=True)
class ProfileSpec:
    """One optimisation profile: min/opt/max of every dynamic input dimension."""

    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def parse_onnx(trt: ModuleType, builder: Any, path: Path, logger: Any) -> Any:
    """A strongly typed network from an ONNX file (external data resolved next to it)."""
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise NetworkError(f"TensorRT could not parse {path.name}: {errors}")
    return network, parser


def _layers(network: Any) -> list[Any]:
    return [network.get_layer(i) for i in range(network.num_layers)]


# Layers whose input must be fp32 (spec §8): reductions of norms and softmax, routing top-k,
# the scan's cumulative sums, softplus of dt.
FP32_LAYER_TYPES = ("TOPK", "REDUCE", "CUMULATIVE", "SOFTMAX")


def check_precision(trt: ModuleType, network: Any) -> int:
    """Raise naming any layer of the kinds above (or a softplus) that reads a narrower float
    than fp32; returns how many layers were checked."""
    wanted = {getattr(trt.LayerType, t) for t in FP32_LAYER_TYPES}
    narrow = {trt.float16, trt.bfloat16}
    checked = 0
    for layer in _layers(network):
        is_softplus = (layer.type == trt.LayerType.ACTIVATION and
                       _downcast(trt, layer).type == trt.ActivationType.SOFTPLUS)
        if layer.type not in wanted and not is_softplus:
            continue
        checked += 1
        source = layer.get_input(0)
        if source is not None and source.dtype in narrow:
            raise NetworkError(f"layer {layer.name!r} ({layer.type.name}) computes in "
                               f"{source.dtype}; TwoTower needs fp32 there (spec §8)")
    return checked


def _downcast(trt: ModuleType, layer: Any) -> Any:
    kinds = {trt.LayerType.ACTIVATION: trt.IActivationLayer,
             trt.LayerType.ATTENTION_INPUT: trt.IAttentionInputLayer,
             trt.LayerType.ATTENTION_OUTPUT: trt.IAttentionOutputLayer}
    if layer.type in kinds:
        layer.__class__ = kinds[layer.type]
    return layer


def mark_attention_decomposable(trt: ModuleType, network: Any) -> int:
    """fp32 attention has no fused kernel and fails to build unless it may be decomposed
    (tensorrt-rtx-notes §1): mark those; returns how many were marked."""
    marked = 0
    for layer in _layers(network):
        if layer.type != trt.LayerType.ATTENTION_OUTPUT:
            continue
        attention = _downcast(trt, layer).attention
        if attention.get_input(0).dtype == trt.float32 and not attention.decomposable:
            attention.decomposable = True
            marked += 1
    return marked


def name_layers(network: Any, graph: str) -> None:
    """Prefix every layer with its graph, keeping the exporter's scope ("context.layers.3.
    mamba/…"), so build logs and profiles read like the model."""
    for layer in _layers(network):
        if not layer.name.startswith(f"{graph}:"):
            layer.name = f"{graph}:{layer.name}"


def mark_outputs(network: Any, config: TwoTowerConfig, max_context: int, graph: str) -> None:
    """Every output of ``names.graph_io`` must be a network output (the parser marks them;
    this proves it and says which one is missing)."""
    _, outputs = names.graph_io(config, max_context, graph)
    present = {network.get_output(i).name for i in range(network.num_outputs)}
    missing = [s.name for s in outputs if s.name not in present]
    if missing:
        raise NetworkError(f"{graph}: outputs {missing} are not network outputs")


def profiles(config: TwoTowerConfig, graph: str, max_context: int, max_batch: int,
             block_size: int, max_prefill: int) -> list[ProfileSpec]:
    """Context: decode (T = 1), block commit (T = S) and prefill (T up to max_prefill).
    Denoiser: block steps (S fixed); mock-AR: one token."""
    inputs, _ = names.graph_io(config, max_context, graph)
    opt_batch = max(1, min(max_batch, 4))

    def shapes(length: tuple[int, int, int]) -> dict:
        out = {}
        for spec in inputs:
            if not spec.shape or names.BATCH not in spec.shape:
                continue
            dims = []
            for which in range(3):
                dims.append(tuple(
                    (1, opt_batch, max_batch)[which] if d == names.BATCH else
                    length[which] if d in (names.TOKENS, names.BLOCK) else d
                    for d in spec.shape))
            out[spec.name] = tuple(dims)
        return out

    if graph == names.CONTEXT_STEP:
        return [ProfileSpec("decode", shapes((1, 1, 1))),
                ProfileSpec("block", shapes((block_size,) * 3)),
                ProfileSpec("prefill", shapes((1, min(128, max_prefill), max_prefill)))]
    if graph == names.MOCK_AR_STEP:
        return [ProfileSpec("mock-ar", shapes((1, 1, 1)))]
    return [ProfileSpec("block", shapes((block_size,) * 3))]


def add_profiles(builder: Any, config: Any, specs: list[ProfileSpec]) -> None:
    for spec in specs:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in spec.shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)


def prepare_network(trt: ModuleType, builder: Any, logger: Any, path: Path, graph: str,
                    model_config: TwoTowerConfig, max_context: int,
                    register_plugins: Optional[Any] = None) -> tuple[Any, Any, dict]:
    """Parse and run every pass; returns (network, parser, pass report)."""
    if register_plugins is not None:
        register_plugins(trt)
    network, parser = parse_onnx(trt, builder, path, logger)
    report = {"fp32_layers_checked": check_precision(trt, network),
              "attention_marked_decomposable": mark_attention_decomposable(trt, network)}
    name_layers(network, graph)
    mark_outputs(network, model_config, max_context, graph)
    report["layers"] = network.num_layers
    return network, parser, report
