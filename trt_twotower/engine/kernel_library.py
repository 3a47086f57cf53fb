"""The compiled plugin library (``build_scripts/build_plugins.sh``) called through ctypes with
torch CUDA tensors: the harness of the GPU parity tests and benchmarks, and what the TensorRT
plugin wrappers call."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Optional

import torch

from .manifest import DEFAULT_PLUGIN_LIBRARY, PLUGIN_LIBRARY_ENV

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class KernelError(RuntimeError):
    """A launcher returned an error code, or its arguments are wrong."""


def library_path() -> Path:
    return Path(os.environ.get(PLUGIN_LIBRARY_ENV, DEFAULT_PLUGIN_LIBRARY))


class KernelLibrary:
    def __init__(self, path: Optional[Path] = None) -> None:
        path = Path(path or library_path())
        if not path.is_file():
            raise KernelError(f"no plugin library at {path}: run build_scripts/build_plugins.sh "
                              f"or set {PLUGIN_LIBRARY_ENV}")
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        p, i, i64, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
        self.lib.tt_error_string.restype = ctypes.c_char_p
        self.lib.tt_block_cross_attention_workspace_bytes.restype = i64
        self.lib.tt_block_cross_attention_workspace_bytes.argtypes = [i, i, i, i, i, i]
        self.lib.tt_block_cross_attention.restype = i
        self.lib.tt_block_cross_attention.argtypes = [p] * 8 + [i64] + [i] * 7 + [p]
        self.lib.tt_confidence_unmask_workspace_bytes.restype = i64
        self.lib.tt_confidence_unmask_workspace_bytes.argtypes = [i, i]
        self.lib.tt_confidence_unmask.restype = i
        self.lib.tt_confidence_unmask.argtypes = ([p] * 6 + [i64, i, i, i, i64, f, i64, f, i, p])

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise KernelError(f"{what}: {self.lib.tt_error_string(code).decode()} (code {code})")

    @staticmethod
    def _cuda(*tensors: torch.Tensor) -> None:
        for t in tensors:
            if not t.is_cuda or not t.is_contiguous():
                raise KernelError("kernel arguments must be contiguous CUDA tensors")

    def block_cross_attention(self, q: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor,
                              ctx_len: torch.Tensor, blk_k: torch.Tensor, blk_v: torch.Tensor,
                              out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Same contract as ``trt_twotower.fused_ops.block_cross_attention``."""
        self._cuda(q, ctx_k, ctx_v, ctx_len, blk_k, blk_v)
        b, s, hq, d = q.shape
        hkv, lmax = ctx_k.shape[1], ctx_k.shape[2]
        if ctx_len.dtype != torch.int64 or blk_k.shape != (b, hkv, s, d):
            raise KernelError("ctx_len must be int64 and blk_k [B, Hkv, S, D]")
        out = torch.empty_like(q) if out is None else out
        size = self.lib.tt_block_cross_attention_workspace_bytes(b, s, hq, hkv, d, lmax)
        workspace = torch.empty(size, dtype=torch.uint8, device=q.device)
        self._check(self.lib.tt_block_cross_attention(
            q.data_ptr(), ctx_k.data_ptr(), ctx_v.data_ptr(), ctx_len.data_ptr(),
            blk_k.data_ptr(), blk_v.data_ptr(), out.data_ptr(), workspace.data_ptr(), size,
            b, s, hq, hkv, d, lmax, DTYPE_CODES[q.dtype],
            torch.cuda.current_stream(q.device).cuda_stream), "block_cross_attention")
        return out

    def confidence_unmask(self, logits: torch.Tensor, block: torch.Tensor, mask_token_id: int,
                          threshold: float, steps_left: int, temperature: float = 0.0
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Same contract as ``trt_twotower.fused_ops.confidence_unmask`` (greedy)."""
        self._cuda(logits, block)
        b, s, v = logits.shape
        next_block = torch.empty_like(block)
        confidence = torch.empty(b, s, dtype=torch.float32, device=logits.device)
        count = torch.empty(b, dtype=torch.int64, device=logits.device)
        size = self.lib.tt_confidence_unmask_workspace_bytes(b, s)
        workspace = torch.empty(size, dtype=torch.uint8, device=logits.device)
        self._check(self.lib.tt_confidence_unmask(
            logits.data_ptr(), block.data_ptr(), next_block.data_ptr(), confidence.data_ptr(),
            count.data_ptr(), workspace.data_ptr(), size, b, s, v, mask_token_id, threshold,
            steps_left, temperature, DTYPE_CODES[logits.dtype],
            torch.cuda.current_stream(logits.device).cuda_stream), "confidence_unmask")
        return next_block, confidence, count
