"""The inputs of the step graphs, named as ``trt_twotower.names`` names them: built once here
for every executor that runs the graphs (ONNX Runtime, TensorRT), so both feed the same."""

from __future__ import annotations

from typing import Union

import torch

from .cache import StepCache


def cache_feeds(cache: StepCache) -> dict[str, torch.Tensor]:
    """The context tower's cache as every step graph reads it."""
    return {"past_length": cache.lengths, **cache.tensors}


def context_feeds(input_ids: torch.Tensor, cache: StepCache) -> dict[str, torch.Tensor]:
    return {"input_ids": input_ids.to(cache.device, torch.int64), **cache_feeds(cache)}


def denoiser_feeds(block_ids: torch.Tensor, t: torch.Tensor, modulated: bool, cache: StepCache,
                   threshold: Union[float, torch.Tensor] = 1.0,
                   steps_left: Union[int, torch.Tensor] = 1) -> dict[str, torch.Tensor]:
    """Every input of the denoiser graph, on the cache's device. ``modulated`` false runs the
    rows unmodulated (mock-AR); threshold and steps_left (one value, or one per row) only
    matter to the unmask outputs."""
    device, rows = cache.device, block_ids.shape[0]
    return {"block_ids": block_ids.to(device, torch.int64), "t": t.to(device, torch.float32),
            "modulated": torch.full((rows,), modulated, device=device),
            "confidence_threshold": _per_row(threshold, rows, torch.float32, device),
            "steps_left": _per_row(steps_left, rows, torch.int64, device),
            **cache_feeds(cache)}


def _per_row(value: Union[float, int, torch.Tensor], rows: int, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    return torch.as_tensor(value, dtype=dtype).to(device).expand(rows).contiguous()
