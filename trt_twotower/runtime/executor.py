"""The tower-executor protocol: what the session asks of any backend (PyTorch reference, ONNX
Runtime, TensorRT). Executors are pure step functions over a ``StepCache`` the session owns;
the context executor writes the cache it is given, the denoiser executor only reads it."""

from __future__ import annotations

from typing import Protocol

import torch

from .cache import StepCache


class ContextExecutor(Protocol):
    device: torch.device

    def context_step(self, input_ids: torch.Tensor, cache: StepCache) -> torch.Tensor:
        """Consume input_ids [B, T] after each row's length: writes the new KV entries and
        Mamba states into ``cache``, advances its lengths by T, returns logits [B, V] (fp32)."""
        ...


class DenoiserExecutor(Protocol):
    device: torch.device

    def denoiser_step(self, block_ids: torch.Tensor, t: torch.Tensor, cache: StepCache
                      ) -> torch.Tensor:
        """Block logits [B, S, V] (fp32) given the context cache (read only) and t [B]."""
        ...

    def mock_ar_step(self, token_ids: torch.Tensor, cache: StepCache) -> torch.Tensor:
        """Next-token logits [B, V] from the latest token [B, 1] over a cache one token back."""
        ...


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this machine (say what is missing)."""
