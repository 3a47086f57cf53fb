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
from ..errors import TwoTowerError


class NetworkError(TwoTowerError, RuntimeError):
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
# the scan's cumulative sums and exponentials, softplus of dt.
FP32_LAYER_TYPES = ("TOPK", "REDUCE", "CUMULATIVE", "SOFTMAX")
FP32_UNARY_OPS = ("EXP",)
FP32_ACTIVATIONS = ("SOFTPLUS",)
# Parameters of the Mamba dt/A/D math and of the MoE router, by their checkpoint names.
FP32_WEIGHT_SUFFIXES = (".mixer.A", ".mixer.dt_bias", ".mixer.D", ".gate.weight",
                        ".gate.e_score_correction_bias")
# Layers a router's MatMul → Sigmoid → (+ bias) → TopK chain may pass through.
ROUTER_PASS_THROUGH = ("ELEMENTWISE", "ACTIVATION", "CAST", "SHUFFLE")


def _narrow(trt: ModuleType, tensor: Any) -> bool:
    return tensor is not None and tensor.dtype in (trt.float16, trt.bfloat16)


def _needs_fp32_input(trt: ModuleType, layer: Any, kind: Any) -> bool:
    if kind in {getattr(trt.LayerType, t) for t in FP32_LAYER_TYPES}:
        return True
    if kind == trt.LayerType.UNARY:
        return _downcast(trt, layer, kind).op.name in FP32_UNARY_OPS
    if kind == trt.LayerType.ACTIVATION:
        return _downcast(trt, layer, kind).type.name in FP32_ACTIVATIONS
    return False


def _router_chain(trt: ModuleType, producers: dict, kinds: dict, tensor: Any, depth: int = 8,
                  after_sigmoid: bool = False) -> Optional[list[Any]]:
    """The layers from a router's MatMul to the tensor a TopK reads, if it reads one (a
    Sigmoid between them is what tells a router from any other top-k)."""
    layer = producers.get(tensor.name)
    if layer is None or depth == 0:
        return None
    kind = kinds[id(layer)]
    if kind == trt.LayerType.MATRIX_MULTIPLY:
        return [layer] if after_sigmoid else None
    if kind.name not in ROUTER_PASS_THROUGH:
        return None
    sigmoid = (kind == trt.LayerType.ACTIVATION and
               _downcast(trt, layer, kind).type == trt.ActivationType.SIGMOID)
    for i in range(layer.num_inputs):
        source = layer.get_input(i)
        chain = None if source is None else _router_chain(
            trt, producers, kinds, source, depth - 1, after_sigmoid or sigmoid)
        if chain is not None:
            return chain + [layer]
    return None


def _fp32_error(layer: Any, what: str, dtype: Any) -> NetworkError:
    return NetworkError(f"layer {layer.name!r} ({layer.type.name}) {what} in {dtype}; "
                        "TwoTower needs fp32 there (spec §8): export with the fp32 casts")


def check_precision(trt: ModuleType, network: Any) -> int:
    """Raise naming the first layer that breaks spec §8's fp32 islands: the reductions, top-k,
    cumulative sums, exponentials and softplus above; every layer of a MoE router from its
    MatMul through the Sigmoid to the TopK; the Mamba A/dt/D and router parameters. Returns
    how many layers were checked."""
    layers = _layers(network)
    kinds = {id(layer): layer.type for layer in layers}
    producers = {layer.get_output(j).name: layer
                 for layer in layers for j in range(layer.num_outputs)}
    try:
        return _check_layers(trt, layers, kinds, producers)
    finally:
        _restore(trt, layers)


def _check_layers(trt: ModuleType, layers: list[Any], kinds: dict, producers: dict) -> int:
    checked = 0
    for layer in layers:
        kind = kinds[id(layer)]
        if kind == trt.LayerType.CONSTANT:
            if layer.name.endswith(FP32_WEIGHT_SUFFIXES):
                checked += 1
                if _narrow(trt, layer.get_output(0)):
                    raise _fp32_error(layer, "stores a Mamba/router parameter",
                                      layer.get_output(0).dtype)
            continue
        if _needs_fp32_input(trt, layer, kind):
            checked += 1
            if _narrow(trt, layer.get_input(0)):
                raise _fp32_error(layer, "computes", layer.get_input(0).dtype)
        if kind == trt.LayerType.TOPK:
            for link in _router_chain(trt, producers, kinds, layer.get_input(0)) or []:
                checked += 1
                for i in range(link.num_inputs):
                    if _narrow(trt, link.get_input(i)):
                        raise _fp32_error(link, "computes the MoE router",
                                          link.get_input(i).dtype)
    return checked


def _downcast(trt: ModuleType, layer: Any, kind: Any) -> Any:
    """The layer as its own class (the bindings hand out ILayer). This rebinds the Python
    wrapper, after which ``.type`` means the subclass's type: callers pass the LayerType they
    read before, and ``_restore`` undoes it when the pass ends."""
    kinds = {trt.LayerType.ACTIVATION: trt.IActivationLayer,
             trt.LayerType.UNARY: trt.IUnaryLayer,
             trt.LayerType.ATTENTION_INPUT: trt.IAttentionInputLayer,
             trt.LayerType.ATTENTION_OUTPUT: trt.IAttentionOutputLayer}
    if kind in kinds:
        layer.__class__ = kinds[kind]
    return layer


def _restore(trt: ModuleType, layers: list[Any]) -> None:
    for layer in layers:
        layer.__class__ = trt.ILayer


def mark_attention_decomposable(trt: ModuleType, network: Any) -> int:
    """fp32 attention has no fused kernel and fails to build unless it may be decomposed
    (tensorrt-rtx-notes §1): mark those; returns how many were marked."""
    marked = 0
    layers = _layers(network)
    for layer in layers:
        kind = layer.type
        if kind != trt.LayerType.ATTENTION_OUTPUT:
            continue
        attention = _downcast(trt, layer, kind).attention
        if attention.get_input(0).dtype == trt.float32 and not attention.decomposable:
            attention.decomposable = True
            marked += 1
    _restore(trt, layers)
    return marked


# Names the ONNX parser gives the layers it adds (shape arithmetic, broadcasts, casts) and the
# exporter's anonymous constants: they take the scope of the exporter node they sit among.
HELPER_NAME_PREFIXES = ("ONNXTRT_", "(Unnamed Layer", "const_")


def name_layers(network: Any, graph: str) -> None:
    """Prefix every layer with its graph and keep the exporter's scope ("context.layers.3.
    mamba/…"), giving the parser's helper layers the scope they sit in, so build logs and
    profiles read like the model."""
    scope = None
    for layer in _layers(network):
        name = layer.name.removeprefix(f"{graph}:")
        if name.startswith(HELPER_NAME_PREFIXES):
            if scope is not None:
                name = f"{scope}/{name}"
        elif "/" in name:
            scope = name.rsplit("/", 1)[0]
        layer.name = f"{graph}:{name}"


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
    Denoiser: block steps and the fused unmask step (S fixed), mock-AR (one token). Profiles
    of one engine share its weights; only the activation memory differs between them."""
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
    return [ProfileSpec("block", shapes((block_size,) * 3)),
            ProfileSpec("mock-ar", shapes((1, 1, 1)))]


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
