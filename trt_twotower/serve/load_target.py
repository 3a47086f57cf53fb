"""The Triton server as a load-benchmark target (``runtime.load_benchmark.Target``): token ids
straight to the orchestrator (``twotower_bls``) over streaming gRPC, so that both paths start
from the same ids and the table measures the serving layer — gRPC, the orchestrator and the
tower calls — not tokenization.

Each thread that sends requests keeps one connection and one stream open across its requests
(every stream served by one asyncio loop, ``_Loop``),
as a serving client does (a closed-loop client is one thread; the Poisson sender is another);
answers are routed to their request by id. The streams are opened before a run's clock starts
(``connect``) and a sending thread takes one at its first request. Opening a channel per
request, or per client as a run starts, would charge the server for the benchmark's own
connection set-up (64 streams: 57–155 ms, measured, against a 64-client run of ~2.3 s) and
let its rounds run short of rows while the channels open."""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Callable, Optional

from ..policy import GenerationSettings
from .client import (CLOSE_GRACE_S, ORCHESTRATOR, ClientError, client_error, request_inputs,
                     response_parts)


class _Request:
    """One request in flight on a stream: its delta callback and its end."""

    def __init__(self, on_delta: Callable[[list[int]], None]) -> None:
        self.on_delta = on_delta
        self.done = threading.Event()
        self.error: Optional[BaseException] = None
        self.boundary_bytes = 0


class _Loop:
    """The one asyncio loop, on a daemon thread of its own, that every stream of this process
    runs on: tritonclient's threaded streams take two threads each, and 64 of them woke the
    two cores' scheduler ~10 times a message, taking the core of the tower the benchmark
    measures. AR at 64 clients, alternating pairs, Triton/in-process: median 0.878 against
    0.816 (5 pairs, clients in the benchmark's process); a scratch asyncio load generator in a
    process of its own, against the threaded one there, 0.985 against 0.915 (4 pairs)."""

    _shared: Optional["_Loop"] = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="load-streams", daemon=True).start()

    @classmethod
    def shared(cls) -> "_Loop":
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def run(self, coroutine) -> object:
        """Run ``coroutine`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()


class _Stream:
    """One open gRPC stream carrying many requests, one after another or at once."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.requests: dict[str, _Request] = {}
        self.ids = itertools.count()
        self.lock = threading.Lock()
        self._loop = _Loop.shared()
        self._loop.run(self._open())

    async def _open(self) -> None:
        import tritonclient.grpc.aio as grpcaio

        self.client = grpcaio.InferenceServerClient(self.url)
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.answers = self.client.stream_infer(self._requests())
        self.reader = asyncio.ensure_future(self._read())

    async def _requests(self):
        while True:
            item = await self.outbox.get()
            if item is None:
                return  # the stream's sending half closes: the server ends it gracefully
            yield item

    def send(self, prompt: list[int], settings: GenerationSettings, request: _Request) -> None:
        request_id = str(next(self.ids))
        with self.lock:
            self.requests[request_id] = request
        # the asyncio client cannot ask for empty final responses; the orchestrator's final
        # answer to a request that was not cancelled carries its stats, and this target
        # cancels none
        item = {"model_name": ORCHESTRATOR, "request_id": request_id,
                "inputs": request_inputs(prompt, settings, True)}
        self._loop.loop.call_soon_threadsafe(self.outbox.put_nowait, item)

    async def _read(self) -> None:
        """Route every answer; when the stream ends, broken or ended by the server, nothing
        may wait on it for answers that cannot come."""
        try:
            async for result, error in self.answers:
                self._answer(result, error)
        except Exception as err:  # noqa: BLE001 - the stream broke: every request fails
            self._fail_all(ClientError(f"the stream to {self.url} broke: {err}"))
        else:
            self._fail_all(ClientError(f"{self.url} closed the stream"))

    def _fail_all(self, error: BaseException) -> None:
        with self.lock:
            failed, self.requests = list(self.requests.values()), {}
        for request in failed:
            request.error = error
            request.done.set()

    def _answer(self, result, error) -> None:
        """A delta goes to its request's callback at once (its arrival time is what the
        benchmark measures); an error without a request id fails every request on the
        stream."""
        if error is not None:
            self._fail_all(client_error(self.url, error))
            return
        request_id = result.get_response().id
        with self.lock:
            request = self.requests.get(request_id)
        if request is None:
            return
        final, ids, _, stats = response_parts(result)
        if ids:
            request.on_delta(ids)
        if final:
            request.boundary_bytes = stats.get("boundary_bytes") or 0
            with self.lock:
                self.requests.pop(request_id, None)
            request.done.set()

    def close(self) -> None:
        """Gracefully when nothing is in flight (a cancelled stream slows the server's exit),
        else at once."""
        with self.lock:
            idle = not self.requests
        self._loop.run(self._close(CLOSE_GRACE_S if idle else None))

    async def _close(self, grace_s: Optional[float]) -> None:
        if grace_s is not None:
            self.outbox.put_nowait(None)
            try:
                await asyncio.wait_for(asyncio.shield(self.reader), grace_s)
            except asyncio.TimeoutError:
                pass
        if not self.reader.done():
            self.answers.cancel()
            self.reader.cancel()
            self._fail_all(ClientError(f"the stream to {self.url} was closed mid-request"))
        await self.client.close()


class TritonTarget:
    name = "triton"

    def __init__(self, url: str, timeout: float = 600.0) -> None:
        self.url, self.timeout = url, timeout
        self.boundary_bytes = 0   # what the tower calls of finished requests moved
        self._lock = threading.Lock()
        self._streams: dict[int, _Stream] = {}   # this load's, by sending thread
        self._ready: list[_Stream] = []          # opened by ``connect``, no thread's yet

    def connect(self, senders: int) -> None:
        with self._lock:
            missing = senders - len(self._ready)
        opened = [_Stream(self.url) for _ in range(missing)]
        with self._lock:
            self._ready.extend(opened)

    def _stream(self) -> _Stream:
        thread = threading.get_ident()
        with self._lock:
            stream = self._streams.get(thread)
            if stream is None and self._ready:
                stream = self._streams[thread] = self._ready.pop()
        if stream is None:
            stream = _Stream(self.url)
            with self._lock:
                self._streams[thread] = stream
        return stream

    def start(self, prompt: list[int], settings: GenerationSettings,
              on_delta: Callable[[list[int]], None]) -> Callable[[], object]:
        request = _Request(on_delta)
        self._stream().send(list(prompt), settings, request)

        def wait() -> None:
            if not request.done.wait(self.timeout):
                raise ClientError(f"no end of a request from {self.url} within "
                                  f"{self.timeout:g} s")
            if request.error is not None:
                raise request.error
            with self._lock:
                self.boundary_bytes += request.boundary_bytes
        return wait

    def __enter__(self) -> "TritonTarget":
        return self

    def __exit__(self, *exc: object) -> None:
        """The end of a load: close every stream it opened (its threads are gone)."""
        with self._lock:
            streams = list(self._streams.values()) + self._ready
            self._streams, self._ready = {}, []
        for stream in streams:
            stream.close()
