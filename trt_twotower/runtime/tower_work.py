"""What the step loop asks of the two towers in one round, and what it gets back.

A round writes at most one call per tower, whatever the number of rows: the context tower's
(open the new rows' caches, push prompt chunks, committed blocks and sampled tokens, sample the
AR rows' next tokens, free finished rows) and the denoiser's (open, take the cache deltas of the
context calls answered since its last call, one diffusion step for every row mid-block, one
mock-AR step, free). The two serve disjoint rows, so towers on two devices or in two processes
run them at the same time. The loop (``scheduler.py``) writes this work; a tower pair carries
it out — in this process (``local_towers.py``) or in two Triton tower models
(``trt_twotower.serve``), where each call is one batched request and only ids, settings and
cache deltas cross.

Rows are named by a ``Ref`` the pair issues when it opens them (a slot number in process, a
random sequence key in Triton); the loop never looks inside one.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional, Protocol, Union

import torch

from ..policy import GenerationSettings, TokenScore

Ref = Hashable

# An input meaning "what this tower's last step for the row left": an AR row's id (the token
# sampled for it last), a diffusion row's block, step key and steps left (the block its last
# denoiser step left). What a tower computed never travels back into it, so the loop can write
# a row's next step before the last one's answer is back.
FROM_TOWER = -1


@dataclass(frozen=True)
class Sample:
    """Sample the next token from a row's logits by its settings and step key (AR); or, with
    a ``target``, take that token (a prompt's next one). Either is scored when the settings
    ask for logprobs. ``chain`` > 1 (AR rows only): push each sampled token back in the same
    call and sample again, up to ``chain`` tokens with step keys step_key, step_key + 1, ...,
    stopping after EOS where the settings stop there."""
    settings: GenerationSettings
    step_key: int
    target: Optional[int] = None
    chain: int = 1


@dataclass
class ExtendGroup:
    """One context step over ``rows``: ids [R, T] after each row's cached positions. A row
    that ``mirror``s sends the denoiser the delta (``keep_previous`` first keeps the
    denoiser copy's Mamba states: mock-AR's one-token-back view); a row with a ``Sample``
    gets its next token."""
    rows: list[Ref]
    ids: torch.Tensor
    mirror: list[bool]
    keep_previous: list[bool]
    sample: list[Optional[Sample]]


@dataclass
class Delta:
    """A row's cache delta on its way from the context tower to the denoiser's copy: bytes
    across processes, or the span to copy within one. ``size`` is what it moves."""
    row: Ref
    payload: Any
    size: int
    keep_previous: bool


@dataclass
class ContextWork:
    opened: list[Ref] = field(default_factory=list)
    groups: list[ExtendGroup] = field(default_factory=list)
    released: list[Ref] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.opened or self.groups or self.released)


@dataclass
class ContextResult:
    tokens: list[list[list[int]]]                 # per group, per row: the tokens taken
    scores: list[list[list[TokenScore]]]          # per group, per row: theirs, where asked
    deltas: list[Delta]                           # in group order, for the mirroring rows
    crossed: int = 0                              # bytes the call moved between processes
    seconds: float = 0.0                          # how long the call took


@dataclass
class DenoiseGroup:
    """One diffusion step over rows of one block size: blocks [R, S], each row with its own
    settings, step key (its block index × steps per block + step) and steps left."""
    rows: list[Ref]
    blocks: torch.Tensor
    settings: list[GenerationSettings]
    step_keys: list[int]
    steps_left: list[int]


@dataclass
class MockGroup:
    """One mock-AR step: each row's latest token [R] over its copy one token back."""
    rows: list[Ref]
    latest: list[int]
    settings: list[GenerationSettings]
    step_keys: list[int]


@dataclass
class DenoiserWork:
    opened: list[Ref] = field(default_factory=list)
    deltas: list[Delta] = field(default_factory=list)
    groups: list[DenoiseGroup] = field(default_factory=list)
    mock: Optional[MockGroup] = None
    released: list[Ref] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.opened or self.deltas or self.groups or self.mock or self.released)


@dataclass
class DenoiserResult:
    blocks: list[torch.Tensor]      # per group: the next block ids [R, S]
    tokens: list[int]               # the mock-AR rows' next tokens
    crossed: int = 0                # bytes the call moved between processes
    seconds: float = 0.0            # how long the call took


class TowerPair(Protocol):
    """The two towers as the loop drives them. ``new_ref`` names a row before it is opened;
    ``capacity`` rows can be open at once. ``ahead``: a tower's call may be started before its
    last one's answer is back (the towers run calls in the order they were started), so the
    loop writes the next AR or diffusion step while the current one computes."""

    capacity: int
    ahead: bool

    def new_ref(self) -> Ref: ...

    def start(self, context: Optional[ContextWork], denoiser: Optional[DenoiserWork]
              ) -> "PendingRound":
        """One round's calls (either may be absent), each result with its call's time. The
        two touch disjoint rows: a pair whose towers run apart runs them at once."""
        ...

    def release(self, refs: list[Ref]) -> None:
        """Free finished rows (on each tower that holds them)."""
        ...

    def settle(self, idle: bool) -> None:
        """The end of a round: releases still waiting go now if they must."""
        ...

    def forget(self) -> None:
        """After a failed round: free every row (what the towers still hold is gone)."""
        ...


Result = Union[ContextResult, DenoiserResult]


class PendingRound:
    """A round's two calls, under way or done: ``context`` and ``denoiser`` are futures of
    each call's result (None where the round made no call to that tower), so the loop can
    take one tower's answer while the other still computes."""

    def __init__(self, context: "Future[Optional[ContextResult]]",
                 denoiser: "Future[Optional[DenoiserResult]]") -> None:
        self.context, self.denoiser = context, denoiser

    @classmethod
    def done(cls, context: Callable[[], Optional[ContextResult]],
             denoiser: Callable[[], Optional[DenoiserResult]]) -> "PendingRound":
        """Both calls run now, in turn; a failed context call stops the round."""
        contexted = _settled(context)
        if contexted.exception() is not None:
            return cls(contexted, _settled(lambda: None))
        return cls(contexted, _settled(denoiser))


class RoundCalls:
    """Runs a round's two calls (either may be absent) and times each result.

    ``at_once``, for a pair whose towers live apart (two devices, two processes): the context
    call on a helper thread while the denoiser call runs on the caller's. ``ahead`` (towers in
    other processes, which run calls in the order they arrive): both calls on helper threads,
    so ``start`` returns at once and the caller may start the next round before this one's
    answers are back. Otherwise in turn, before ``start`` returns."""

    def __init__(self, at_once: bool, ahead: bool = False) -> None:
        self.at_once, self.ahead = at_once, ahead
        self._helpers: Optional[ThreadPoolExecutor] = None

    def start(self, context_call: Optional[Callable[[], ContextResult]],
              denoiser_call: Optional[Callable[[], DenoiserResult]]) -> PendingRound:
        if self.ahead:
            return PendingRound(self._begin(context_call), self._begin(denoiser_call))
        if self.at_once and context_call is not None and denoiser_call is not None:
            return PendingRound(self._begin(context_call),
                                _settled(partial(_timed, denoiser_call)))
        return PendingRound.done(partial(_timed, context_call), partial(_timed, denoiser_call))

    def _begin(self, call: Optional[Callable[[], Result]]) -> "Future[Optional[Result]]":
        """The call timed on a helper thread (no call: None, at once)."""
        if call is None:
            return _settled(lambda: None)
        if self._helpers is None:
            # up to two calls per tower under way at once (the second written ahead)
            self._helpers = ThreadPoolExecutor(4, thread_name_prefix="tower-call")
        return self._helpers.submit(_timed, call)


def _settled(call: Callable[[], Optional[Result]]) -> "Future[Optional[Result]]":
    """A call run now, as a finished future (its error kept for ``result``)."""
    future: Future = Future()
    try:
        future.set_result(call())
    except BaseException as err:  # noqa: BLE001 - handed to whoever asks for the result
        future.set_exception(err)
    return future


def _timed(call: Optional[Callable[[], Result]]) -> Optional[Result]:
    """The call's result (None when there is no call) with its time in ``seconds``."""
    if call is None:
        return None
    start = time.perf_counter()
    result = call()
    result.seconds = time.perf_counter() - start
    return result
