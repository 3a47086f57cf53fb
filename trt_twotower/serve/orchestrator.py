"""One request's generation over two tower models: the block loop the ``twotower_bls`` model
runs (spec §5), with every cache kept in the tower that computes it.

The orchestrator holds ids only. It asks the context tower to extend a sequence and forwards
the returned cache delta to the denoiser tower; the denoiser tower runs each diffusion step and
returns the next block's ids. Step keys, per-row timesteps and stopping follow
``TwoTowerSession`` exactly, so a request served this way produces the same tokens as the
in-process session (tests check it). A request opens its sequence on the towers first (no
other op creates one); whatever ends the request — its last token, a cancellation, an error —
both towers release it.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Protocol

import numpy as np

from .. import policy
from ..config import TwoTowerConfig
from ..policy import GenerationSettings
from ..runtime.cache_delta import HEADER_BYTES
from ..runtime.session import OnDelta, RequestResult
from .towers import ContextTower, DenoiserTower, SequenceKey


class TowerLink(Protocol):
    """How the orchestrator reaches the two towers (in process, or Triton BLS calls)."""

    def open(self, sequence: SequenceKey, denoiser: bool) -> None: ...

    def context_extend(self, sequence: SequenceKey, ids: list[int]) -> np.ndarray: ...

    def context_extend_and_sample(self, sequence: SequenceKey, ids: list[int],
                                  settings: GenerationSettings, step_key: int) -> int: ...

    def denoiser_append(self, sequence: SequenceKey, delta: np.ndarray,
                        keep_previous: bool) -> None: ...

    def denoiser_step(self, sequence: SequenceKey, block: list[int],
                      settings: GenerationSettings, step_key: int) -> list[int]: ...

    def denoiser_mock_ar(self, sequence: SequenceKey, token: int,
                         settings: GenerationSettings, step_key: int) -> int: ...

    def release(self, sequence: SequenceKey) -> None: ...


class LocalLink:
    """Both towers in this process: the reference the Triton path is compared with."""

    def __init__(self, context: ContextTower, denoiser: DenoiserTower) -> None:
        self.context, self.denoiser = context, denoiser
        self.context_extend = context.extend
        self.context_extend_and_sample = context.extend_and_sample
        self.denoiser_append = denoiser.append
        self.denoiser_step = denoiser.denoise
        self.denoiser_mock_ar = denoiser.mock_ar

    def open(self, sequence: SequenceKey, denoiser: bool) -> None:
        self.context.open(sequence)
        if denoiser:
            self.denoiser.open(sequence)

    def release(self, sequence: SequenceKey) -> None:
        self.context.release(sequence)
        self.denoiser.release(sequence)


class _Request:
    def __init__(self, link: TowerLink, sequence: SequenceKey, settings: GenerationSettings,
                 on_delta: Optional[OnDelta], eos: int) -> None:
        self.link, self.sequence, self.settings = link, sequence, settings
        self.on_delta, self.eos = on_delta, eos
        self.result = RequestResult()
        self.done = False

    def timed(self, phase: str, call: Callable, *args):
        start = time.perf_counter()
        try:
            return call(*args)
        finally:
            stats = self.result.stats
            setattr(stats, phase, getattr(stats, phase) + time.perf_counter() - start)

    def extend(self, ids: list[int], keep_previous: bool = False,
               phase: str = "commit_seconds") -> None:
        delta = self.timed(phase, self.link.context_extend, self.sequence, ids)
        self.timed(phase, self.link.denoiser_append, self.sequence, delta, keep_previous)
        self.result.stats.context_steps += 1
        self.result.stats.handoff_bytes += int(delta.size) - HEADER_BYTES  # bookkeeping only

    def emit(self, ids: list[int]) -> None:
        ids, self.done = policy.accept_tokens(len(self.result.tokens), ids, self.settings,
                                              self.eos)
        self.result.tokens.extend(ids)
        if self.on_delta is not None and ids and self.on_delta(ids) is False:
            self.result.cancelled = self.done = True


def generate(link: TowerLink, sequence: SequenceKey, prompt_ids: list[int],
             settings: GenerationSettings, config: TwoTowerConfig,
             on_delta: Optional[OnDelta] = None) -> RequestResult:
    """Run one request to its end; the towers release ``sequence`` whatever happens."""
    if not prompt_ids:
        raise policy.GenerationError("a prompt needs at least one token")
    if min(prompt_ids) < 0 or max(prompt_ids) >= config.vocab_size:
        raise policy.GenerationError(f"prompt ids must lie in [0, {config.vocab_size})")
    request = _Request(link, sequence, settings, on_delta, config.eos_token_id)
    try:
        link.open(sequence, denoiser=settings.mode != "ar")
        {"diffusion": _diffusion, "ar": _ar, "mock-ar": _mock_ar}[settings.mode](
            request, prompt_ids, config.mask_token_id)
    except BaseException:
        try:
            link.release(sequence)
        except Exception:  # the original error is the one to report
            pass
        raise
    try:
        link.release(sequence)
    except Exception as err:  # the request succeeded; the leak is the operator's to see
        logging.getLogger(__name__).error("sequence %d was not released: %s", sequence.id, err)
    return request.result


def _diffusion(r: _Request, prompt: list[int], mask_id: int) -> None:
    s = r.settings
    r.extend(prompt, phase="prefill_seconds")
    block_index = 0
    while True:
        block = [mask_id] * s.block_size
        for step in range(s.steps_per_block):
            if mask_id not in block:
                break
            block = r.timed("denoise_seconds", r.link.denoiser_step, r.sequence, block, s,
                            block_index * s.steps_per_block + step)
            r.result.stats.denoiser_evals += 1
        r.emit(block)
        if r.done:
            return
        r.extend(block)
        block_index += 1


def _ar(r: _Request, prompt: list[int], mask_id: int) -> None:
    token = r.timed("prefill_seconds", r.link.context_extend_and_sample, r.sequence, prompt,
                    r.settings, 0)
    r.result.stats.context_steps += 1
    step = 0
    while True:
        r.emit([token])
        if r.done:
            return
        step += 1
        token = r.timed("commit_seconds", r.link.context_extend_and_sample, r.sequence,
                        [token], r.settings, step)
        r.result.stats.context_steps += 1


def _mock_ar(r: _Request, prompt: list[int], mask_id: int) -> None:
    """The denoiser as a next-token head over the caches one token back (spec §5.2)."""
    if len(prompt) > 1:
        r.extend(prompt[:-1], phase="prefill_seconds")
    latest = prompt[-1]
    r.extend([latest], keep_previous=True, phase="prefill_seconds")
    step = 0
    while True:
        latest = r.timed("denoise_seconds", r.link.denoiser_mock_ar, r.sequence, latest,
                         r.settings, step)
        r.result.stats.denoiser_evals += 1
        r.emit([latest])
        if r.done:
            return
        r.extend([latest], keep_previous=True)
        step += 1
