"""The two tower models' state and steps, kept in the package so the Triton model files stay
thin and everything here is tested without a server.

Each tower keeps, per sequence, the cache it computes and nothing else: the context tower its
cache, the denoiser tower its copy kept current by cache deltas. Only ids, small settings and
the per-block delta leave a tower; logits never do, because the decoding policy runs where the
logits are. A sequence lives from an explicit ``open`` until it is released (the orchestrator
opens it when its request starts and releases it when the request ends for any reason); every
other step needs an open sequence and its owner's token, so a stray or hostile call can neither
start an empty cache nor touch another request's. A tower holds at most ``capacity``
sequences, so a client that vanishes cannot exhaust its device.
"""

from __future__ import annotations

import functools
import json
import secrets
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .. import policy
from ..config import TwoTowerConfig
from ..errors import TwoTowerError
from ..policy import GenerationSettings
from ..runtime.cache import StepCache
from ..runtime.cache_delta import apply_delta, pack_delta
from ..runtime.executor import ContextExecutor, DenoiserExecutor
from ..runtime.session import denoise_and_commit


class TowerRequestError(TwoTowerError, ValueError):
    """A tower request that names an unknown op, lacks what its op needs, or carries
    malformed values; the message says which."""


class TowerBusy(TwoTowerError, RuntimeError):
    """Every sequence slot of a tower is taken."""


class UnknownSequence(TwoTowerError, LookupError):
    """A step for a sequence this tower holds no cache of for its caller: never opened,
    released, or opened by another request (which is not told apart, so it cannot be probed)."""


@dataclass(frozen=True)
class SequenceKey:
    """A sequence as its opener knows it: an id and the owner token that proves the
    opener. Both come from a CSPRNG, so neither can be guessed from another request's."""
    id: int
    owner: str

    @classmethod
    def new(cls) -> "SequenceKey":
        return cls(secrets.randbits(63), secrets.token_hex(16))


@functools.lru_cache(maxsize=1024)
def settings_to_json(settings: GenerationSettings) -> str:
    """Settings cross with every tower step; a request's are encoded once (they are frozen)."""
    return json.dumps(asdict(settings))


@functools.lru_cache(maxsize=1024)
def settings_from_json(text: str) -> GenerationSettings:
    """Parsed and validated once per distinct text, not on every step of a request. Any
    malformed text is one clear request error, never a parser's internals."""
    try:
        fields = json.loads(text)
        if not isinstance(fields, dict):
            raise TypeError("not a JSON object")
        return GenerationSettings(**fields)
    except (ValueError, TypeError) as err:
        reason = " ".join(str(err).split())
        raise TowerRequestError(f"settings must be a JSON object of GenerationSettings "
                                f"fields: {reason}") from None


class SequenceCaches:
    """Per-sequence caches (batch 1, preallocated to ``max_context``) on one device."""

    def __init__(self, config: TwoTowerConfig, max_context: int, dtype: torch.dtype,
                 device: torch.device, capacity: int) -> None:
        self.config, self.max_context, self.dtype, self.device = config, max_context, dtype, device
        self.capacity = capacity
        self.caches: dict[int, StepCache] = {}
        self.owners: dict[int, str] = {}
        self.opened = self.released = 0

    def open(self, sequence: SequenceKey) -> None:
        """An empty cache for a new sequence; the only way one comes to exist."""
        if sequence.id in self.caches:
            raise TowerRequestError(f"sequence {sequence.id} is already open; open a new one")
        if len(self.caches) >= self.capacity:
            raise TowerBusy(f"all {self.capacity} sequence slots are in use; retry later")
        cache = StepCache.allocate(self.config, 1, self.max_context, self.dtype, self.device)
        self.caches[sequence.id], self.owners[sequence.id] = cache, sequence.owner
        self.opened += 1

    def owns(self, sequence: SequenceKey) -> bool:
        """Constant-time, so a caller cannot learn an owner token from response times."""
        owner = self.owners.get(sequence.id)
        return owner is not None and secrets.compare_digest(owner.encode(),
                                                            sequence.owner.encode())

    def require(self, sequence: SequenceKey) -> StepCache:
        """The cache of an open sequence of this owner; steps never create one silently."""
        if not self.owns(sequence):
            raise UnknownSequence(f"sequence {sequence.id} is not open here for this caller: "
                                  "it was never opened, has been released, or belongs to "
                                  "another request")
        return self.caches[sequence.id]

    def release(self, sequence: SequenceKey) -> bool:
        """False when this owner holds no such sequence (another's is left alone)."""
        if not self.owns(sequence):
            return False
        del self.caches[sequence.id], self.owners[sequence.id]
        self.released += 1
        return True

    def stats(self) -> dict:
        return {"live_sequences": len(self.caches), "opened": self.opened,
                "released": self.released, "capacity": self.capacity,
                "cache_bytes": sum(c.nbytes() for c in self.caches.values())}


class _Tower:
    sequences: SequenceCaches

    def open(self, sequence: SequenceKey) -> None:
        """Start a sequence with an empty cache; every other op needs it open."""
        self.sequences.open(sequence)

    def release(self, sequence: SequenceKey) -> bool:
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

    def extend(self, sequence: SequenceKey, ids: list[int]) -> np.ndarray:
        """Consume ``ids``; returns the cache delta for the denoiser's copy."""
        cache = self.sequences.require(sequence)
        old = int(cache.lengths[0])
        self.executor.context_step(torch.tensor([ids], dtype=torch.long), cache)
        return pack_delta(cache, 0, old)

    def extend_and_sample(self, sequence: SequenceKey, ids: list[int], settings: GenerationSettings,
                          step_key: int) -> int:
        """Consume ``ids`` and sample the next token by the policy (AR)."""
        logits = self.executor.context_step(torch.tensor([ids], dtype=torch.long),
                                            self.sequences.require(sequence))
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

    def append(self, sequence: SequenceKey, delta: np.ndarray, keep_previous: bool = False) -> None:
        """Bring a copy up to date; ``keep_previous`` first keeps its Mamba states, the "S−2"
        view mock-AR reads after a one-token delta (spec §4.7)."""
        cache = self.sequences.require(sequence)
        if keep_previous:
            self.previous_mamba[sequence.id] = cache.snapshot_mamba()
        apply_delta(cache, 0, delta)

    def denoise(self, sequence: SequenceKey, block: list[int], settings: GenerationSettings,
                step_key: int) -> list[int]:
        """One diffusion step of a block: the next block ids."""
        ids = torch.tensor([block], dtype=torch.long)
        t = (ids == self.config.mask_token_id).float().mean(-1)
        cache = self.sequences.require(sequence)
        nxt = denoise_and_commit(self.executor, ids, t, cache, settings,
                                 torch.tensor([settings.seed]), step_key,
                                 self.config.mask_token_id, self.fused_unmask)
        return nxt[0].tolist()

    def mock_ar(self, sequence: SequenceKey, token: int, settings: GenerationSettings,
                step_key: int) -> int:
        """Mock-AR's next token from the latest token over the copy one token back."""
        cache = self.sequences.require(sequence)
        previous = self.previous_mamba.get(sequence.id)
        if previous is None:
            raise TowerRequestError(f"sequence {sequence.id} has no one-token-back state: "
                                    "append its latest token's delta with keep_previous first")
        view = cache.one_token_back(previous)
        logits = self.executor.mock_ar_step(torch.tensor([[token]], dtype=torch.long), view)
        return int(policy.sample_next(logits, settings, torch.tensor([settings.seed]),
                                      step_key)[0])

    def release(self, sequence: SequenceKey) -> bool:
        released = self.sequences.release(sequence)
        if released:
            self.previous_mamba.pop(sequence.id, None)
        return released
