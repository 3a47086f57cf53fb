"""The compiled plugin library (``build_scripts/build_plugins.sh``) called through ctypes with
torch CUDA tensors: the harness of the GPU parity tests and benchmarks. Arguments are checked
here, before a launch, because a wrong pointer or shape in a CUDA kernel corrupts memory instead
of raising. Where the library is and its C ABI belong to ``plugin_library``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..errors import TwoTowerError
from .plugin_library import ATTENTION_HEAD_DIMS, MAX_BLOCK, load_plugin_library

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
ATTENTION_DTYPES = (torch.float16, torch.bfloat16)


class KernelError(TwoTowerError, RuntimeError):
    """A launcher returned an error code, or its arguments are wrong."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise KernelError(message)


def _check_tensors(device: torch.device, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        _require(t.is_cuda, f"{name} must be a CUDA tensor, got one on {t.device}")
        _require(t.device == device, f"{name} is on {t.device}, the others on {device}")
        _require(t.is_contiguous(), f"{name} must be contiguous")


def _shape(name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    _require(tuple(t.shape) == expected, f"{name} must have shape {list(expected)}, got "
                                         f"{list(t.shape)}")


def _per_row(value: float | int | torch.Tensor, rows: int, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    """One value per row on ``device``: a scalar filled in, or a [rows] tensor checked."""
    if isinstance(value, torch.Tensor):
        _require(value.numel() in (1, rows), f"expected 1 or {rows} values, got {value.numel()}")
        return value.to(device, dtype).reshape(-1).expand(rows).contiguous()
    return torch.full((rows,), value, dtype=dtype, device=device)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


class KernelLibrary:
    """Typed wrappers of the two launchers; each returns fresh outputs unless given some."""

    def __init__(self, path: Optional[Path] = None) -> None:
        """``path``: the library to use instead of ``plugin_library``'s lookup."""
        self.lib = load_plugin_library(path)

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise KernelError(f"{what}: {self.lib.tt_error_string(code).decode()} (code {code})")

    def block_cross_attention(self, q: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor,
                              ctx_len: torch.Tensor, blk_k: torch.Tensor, blk_v: torch.Tensor,
                              out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Same contract as ``trt_twotower.fused_ops.block_cross_attention``; ctx_len int64."""
        _require(q.dim() == 4 and ctx_k.dim() == 4, "q must be [B,S,Hq,D], ctx_k [B,Hkv,L,D]")
        b, s, hq, d = q.shape
        hkv, lmax = ctx_k.shape[1], ctx_k.shape[2]
        out = torch.empty_like(q) if out is None else out
        _check_tensors(q.device, q=q, ctx_k=ctx_k, ctx_v=ctx_v, ctx_len=ctx_len, blk_k=blk_k,
                       blk_v=blk_v, out=out)
        _require(q.dtype in ATTENTION_DTYPES, f"q must be float16 or bfloat16, got {q.dtype}")
        for name, t in (("ctx_k", ctx_k), ("ctx_v", ctx_v), ("blk_k", blk_k), ("blk_v", blk_v),
                        ("out", out)):
            _require(t.dtype == q.dtype, f"{name} is {t.dtype}, q is {q.dtype}")
        _require(ctx_len.dtype == torch.int64, f"ctx_len must be int64, got {ctx_len.dtype}")
        _require(d in ATTENTION_HEAD_DIMS, f"head size {d} is not one of {ATTENTION_HEAD_DIMS}")
        _require(hq % hkv == 0, f"{hq} query heads are not a multiple of {hkv} kv heads")
        _shape("ctx_v", ctx_v, (b, hkv, lmax, d))
        _shape("ctx_k", ctx_k, (b, hkv, lmax, d))
        _shape("ctx_len", ctx_len, (b,))
        _shape("blk_k", blk_k, (b, hkv, s, d))
        _shape("blk_v", blk_v, (b, hkv, s, d))
        _shape("out", out, (b, s, hq, d))
        size = self.lib.tt_block_cross_attention_workspace_bytes(b, s, hq, hkv, d, lmax)
        workspace = torch.empty(size, dtype=torch.uint8, device=q.device)
        self._check(self.lib.tt_block_cross_attention(
            q.data_ptr(), ctx_k.data_ptr(), ctx_v.data_ptr(), ctx_len.data_ptr(),
            blk_k.data_ptr(), blk_v.data_ptr(), out.data_ptr(), workspace.data_ptr(), size,
            b, s, hq, hkv, d, lmax, DTYPE_CODES[q.dtype], _stream(q.device)),
            "block_cross_attention")
        return out

    def confidence_unmask(self, logits: torch.Tensor, block: torch.Tensor, mask_token_id: int,
                          threshold: float | torch.Tensor, steps_left: int | torch.Tensor,
                          temperature: float = 0.0,
                          seeds: Optional[torch.Tensor] = None, step_key: int = 0,
                          out: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Same contract as ``trt_twotower.fused_ops.confidence_unmask``; block ids int64.
        ``out``: (next block, confidence, masked count) to write into."""
        _require(logits.dim() == 3, f"logits must be [B,S,V], got {list(logits.shape)}")
        b, s, v = logits.shape
        _check_tensors(logits.device, logits=logits, block=block)
        _require(logits.dtype in DTYPE_CODES, f"logits must be float32/16 or bfloat16, got "
                                              f"{logits.dtype}")
        _require(block.dtype == torch.int64, f"block must be int64, got {block.dtype}")
        _shape("block", block, (b, s))
        _require(s <= MAX_BLOCK, f"block size {s} exceeds {MAX_BLOCK}")
        seeds_ptr = None
        if temperature > 0.0:
            _require(seeds is not None, "sampling with temperature > 0 needs one seed per row")
            _check_tensors(logits.device, seeds=seeds)
            _require(seeds.dtype == torch.int64, f"seeds must be int64, got {seeds.dtype}")
            _shape("seeds", seeds, (b,))
            seeds_ptr = seeds.data_ptr()
        if out is None:
            out = (torch.empty_like(block),
                   torch.empty(b, s, dtype=torch.float32, device=logits.device),
                   torch.empty(b, dtype=torch.int64, device=logits.device))
        next_block, confidence, count = out
        _check_tensors(logits.device, next_block=next_block, confidence=confidence, count=count)
        for name, t, dtype, shape in (("next_block", next_block, torch.int64, (b, s)),
                                      ("confidence", confidence, torch.float32, (b, s)),
                                      ("masked_count", count, torch.int64, (b,))):
            _require(t.dtype == dtype, f"{name} must be {dtype}, got {t.dtype}")
            _shape(name, t, shape)
        size = self.lib.tt_confidence_unmask_workspace_bytes(b, s, v)
        workspace = torch.empty(max(size, 0), dtype=torch.uint8, device=logits.device)
        # The kernel reads one threshold and one steps-left per row on the device, where the
        # TensorRT plugin has them; a scalar is written to every row by a kernel (no host
        # copy), so a CUDA graph can still capture this call.
        threshold_on_device = _per_row(threshold, b, torch.float32, logits.device)
        steps_on_device = _per_row(steps_left, b, torch.int64, logits.device)
        self._check(self.lib.tt_confidence_unmask(
            logits.data_ptr(), block.data_ptr(), next_block.data_ptr(), confidence.data_ptr(),
            count.data_ptr(), seeds_ptr, workspace.data_ptr(), size, b, s, v, mask_token_id,
            threshold_on_device.data_ptr(), steps_on_device.data_ptr(), temperature, step_key,
            DTYPE_CODES[logits.dtype], _stream(logits.device)), "confidence_unmask")
        return next_block, confidence, count
