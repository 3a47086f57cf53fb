"""The two tower models' state and steps, kept in the package so the Triton model files stay
thin and everything here is tested without a server.

Each tower keeps, per sequence, the cache it computes and nothing else: the context tower its
cache, the denoiser tower its copy kept current by cache deltas. Only ids, small settings and
the per-block delta leave a tower; logits never do, because the decoding policy runs where the
logits are. A sequence lives from its first step until it is released (the orchestrator
releases it when its request ends for any reason), and a tower holds at most ``capacity``
sequences, so a client that vanishes cannot exhaust its device.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict

import numpy as np
import torch

from .. import policy
from ..config import TwoTowerConfig
from ..policy import GenerationSettings
from ..runtime.cache import StepCache
from ..runtime.cache_delta import apply_delta, pack_delta
from ..runtime.executor import ContextExecutor, DenoiserExecutor
from ..runtime.session import denoise_and_commit


class TowerBusy(RuntimeError):
    """Every sequence slot of a tower is taken."""


class UnknownSequence(KeyError):
    """A step for a sequence this tower holds no cache of (never started, or released)."""

    def __str__(self) -> str:
        return self.args[0]


@functools.lru_cache(maxsize=1024)
def settings_to_json(settings: GenerationSettings) -> str:
    """Settings cross with every tower step; a request's are encoded once (they are frozen)."""
    return json.dumps(asdict(settings))


@functools.lru_cache(maxsize=1024)
def settings_from_json(text: str) -> GenerationSettings:
    """Parsed and validated once per distinct text, not on every step of a request."""
    return GenerationSettings(**json.loads(text))


class SequenceCaches:
    """Per-sequence caches (batch 1, preallocated to ``max_context``) on one device."""

    def __init__(self, config: TwoTowerConfig, max_context: int, dtype: torch.dtype,
                 device: torch.device, capacity: int) -> None:
        self.config, self.max_context, self.dtype, self.device = config, max_context, dtype, device
        self.capacity = capacity
        self.caches: dict[int, StepCache] = {}
        self.opened = self.released = 0

    def require(self, sequence: int) -> StepCache:
        """The cache of a sequence that has started; steps never create one silently."""
        cache = self.caches.get(sequence)
        if cache is None:
            raise UnknownSequence(f"sequence {sequence} holds no cache here: it was never "
                                  "started or has been released")
        return cache

    def get(self, sequence: int) -> StepCache:
        """The cache of ``sequence``, opened (empty) on its first use."""
        cache = self.caches.get(sequence)
        if cache is None:
            if len(self.caches) >= self.capacity:
                raise TowerBusy(f"all {self.capacity} sequence slots are in use; retry later")
            cache = StepCache.allocate(self.config, 1, self.max_context, self.dtype, self.device)
            self.caches[sequence] = cache
            self.opened += 1
        return cache

    def release(self, sequence: int) -> bool:
        if self.caches.pop(sequence, None) is None:
            return False
        self.released += 1
        return True

    def stats(self) -> dict:
        return {"live_sequences": len(self.caches), "opened": self.opened,
                "released": self.released, "capacity": self.capacity,
                "cache_bytes": sum(c.nbytes() for c in self.caches.values())}


class _Tower:
    sequences: SequenceCaches

    def release(self, sequence: int) -> bool:
        """Free a sequence's cache; False when it held none."""
        return self.sequences.release(sequence)

    def stats(self) -> dict:
        return self.sequences.stats()


class ContextTower(_Tower):
    """The context tower's executor on its device and its sequences' caches."""

    def __init__(self, executor: ContextExecutor, config: TwoTowerConfig, max_context: int,
                 dtype: torch.dtype, capacity: int = 64) -> None:
        self.executor = executor
        self.sequences = SequenceCaches(config, max_context, dtype, executor.device, capacity)

    def extend(self, sequence: int, ids: list[int]) -> np.ndarray:
        """Consume ``ids``; returns the cache delta for the denoiser's copy."""
        cache = self.sequences.get(sequence)
        old = int(cache.lengths[0])
        self.executor.context_step(torch.tensor([ids], dtype=torch.long), cache)
        return pack_delta(cache, 0, old)

    def extend_and_sample(self, sequence: int, ids: list[int], settings: GenerationSettings,
                          step_key: int) -> int:
        """Consume ``ids`` and sample the next token by the policy (AR)."""
        logits = self.executor.context_step(torch.tensor([ids], dtype=torch.long),
                                            self.sequences.get(sequence))
        return int(policy.sample_next(logits, settings, torch.tensor([settings.seed]),
                                      step_key)[0])


class DenoiserTower(_Tower):
    """The denoiser's executor on its device and its copies of the context caches."""

    def __init__(self, executor: DenoiserExecutor, config: TwoTowerConfig, max_context: int,
                 dtype: torch.dtype, capacity: int = 64, fused_unmask: bool = False) -> None:
        self.executor, self.config = executor, config
        self.fused_unmask = fused_unmask and hasattr(executor, "denoiser_unmask_step")
        self.sequences = SequenceCaches(config, max_context, dtype, executor.device, capacity)
        self.previous_mamba: dict[int, dict[str, torch.Tensor]] = {}

    def append(self, sequence: int, delta: np.ndarray, keep_previous: bool = False) -> None:
        """Bring a copy up to date; ``keep_previous`` first keeps its Mamba states, the "S−2"
        view mock-AR reads after a one-token delta (spec §4.7)."""
        cache = self.sequences.get(sequence)
        if keep_previous:
            self.previous_mamba[sequence] = cache.snapshot_mamba()
        apply_delta(cache, 0, delta)

    def denoise(self, sequence: int, block: list[int], settings: GenerationSettings,
                step_key: int) -> list[int]:
        """One diffusion step of a block: the next block ids."""
        ids = torch.tensor([block], dtype=torch.long)
        t = (ids == self.config.mask_token_id).float().mean(-1)
        cache = self.sequences.require(sequence)
        nxt = denoise_and_commit(self.executor, ids, t, cache, settings,
                                 torch.tensor([settings.seed]), step_key,
                                 self.config.mask_token_id, self.fused_unmask)
        return nxt[0].tolist()

    def mock_ar(self, sequence: int, token: int, settings: GenerationSettings,
                step_key: int) -> int:
        """Mock-AR's next token from the latest token over the copy one token back."""
        cache = self.sequences.require(sequence)
        previous = self.previous_mamba.get(sequence)
        if previous is None:
            raise ValueError(f"sequence {sequence} has no one-token-back state: append its "
                             "latest token's delta with keep_previous first")
        view = cache.one_token_back(previous)
        logits = self.executor.mock_ar_step(torch.tensor([[token]], dtype=torch.long), view)
        return int(policy.sample_next(logits, settings, torch.tensor([settings.seed]),
                                      step_key)[0])

    def release(self, sequence: int) -> bool:
        self.previous_mamba.pop(sequence, None)
        return self.sequences.release(sequence)
