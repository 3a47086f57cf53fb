"""The two tower models' state and steps, kept in the package so the Triton model files stay
thin and everything here is tested without a server.

Each tower holds a pool of cache slots allocated once (``runtime.slot_towers``) and takes one
batched call per scheduler round for every live sequence (``runtime.tower_work``). Sequences
are named by keys the orchestrator draws at random; a tower maps each to a slot when it is
opened and frees the slot when it is released. Every step names its sequence's key, and a key
that is not open here for that owner is an error, never a fresh cache; a tower holds at most
``capacity`` sequences, so a client that vanishes cannot exhaust its device. Logits never
leave a tower: the decoding policy runs where they are computed.
"""

from __future__ import annotations

import functools
import json
import secrets
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..config import TwoTowerConfig
from ..errors import TwoTowerError
from ..policy import GenerationSettings
from ..runtime.executor import ContextExecutor, DenoiserExecutor
from ..runtime.slot_towers import ContextSlots, DenoiserSlots, FreeSlots
from ..runtime.tower_work import (ContextResult, ContextWork, Delta, DenoiserResult,
                                  DenoiserWork)


class TowerRequestError(TwoTowerError, ValueError):
    """A tower request that names an unknown op, lacks what its op needs, or carries
    malformed values; the message says which."""


class TowerBusy(TwoTowerError, RuntimeError):
    """Every sequence slot of a tower is taken."""


class UnknownSequence(TwoTowerError, LookupError):
    """A step for a sequence this tower holds no cache of for its caller: never opened,
    released, or opened by another request (which is not told apart, so it cannot be probed)."""


OUT_OF_ORDER = "out of order:"   # how a CallOutOfOrder's message starts, for its caller


class CallOutOfOrder(TwoTowerError, RuntimeError):
    """A call that arrived before one its caller started earlier; nothing of it ran, so the
    caller sends it again once that one is answered."""


class CallOrder:
    """Each caller's calls run in the order it started them. A caller may start a call before
    the last one is answered (the orchestrator writes AR and denoiser calls ahead); the two
    can still reach the tower the other way round (Triton hands BLS requests over on a thread
    pool: measured here 37 in 300 when started back to back). So every call carries its
    caller's id and index: the next index runs, a later one is refused untouched
    (``CallOutOfOrder``), an earlier one is an error."""

    def __init__(self) -> None:
        self.last: dict[int, int] = {}

    def admit(self, caller: int, index: int) -> None:
        expected = self.last.get(caller, 0) + 1
        if index > expected:
            raise CallOutOfOrder(f"{OUT_OF_ORDER} call {index} arrived before call {expected}")
        if index < expected:
            raise TowerRequestError(f"call {index} of this caller has already run")
        self.last[caller] = index


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


class SlotTable:
    """Which open sequence holds which of ``capacity`` slots (the lowest free one first,
    ``FreeSlots``), and its owner token."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.slots: dict[int, tuple[int, str]] = {}
        self.free = FreeSlots(capacity)
        self.opened = self.released = 0

    def open(self, sequence: SequenceKey) -> int:
        """A slot for a new sequence; the only way a sequence comes to exist."""
        if sequence.id in self.slots:
            raise TowerRequestError(f"sequence {sequence.id} is already open; open a new one")
        if not self.free:
            raise TowerBusy(f"all {self.capacity} sequence slots are in use; retry later")
        slot = self.free.take()
        self.slots[sequence.id] = (slot, sequence.owner)
        self.opened += 1
        return slot

    def owns(self, sequence: SequenceKey) -> bool:
        """Constant-time, so a caller cannot learn an owner token from response times."""
        entry = self.slots.get(sequence.id)
        return entry is not None and secrets.compare_digest(entry[1].encode(),
                                                            sequence.owner.encode())

    def slot(self, sequence: SequenceKey) -> int:
        """The slot of an open sequence of this owner; steps never create one silently."""
        if not self.owns(sequence):
            raise UnknownSequence(f"sequence {sequence.id} is not open here for this caller: "
                                  "it was never opened, has been released, or belongs to "
                                  "another request")
        return self.slots[sequence.id][0]

    def release(self, sequence: SequenceKey) -> bool:
        """False when this owner holds no such sequence (another's is left alone)."""
        if not self.owns(sequence):
            return False
        slot, _ = self.slots.pop(sequence.id)
        self.free.give(slot)
        self.released += 1
        return True

    def stats(self, slot_bytes: int) -> dict:
        live = len(self.slots)
        return {"live_sequences": live, "opened": self.opened, "released": self.released,
                "capacity": self.capacity, "cache_bytes": live * slot_bytes}


def _slot_bytes(pool) -> int:
    return pool.nbytes() // pool.batch


class ContextTower:
    """The context tower's executor on its device and its sequences' slots."""

    def __init__(self, executor: ContextExecutor, config: TwoTowerConfig, max_context: int,
                 dtype: torch.dtype, capacity: int = 64) -> None:
        self.executor = executor
        self.table = SlotTable(capacity)
        self.order = CallOrder()
        self.slots = ContextSlots(executor, config, capacity, max_context, dtype)

    def round(self, work: ContextWork) -> ContextResult:
        """Release, open, then each group's step in order; the deltas are packed right after
        their step, so a sequence may step twice in one call."""
        for sequence in work.released:
            self.table.release(sequence)
        for sequence in work.opened:
            self.slots.empty(self.table.open(sequence))
        tokens, scores, deltas = [], [], []
        for group in work.groups:
            slots = [self.table.slot(s) for s in group.rows]
            sampled, scored, before = self.slots.extend(slots, group.ids, group.sample)
            tokens.append(sampled)
            scores.append(scored)
            for sequence, slot, old, mirror, keep in zip(group.rows, slots, before,
                                                         group.mirror, group.keep_previous):
                if mirror:
                    payload = self.slots.delta(slot, old)
                    deltas.append(Delta(sequence, payload, int(payload.size), keep))
        return ContextResult(tokens, scores, deltas)

    def stats(self) -> dict:
        return self.table.stats(_slot_bytes(self.slots.pool))


class DenoiserTower:
    """The denoiser's executor on its device and its copies of the context caches."""

    def __init__(self, executor: DenoiserExecutor, config: TwoTowerConfig, max_context: int,
                 dtype: torch.dtype, capacity: int = 64, fused_unmask: bool = False) -> None:
        self.executor, self.config = executor, config
        self.table = SlotTable(capacity)
        self.order = CallOrder()
        self.slots = DenoiserSlots(executor, config, capacity, max_context, dtype,
                                   fused_unmask)

    def round(self, work: DenoiserWork) -> DenoiserResult:
        """Release, open, apply the deltas (keeping the states one token back where asked),
        one diffusion step per group, then the mock-AR step."""
        for sequence in work.released:
            self.table.release(sequence)
        for sequence in work.opened:
            self.slots.empty(self.table.open(sequence))
        for delta in work.deltas:
            slot = self.table.slot(delta.row)
            if delta.keep_previous:
                self.slots.keep_previous(slot)
            self.slots.apply(slot, np.asarray(delta.payload, dtype=np.uint8))
        blocks = [self.slots.denoise([self.table.slot(s) for s in g.rows], g.blocks,
                                     g.settings, g.step_keys, g.steps_left)
                  for g in work.groups]
        mock = work.mock
        tokens = [] if mock is None else self.slots.mock_ar(
            [self.table.slot(s) for s in mock.rows], mock.latest, mock.settings,
            mock.step_keys)
        return DenoiserResult(blocks, tokens)

    def stats(self) -> dict:
        return self.table.stats(_slot_bytes(self.slots.pool))
