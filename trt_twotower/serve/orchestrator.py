"""What the ``twotower_bls`` model runs: one step loop for every request the server holds.

All requests share one ``TwoTowerSession`` driven over the tower models (``RemoteTowers``), so
each round is one batched call per tower whatever the number of requests (the loop, its
admission, prompt checks and decoding are the in-process engine's, written once). This module
adds what serving needs around it, with no Triton import so that it is tested without a server:

- answers leave through a ``Responder`` on a thread of their own, so a slow client never holds
  up a round;
- a watcher asks every live request's responder whether its client went away (a cancel, a
  dropped connection, a killed process) and cancels it in the loop, which frees its slots on
  both towers within one round;
- a full server refuses at once (``SessionBusy``) rather than queue without bound;
- a streamed request's tokens go out in messages of at least ``stream_interval`` tokens after
  its first (``HeldTokens``): under load each message costs the server's processes and the
  client more than the tokens in it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Optional, Protocol

from ..config import TwoTowerConfig
from ..policy import GenerationSettings, TokenScore
from ..runtime.rows import Request, RequestResult
from ..runtime.scheduler import SchedulerLimits
from ..runtime.session import Handle, TwoTowerSession
from .bls_link import RemoteTowers, TowerCall

WATCH_SECONDS = 0.1
LOG = logging.getLogger(__name__)


def scores_json(scores: list[TokenScore]) -> list[list]:
    """Scores as they travel to clients: [token, logprob, [[token, logprob], ...]] each."""
    return [[s.token, s.logprob, [list(pair) for pair in s.top]] for s in scores]


class Responder(Protocol):
    """One request's way back to its client."""

    stream: bool  # the client takes tokens as they come (else only the final answer)

    def block(self, ids: list[int], scores: Optional[dict]) -> None:
        """Tokens to stream (committed blocks, AR tokens), when the client streams; with
        their scores (and, the first time, the prompt's) when the request asks for them."""

    def finish(self, result: RequestResult, ids: list[int], scores: Optional[dict]) -> None:
        """The request ended: its tokens (unless streamed) and stats, and for a streaming
        client the last tokens not streamed yet (``ids``, with their ``scores``); or a
        cancel."""

    def fail(self, message: str) -> None:
        """The request failed; the message is one line for the client."""

    def gone(self) -> bool:
        """The client cancelled or went away."""


def check_stream_interval(interval: int) -> None:
    if interval < 1:
        raise ValueError(f"a stream interval is at least 1 token, not {interval}")


class HeldTokens:
    """A streamed request's tokens not sent yet. Its first tokens go at once (the time to the
    first block is what a user waits for); after them a message goes once ``interval`` tokens
    wait, a block at least that long whole; what is left goes with the final answer."""

    def __init__(self, interval: int) -> None:
        check_stream_interval(interval)
        self.interval = interval
        self.ids: list[int] = []
        self.sent_any = False

    def add(self, ids: list[int]) -> list[int]:
        """Hold ``ids``; returns the tokens to send now (none while they wait)."""
        self.ids.extend(ids)
        if self.sent_any and len(self.ids) < self.interval:
            return []
        self.sent_any = True
        return self.take()

    def take(self) -> list[int]:
        """Every token held, which are no longer held."""
        ids, self.ids = self.ids, []
        return ids


class Guarded:
    """A responder whose client is never asked about after its final answer went out: in
    Triton the final answer frees the response sender, and asking a freed sender whether it
    was cancelled crashes the server (measured: SIGSEGV in
    ``TRITONBACKEND_ResponseFactoryIsCancelled`` when the watcher raced a final send). The
    answer thread and the watcher take turns on one lock."""

    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.stream = responder.stream
        self.closed = False
        self._lock = threading.Lock()

    def block(self, ids: list[int], scores: Optional[dict]) -> None:
        with self._lock:
            if not self.closed:
                self.responder.block(ids, scores)

    def finish(self, result: RequestResult, ids: list[int], scores: Optional[dict]) -> None:
        with self._lock:
            self.closed = True
            self.responder.finish(result, ids, scores)

    def fail(self, message: str) -> None:
        with self._lock:
            self.closed = True
            self.responder.fail(message)

    def gone(self) -> bool:
        with self._lock:
            return not self.closed and self.responder.gone()


class _LiveRequest:
    """A request being answered: its responder, its tokens held back from the stream, and
    whether its prompt's scores went out."""

    def __init__(self, responder: Responder, request: Request, stream_interval: int) -> None:
        self.responder = Guarded(responder)
        self.request = request
        self.held = HeldTokens(stream_interval)
        self.prompt_scored = False

    def scores(self, count: int) -> Optional[dict]:
        """The last ``count`` tokens' scores, with the prompt's the first time, when the
        request asks for them."""
        if self.request.settings.logprobs is None:
            return None
        kept = self.request.result.logprobs
        scores = {"tokens": scores_json(kept[max(0, len(kept) - count):])}
        if not self.prompt_scored:
            scores["prompt"] = scores_json(self.request.result.prompt_logprobs)
            self.prompt_scored = True
        return scores


class Orchestrator:
    def __init__(self, call: TowerCall, secret: str, config: TwoTowerConfig, max_context: int,
                 limits: SchedulerLimits, max_waiting: int, stream_interval: int) -> None:
        check_stream_interval(stream_interval)  # at start, not with the first request
        self.stream_interval = stream_interval
        self.towers = RemoteTowers(call, secret, limits.capacity)
        self.session = TwoTowerSession.over(self.towers, config, max_context, limits,
                                            max_waiting)
        self.live: dict[Handle, _LiveRequest] = {}
        self._lock = threading.Lock()
        self._answers: queue.Queue = queue.Queue()
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._answer, name="bls-answers", daemon=True),
                         threading.Thread(target=self._watch, name="bls-watch", daemon=True)]
        for thread in self._threads:
            thread.start()

    def submit(self, prompt_ids: list[int], settings: GenerationSettings,
               responder: Responder) -> Handle:
        """Queue a request; raises ``SessionBusy`` or a ``GenerationError`` at once."""
        request = Request(prompt_ids, settings)
        live = _LiveRequest(responder, request, self.stream_interval)

        def on_delta(ids: list[int]) -> Optional[bool]:
            if self._stopping.is_set():
                return False
            if not live.responder.stream:
                return None  # its tokens go with the final answer: nothing to hold or send
            ready = live.held.add(ids)
            if ready:
                self._answers.put((live.responder.block, ready, live.scores(len(ready))))
            return None

        request.on_delta = on_delta
        handle = self.session.submit(request)
        with self._lock:
            self.live[handle] = live
        handle.add_done_callback(self._ended)
        return handle

    def _ended(self, handle: Handle) -> None:
        with self._lock:
            live = self.live.pop(handle, None)
        if live is None:
            return
        responder = live.responder
        if handle.error is not None:  # before any row: a request failed while it waited has none
            self._answers.put((responder.fail, " ".join(str(handle.error).split())))
            return
        result = handle.row.result
        if result.cancelled and self._stopping.is_set():
            self._answers.put((responder.fail, "the server is shutting down; the request "
                                               "was stopped"))
        else:
            tail = [] if result.cancelled else live.held.take()
            self._answers.put((responder.finish, result, tail,
                               live.scores(len(tail)) if tail else None))

    def _answer(self) -> None:
        while True:
            item = self._answers.get()
            if item is None:
                return
            send, *args = item
            try:
                send(*args)
            except Exception as err:  # noqa: BLE001 - a gone client; the others go on
                LOG.debug("an answer could not be sent: %s", err)

    def _watch(self) -> None:
        while not self._stopping.wait(WATCH_SECONDS):
            with self._lock:
                watched = list(self.live.items())
            for handle, live in watched:
                try:
                    if live.responder.gone():
                        handle.cancel()
                except Exception:  # noqa: BLE001 - cannot ask: treat the client as gone
                    handle.cancel()

    def close(self, timeout: float) -> None:
        """Running requests stop at their next round (their slots are freed) and get a
        shutdown error; queued answers are sent, all within ``timeout`` seconds."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        with self._lock:
            handles = list(self.live)
        for handle in handles:
            handle.cancel()
        for handle in handles:
            handle.join(max(0.0, deadline - time.monotonic()))
        self.session.close()
        self._answers.put(None)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
