"""Both towers in this process: the in-process engine's ``TowerPair``.

A row is a slot number that names it in both pools (the context tower's on its device, the
denoiser's copy on its own), taken when the loop admits it and given back the moment it
finishes. The pools are allocated on the first round, once. A context step's delta is copied
into the denoiser's pool at once, tensor to tensor, never packed. Towers on two devices run a
round's two calls at the same time (they serve disjoint rows); on one device, in turn.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import TwoTowerConfig
from .executor import ContextExecutor, DenoiserExecutor
from .slot_towers import ContextSlots, DenoiserSlots, FreeSlots
from .tower_work import (ContextResult, ContextWork, Delta, DenoiserResult, DenoiserWork,
                         PendingRound, Ref, RoundCalls)


class LocalTowers:
    """``at_once``: run a round's two calls at the same time (default: when the executors
    are on different devices; one device runs one call at a time).

    No call is written ahead (``ahead`` is False): there is no round trip to hide in one
    process, and a call written ahead would only hold back the last one's tokens."""

    ahead = False

    def __init__(self, context: ContextExecutor, denoiser: DenoiserExecutor,
                 config: TwoTowerConfig, capacity: int, max_context: int,
                 dtype: torch.dtype = torch.float32, fused_unmask: bool = False,
                 at_once: Optional[bool] = None) -> None:
        self.context_executor, self.denoiser_executor = context, denoiser
        apart = torch.device(context.device) != torch.device(denoiser.device)
        self._calls = RoundCalls(apart if at_once is None else at_once)
        self.config, self.capacity, self.max_context, self.dtype = (config, capacity,
                                                                    max_context, dtype)
        self.fused_unmask = fused_unmask and hasattr(denoiser, "denoiser_unmask_step")
        self._slots: Optional[tuple[ContextSlots, DenoiserSlots]] = None
        self.free = FreeSlots(capacity)

    @property
    def slots(self) -> tuple[ContextSlots, DenoiserSlots]:
        return self.allocate()

    def allocate(self) -> tuple[ContextSlots, DenoiserSlots]:
        """Both pools, allocated on first use (once: a round's two calls may run at once)."""
        if self._slots is None:
            self._slots = (ContextSlots(self.context_executor, self.config, self.capacity,
                                        self.max_context, self.dtype),
                           DenoiserSlots(self.denoiser_executor, self.config, self.capacity,
                                         self.max_context, self.dtype, self.fused_unmask))
        return self._slots

    def new_ref(self) -> Ref:
        return self.free.take()

    def release(self, refs: list[Ref]) -> None:
        for ref in refs:
            self.free.give(ref)

    def settle(self, idle: bool) -> None:
        """Nothing waits: slots come back when released."""

    def forget(self) -> None:
        self.free = FreeSlots(self.capacity)

    def start(self, context: Optional[ContextWork], denoiser: Optional[DenoiserWork]
              ) -> PendingRound:
        """The context call and the denoiser's: at once when the towers are on two devices,
        else in turn. A context call's deltas are copied into the denoiser's pool as it goes,
        into rows the denoiser call does not touch (on a GPU the copy and the denoiser's
        kernels share the denoiser device's stream)."""
        self.allocate()
        return self._calls.start(None if context is None else lambda: self.context(context),
                               None if denoiser is None else lambda: self.denoiser(denoiser))

    def context(self, work: ContextWork) -> ContextResult:
        """Opening empties a slot in both pools; each step's delta lands in the denoiser's
        copy before the next step (a row may step twice in one call)."""
        context, denoiser = self.slots
        for slot in work.opened:
            context.empty(slot)
            denoiser.empty(slot)
        tokens, scores, deltas = [], [], []
        for group in work.groups:
            for slot, keep in zip(group.rows, group.keep_previous):
                if keep:
                    denoiser.keep_previous(slot)
            sampled, scored, before = context.extend(group.rows, group.ids, group.sample)
            tokens.append(sampled)
            scores.append(scored)
            for slot, mirror, old, keep in zip(group.rows, group.mirror, before,
                                               group.keep_previous):
                if mirror:
                    moved = denoiser.copy_from(context.pool, slot, old)
                    deltas.append(Delta(slot, None, moved, keep))
        return ContextResult(tokens, scores, deltas)

    def denoiser(self, work: DenoiserWork) -> DenoiserResult:
        """The deltas are in already (``context`` copied them)."""
        _, denoiser = self.slots
        blocks = [denoiser.denoise(g.rows, g.blocks, g.settings, g.step_keys, g.steps_left)
                  for g in work.groups]
        mock = work.mock
        tokens = [] if mock is None else denoiser.mock_ar(mock.rows, mock.latest,
                                                          mock.settings, mock.step_keys)
        return DenoiserResult(blocks, tokens)
