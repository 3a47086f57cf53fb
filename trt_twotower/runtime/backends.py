"""Open a pair of tower executors by backend name: the one place that knows which executor
classes exist, used by the CLI, the benchmarks and the Triton tower models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..manifest import Manifest, ManifestError, sha256_file
from .executor import BackendUnavailable, OpenBackend

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def open_torch(source: Any, max_context: int) -> OpenBackend:
    """The PyTorch reference of a loaded ``ModelSource`` (towers on their own devices)."""
    from .torch_executor import TorchContextExecutor, TorchDenoiserExecutor

    model = source.model
    return OpenBackend("torch", TorchContextExecutor(model), TorchDenoiserExecutor(model),
                       model.config, source.tokenizer, max_context, model.dtype)


def quantized_like(source: Any, build_dir: Path) -> Any:
    """The reference ``source`` (a loaded ``ModelSource``) fake-quantised in place exactly as
    ``build_dir``'s graphs are (the manifest's quantisation and the calibration file it names,
    checked against its digest), so parity compares like with like; unchanged for an
    unquantised build. Raises ManifestError or QuantizationError."""
    from ..reference.quantization import Calibration, QuantRecipe
    from ..reference.quantized import fake_quantize

    record = Manifest.load(build_dir).quantization
    if record is None:
        return source
    calibration = None
    if record.calibration_file is not None:
        path = Path(build_dir) / record.calibration_file
        if not path.is_file() or sha256_file(path) != record.calibration_sha256:
            raise ManifestError(f"{path} is missing or not the calibration this build was "
                                "quantised with: convert again")
        calibration = Calibration.load(path)
    fake_quantize(source.model, QuantRecipe(record.mode, record.scope, record.block_size),
                  calibration)
    return source


def open_onnxruntime(build_dir: Path) -> OpenBackend:
    """The graphs ``trt-twotower convert`` wrote to ``build_dir``, on ONNX Runtime (CPU)."""
    from ..tokenizer import load_tokenizer
    from .ort_executor import OrtContextExecutor, OrtDenoiserExecutor

    manifest = Manifest.load(build_dir)
    manifest.verify_graphs(build_dir)
    if manifest.dtype != "float32":
        raise BackendUnavailable(
            f"{build_dir} holds {manifest.dtype} graphs; ONNX Runtime on a CPU runs the "
            "float32 export (convert again with --dtype float32)")
    config, plugin = manifest.config, manifest.uses_plugin_ops
    return OpenBackend("onnxruntime", OrtContextExecutor(build_dir, config, plugin),
                       OrtDenoiserExecutor(build_dir, config, plugin), config,
                       load_tokenizer(build_dir), manifest.max_context, torch.float32,
                       fused_unmask=True)


def open_tensorrt(build_dir: Path, context_device: str, denoiser_device: str,
                  towers: tuple[str, ...] = ("context", "denoiser")) -> OpenBackend:
    """TensorRT engines from ``trt-twotower build``; needs a CUDA GPU and TensorRT. Only the
    engines of ``towers`` are loaded."""
    if not torch.cuda.is_available():
        raise BackendUnavailable("the tensorrt backend needs a CUDA GPU and TensorRT "
                                 "(`pip install tensorrt`); this machine has no GPU")
    from .trt_executor import open_engines
    return open_engines(build_dir, context_device, denoiser_device, towers)
