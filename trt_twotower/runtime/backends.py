"""Open a pair of tower executors by backend name: the one place that knows which executor
classes exist, used by the CLI, the benchmarks and the Triton tower models."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import TwoTowerConfig
from .executor import BackendUnavailable, ContextExecutor, DenoiserExecutor

BACKENDS = ("torch", "onnxruntime", "tensorrt")


@dataclass
class OpenBackend:
    name: str
    context: ContextExecutor
    denoiser: DenoiserExecutor
    config: TwoTowerConfig
    tokenizer: Any
    max_context: int
    dtype: torch.dtype = torch.float32
    fused_unmask: bool = False


def open_torch(source: Any, max_context: int) -> OpenBackend:
    """The PyTorch reference of a loaded ``ModelSource`` (towers on their own devices)."""
    from .torch_executor import TorchContextExecutor, TorchDenoiserExecutor

    model = source.model
    return OpenBackend("torch", TorchContextExecutor(model), TorchDenoiserExecutor(model),
                       model.config, source.tokenizer, max_context, model.dtype)


def open_onnxruntime(build_dir: Path) -> OpenBackend:
    """The graphs ``trt-twotower convert`` wrote to ``build_dir``, on ONNX Runtime (CPU)."""
    from ..export.convert import load_manifest, uses_plugin_ops
    from ..tokenizer import load_tokenizer
    from .ort_executor import OrtContextExecutor, OrtDenoiserExecutor

    manifest = load_manifest(build_dir)
    if manifest["dtype"] != "float32":
        raise BackendUnavailable(
            f"{build_dir} holds {manifest['dtype']} graphs; ONNX Runtime on a CPU runs the "
            "float32 export (convert again with --dtype float32)")
    config = TwoTowerConfig.from_dict(manifest["config"])
    plugin = uses_plugin_ops(manifest)
    return OpenBackend("onnxruntime", OrtContextExecutor(build_dir, config, plugin),
                       OrtDenoiserExecutor(build_dir, config, plugin), config,
                       load_tokenizer(build_dir), manifest["max_context"], torch.float32,
                       fused_unmask=True)


def open_tensorrt(build_dir: Path, context_device: str, denoiser_device: str,
                  towers: tuple[str, ...] = ("context", "denoiser")) -> OpenBackend:
    """TensorRT engines from ``trt-twotower build``; needs a CUDA GPU and TensorRT. Only the
    engines of ``towers`` are loaded."""
    if not torch.cuda.is_available():
        raise BackendUnavailable("the tensorrt backend needs a CUDA GPU and TensorRT "
                                 "(`pip install tensorrt`); this machine has no GPU")
    from ..engine.executor import open_engines
    return open_engines(build_dir, context_device, denoiser_device, towers)
