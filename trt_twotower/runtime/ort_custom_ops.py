"""The ``trt_twotower`` custom ops of the plugin lowering, registered with ONNX Runtime
through onnxruntime-extensions so that plugin graphs run on a CPU with the same definitions
(``trt_twotower.fused_ops``) the CUDA kernels are tested against."""

from __future__ import annotations

import numpy as np
import torch

from .. import fused_ops
from .executor import BackendUnavailable

_REGISTERED = False


def register() -> str:
    """Register both ops once; returns the extensions library path for SessionOptions."""
    global _REGISTERED
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError as err:
        raise BackendUnavailable("plugin-lowering graphs on ONNX Runtime need "
                                 "`pip install onnxruntime-extensions`") from err
    if _REGISTERED:
        return get_library_path()
    f, i64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64

    @onnx_op(op_type="trt_twotower::BlockCrossAttention", inputs=[f, f, f, i64, f, f],
             outputs=[f])
    def block_cross_attention(q, ctx_k, ctx_v, ctx_len, blk_k, blk_v):  # noqa: ANN001
        args = [torch.from_numpy(np.ascontiguousarray(a)) for a in
                (q, ctx_k, ctx_v, ctx_len, blk_k, blk_v)]
        return fused_ops.block_cross_attention(*args).numpy()

    @onnx_op(op_type="trt_twotower::ConfidenceUnmask", inputs=[f, i64, f, i64],
             outputs=[i64, f, i64], attrs={"mask_token_id": PyCustomOpDef.dt_int64})
    def confidence_unmask(logits, block, threshold, steps_left, **attrs):  # noqa: ANN001
        nxt, conf, count = fused_ops.confidence_unmask(
            torch.from_numpy(np.ascontiguousarray(logits)), torch.from_numpy(block),
            int(attrs["mask_token_id"]), torch.from_numpy(np.asarray(threshold)),
            torch.from_numpy(np.asarray(steps_left)))
        return nxt.numpy(), conf.numpy(), count.numpy()

    _REGISTERED = True
    return get_library_path()
