"""The tower-executor protocol: what the session asks of any backend (PyTorch reference, ONNX
Runtime, TensorRT). Executors are pure step functions over a ``StepCache`` the session owns;
the context executor writes the cache it is given, the denoiser executor only reads it.
Logits come back on the executor's device: the decoding policy runs where they are, so a
denoiser step's [R, S, V] logits (hundreds of MB at R = 64 on the released vocabulary) never
cross to the host, only the tokens chosen from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch

from ..config import TwoTowerConfig
from ..errors import TwoTowerError
from .cache import StepCache


class ContextExecutor(Protocol):
    device: torch.device

    def context_step(self, input_ids: torch.Tensor, cache: StepCache) -> torch.Tensor:
        """Consume input_ids [B, T] after each row's length: writes the new KV entries and
        Mamba states into ``cache``, advances its lengths by T, returns logits [B, V]."""
        ...


class DenoiserExecutor(Protocol):
    device: torch.device

    def denoiser_step(self, block_ids: torch.Tensor, t: torch.Tensor, cache: StepCache
                      ) -> torch.Tensor:
        """Block logits [B, S, V] given the context cache (read only) and t [B]."""
        ...

    def mock_ar_step(self, token_ids: torch.Tensor, cache: StepCache) -> torch.Tensor:
        """Next-token logits [B, V] from the latest token [B, 1] over a cache one token back."""
        ...


class BackendUnavailable(TwoTowerError, RuntimeError):
    """The requested backend cannot run on this machine (say what is missing)."""


@dataclass
class OpenBackend:
    """A backend opened by name (``runtime.backends``): its two executors (None for a tower a
    process does not host) and what the session needs to drive them."""

    name: str
    context: Optional[ContextExecutor]
    denoiser: Optional[DenoiserExecutor]
    config: TwoTowerConfig
    tokenizer: Any
    max_context: int
    dtype: torch.dtype = torch.float32
    fused_unmask: bool = False
