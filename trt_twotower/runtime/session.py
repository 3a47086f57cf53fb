"""``TwoTowerSession``: the in-process engine. Two tower executors on their devices, one step
loop (``scheduler.StepScheduler``) driven by one worker thread, and a thread-safe front:
``submit`` a request at any time, ``stream`` its committed blocks, ``cancel`` it, or
``generate`` a batch and wait.

A request that arrives while others run joins the next round; it never waits for a batch to
finish. The queue of requests waiting for a free cache slot is bounded: past it ``submit``
refuses with ``SessionBusy`` instead of holding unbounded memory. A request may carry a
timeout; a cancelled or timed-out request leaves its slot within one round.
"""

from __future__ import annotations

import asyncio
import atexit
import queue
import threading
import time
import weakref
from typing import Callable, Iterator, Optional

import torch

from ..config import TwoTowerConfig
from ..policy import GenerationError, GenerationSettings
from .executor import ContextExecutor, DenoiserExecutor
from .local_towers import LocalTowers
from .rows import FINISHED, OnDelta, Request, RequestResult, RequestStats, Row
from .scheduler import SchedulerLimits, StepScheduler
from .tower_work import TowerPair

__all__ = ["Handle", "OnDelta", "Request", "RequestResult", "RequestStats", "SessionBusy",
           "TwoTowerSession"]

DEFAULT_MAX_WAITING = 1024
IDLE_POLL_SECONDS = 0.5
_OPEN_SESSIONS: "weakref.WeakSet[TwoTowerSession]" = weakref.WeakSet()


class SessionBusy(GenerationError):
    """The waiting queue is full: retry later."""


class Handle:
    """One submitted request: wait for its result, or cancel it, from any thread."""

    def __init__(self, request: Request, timeout: Optional[float]) -> None:
        self.request = request
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.row: Optional[Row] = None
        self.error: Optional[BaseException] = None
        self.timed_out = False
        self._done = threading.Event()
        self._cancel = False
        self._callbacks: list[Callable[["Handle"], None]] = []
        self._callbacks_lock = threading.Lock()

    def add_done_callback(self, callback: Callable[["Handle"], None]) -> None:
        """Call ``callback(handle)`` once when the request ends (at once if it has); it runs
        on the loop's thread, so it must be quick."""
        with self._callbacks_lock:
            if not self.done:
                self._callbacks.append(callback)
                return
        callback(self)

    def _complete(self) -> None:
        with self._callbacks_lock:
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    def cancel(self) -> None:
        """Ask the loop to stop this request; its slot is free within one round."""
        self._cancel = True
        if self.row is not None:
            self.row.cancel_requested = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the request to end, whatever the outcome; False on timeout."""
        return self._done.wait(timeout)

    async def wait(self) -> RequestResult:
        """``result()`` for asyncio: awaits the request's end without blocking the loop."""
        loop = asyncio.get_running_loop()
        ended = loop.create_future()
        self.add_done_callback(
            lambda handle: loop.call_soon_threadsafe(
                lambda: ended.done() or ended.set_result(None)))
        await ended
        return self.result()

    def result(self, timeout: Optional[float] = None) -> RequestResult:
        """The finished request's tokens and stats; re-raises what failed it."""
        if not self._done.wait(timeout):
            raise TimeoutError("the request has not finished yet")
        if self.error is not None:
            raise self.error
        return self.row.result


class TwoTowerSession:
    """Generation over a context executor and a denoiser executor (same or other device)."""

    def __init__(self, context: ContextExecutor, denoiser: DenoiserExecutor,
                 config: TwoTowerConfig, max_context: int, dtype: torch.dtype = torch.float32,
                 fused_unmask: bool = False, limits: SchedulerLimits = SchedulerLimits(),
                 max_waiting: int = DEFAULT_MAX_WAITING) -> None:
        self.context, self.denoiser, self.dtype = context, denoiser, dtype
        towers = LocalTowers(context, denoiser, config, limits.capacity, max_context, dtype,
                             fused_unmask)
        self.fused_unmask = towers.fused_unmask
        self._drive(towers, config, max_context, limits, max_waiting)

    @classmethod
    def over(cls, towers: TowerPair, config: TwoTowerConfig, max_context: int,
             limits: SchedulerLimits = SchedulerLimits(),
             max_waiting: int = DEFAULT_MAX_WAITING) -> "TwoTowerSession":
        """The same front and loop over towers elsewhere (the Triton tower models)."""
        session = cls.__new__(cls)
        session._drive(towers, config, max_context, limits, max_waiting)
        return session

    def _drive(self, towers: TowerPair, config: TwoTowerConfig, max_context: int,
               limits: SchedulerLimits, max_waiting: int) -> None:
        self.config, self.max_context = config, max_context
        self.scheduler = StepScheduler(towers, config, max_context, limits)
        self.max_waiting = max_waiting
        self._lock = threading.Condition()
        self._inbox: list[Handle] = []
        self._live: list[Handle] = []
        self._worker: Optional[threading.Thread] = None
        self._closed = False
        _OPEN_SESSIONS.add(self)

    # --- the thread-safe front ----------------------------------------------------------------
    def submit(self, request: Request, timeout: Optional[float] = None) -> Handle:
        """Queue a request (checked here, in the caller's thread); it joins the next round.
        Past ``max_waiting`` queued requests it is refused with ``SessionBusy``."""
        self.scheduler.check(request)
        return self._enqueue([Handle(request, timeout)], bounded=True)[0]

    def generate(self, requests: list[Request]) -> list[RequestResult]:
        """Run requests to completion; results in their order. Any mix of modes and
        settings may share the batch. A batch the caller hands over whole is not bounded by
        ``max_waiting``: its requests wait for slots, not for the caller."""
        if not requests:
            raise GenerationError("no requests to run")
        for request in requests:
            self.scheduler.check(request)
        handles = self._enqueue([Handle(r, None) for r in requests], bounded=False)
        return [h.result() for h in handles]

    def _enqueue(self, handles: list[Handle], bounded: bool) -> list[Handle]:
        with self._lock:
            if self._closed:
                raise GenerationError("the session is closed")
            waiting = len(self._inbox) + len(self.scheduler.waiting)
            if bounded and waiting + len(handles) > self.max_waiting:
                raise SessionBusy(f"{waiting} requests are already waiting for a slot; retry "
                                  "later")
            self._inbox.extend(handles)
            self._ensure_worker()
            self._lock.notify()
        return handles

    def stream(self, prompt_ids: list[int], settings: GenerationSettings,
               timeout: Optional[float] = None) -> Iterator[list[int]]:
        """Each committed block's ids as it lands (a token at a time in AR modes). Leaving
        the loop early cancels the request."""
        deltas: queue.Queue = queue.Queue()
        handle = self.submit(Request(prompt_ids, settings, deltas.put), timeout)
        threading.Thread(target=lambda: (handle._done.wait(), deltas.put(None)),
                         daemon=True).start()
        try:
            while (ids := deltas.get()) is not None:
                yield ids
            handle.result()
        finally:
            handle.cancel()

    def close(self) -> None:
        """Stop the worker after the current round; queued requests are cancelled."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._worker is not None:
            self._worker.join()

    def __enter__(self) -> "TwoTowerSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the worker ---------------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="twotower-loop",
                                            daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._inbox and self.scheduler.idle and not self._closed:
                    self._lock.wait(IDLE_POLL_SECONDS)
                if self._closed:
                    self._fail_all(GenerationError("the session was closed"))
                    return
                arrived, self._inbox = self._inbox, []
            for handle in arrived:
                handle.row = self.scheduler.add(handle.request)
                if handle._cancel:
                    handle.row.cancel_requested = True
                self._live.append(handle)
            self._expire()
            try:
                self.scheduler.round()
            except Exception as err:  # noqa: BLE001 - the requests it hit carry the error
                self._fail_all(err)
                continue
            self._finish()

    def _expire(self) -> None:
        now = time.monotonic()
        for handle in self._live:
            if handle.deadline is not None and now > handle.deadline and not handle.done:
                handle.timed_out = True
                handle.row.cancel_requested = True

    def _finish(self) -> None:
        kept = []
        for handle in self._live:
            if handle.row.phase == FINISHED:
                handle._complete()
            else:
                kept.append(handle)
        self._live = kept

    def _fail_all(self, err: BaseException) -> None:
        """An executor failed mid-round: the loop starts again from empty pools, then every
        live request gets the error (so a caller that sees it finds the slots freed)."""
        failed, self._live, self._inbox = self._live + self._inbox, [], []
        self.scheduler.reset()
        for handle in failed:
            handle.error = err
            handle._complete()


@atexit.register
def _close_open_sessions() -> None:
    """A worker still inside a tower step when the interpreter exits would abort it: stop
    every loop after its current round first."""
    for session in list(_OPEN_SESSIONS):
        session.close()

