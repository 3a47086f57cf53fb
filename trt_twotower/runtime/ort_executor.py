"""ONNX Runtime as a tower executor: runs the very graphs TensorRT compiles, on a CPU.

The context step's graph returns whole updated caches (TensorScatter); they are copied back
into the session's cache so that the cache object stays the one source of state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import names
from ..config import TwoTowerConfig
from .cache import StepCache
from .executor import BackendUnavailable
from .feeds import context_feeds, denoiser_feeds


def _session(path: Path, plugin_ops: bool):
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise BackendUnavailable("the onnxruntime backend needs `pip install onnxruntime`") \
            from err
    if not path.is_file():
        raise FileNotFoundError(f"no graph at {path}; run `trt-twotower convert` first")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # TensorScatter's "copying past cache" notice is expected
    # ONNX Runtime fuses a blocked int4 DequantizeLinear → MatMul into MatMulNBits, whose
    # default accuracy level (4) rounds the activations to int8; level 1 computes in fp32, as
    # the graph says (docs/quantization.md). Graphs without int4 weights are unaffected.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    if plugin_ops:
        from .ort_custom_ops import register
        options.register_custom_ops_library(register())
    from onnxruntime.capi import onnxruntime_pybind11_state as failed

    from ..manifest import ManifestError
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except (failed.Fail, failed.InvalidGraph, failed.InvalidProtobuf, failed.NoSuchFile,
            failed.RuntimeException) as err:
        # A truncated or garbled graph or .onnx.data fails deep inside ONNX Runtime.
        cause = str(err).strip().splitlines()[0].rstrip(".")
        raise ManifestError(f"ONNX Runtime cannot load {path} with its external data: {cause}; "
                            "the files are truncated or corrupt: run `trt-twotower convert` "
                            "again") from None


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


class _GraphRunner:
    """One ONNX graph: feeds by name, returns outputs by name."""

    def __init__(self, path: Path, plugin_ops: bool) -> None:
        self.session = _session(path, plugin_ops)
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = self.input_names - feeds.keys()
        if missing:
            raise ValueError(f"graph inputs not fed: {sorted(missing)}")
        arrays = {n: _numpy(v) for n, v in feeds.items() if n in self.input_names}
        outs = self.session.run(None, arrays)
        return {n: torch.from_numpy(np.ascontiguousarray(o)) for n, o in
                zip(self.output_names, outs)}


class OrtContextExecutor:
    def __init__(self, graph_dir: Path, config: TwoTowerConfig, plugin_ops: bool = False) -> None:
        self.config = config
        self.device = torch.device("cpu")
        self.run = _GraphRunner(Path(graph_dir) / f"{names.CONTEXT_STEP}.onnx", plugin_ops)

    def context_step(self, input_ids: torch.Tensor, cache: StepCache) -> torch.Tensor:
        cache.check_room(input_ids.shape[1])
        out = self.run(context_feeds(input_ids, cache))
        c = self.config
        for i in c.attention_layers:
            cache.tensors[names.past_key(i)].copy_(out[names.present_key(i)])
            cache.tensors[names.past_value(i)].copy_(out[names.present_value(i)])
        for i in c.mamba_layers:
            cache.tensors[names.conv_state(i)].copy_(out[names.new_conv_state(i)])
            cache.tensors[names.ssm_state(i)].copy_(out[names.new_ssm_state(i)])
        cache.lengths += input_ids.shape[1]
        return out["logits"]


class OrtDenoiserExecutor:
    """The denoiser tower's one graph: block steps, the fused unmask step and mock-AR are its
    outputs and its ``modulated`` input (``names.denoiser_step_io``)."""

    def __init__(self, graph_dir: Path, config: TwoTowerConfig, plugin_ops: bool = False) -> None:
        self.config = config
        self.device = torch.device("cpu")
        self.run = _GraphRunner(Path(graph_dir) / f"{names.DENOISER_STEP}.onnx", plugin_ops)

    def denoiser_step(self, block_ids: torch.Tensor, t: torch.Tensor, cache: StepCache
                      ) -> torch.Tensor:
        return self.run(denoiser_feeds(block_ids, t, True, cache))["logits"]

    def mock_ar_step(self, token_ids: torch.Tensor, cache: StepCache) -> torch.Tensor:
        t = torch.zeros(token_ids.shape[0])
        return self.run(denoiser_feeds(token_ids, t, False, cache))["logits"][:, -1]

    def denoiser_unmask_step(self, block_ids: torch.Tensor, t: torch.Tensor, cache: StepCache,
                             threshold: float | torch.Tensor, steps_left: int | torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused greedy step: (next block, confidences, masked count)."""
        out = self.run(denoiser_feeds(block_ids, t, True, cache, threshold, steps_left))
        return out["next_block"], out["confidence"], out["masked_count"]

