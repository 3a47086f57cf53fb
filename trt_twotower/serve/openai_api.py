"""An OpenAI-compatible HTTP front of a trt-twotower Triton server.

Tools that benchmark and evaluate LLMs (the official ``openai`` client, AIPerf,
lm-evaluation-harness) speak the OpenAI API, not Triton's gRPC streaming RPC, so this app
translates one into the other: each request is tokenized here with the served checkpoint's
tokenizer and becomes one stream of the orchestrator model (``twotower_bls``) through
``trt_twotower.serve.client`` — the orchestrator, not the ensemble, so that a client that
disconnects cancels its request all the way to the towers. The orchestrator generates whole
blocks and knows no stop strings, so the budget cut, the stop cut and incremental
detokenization happen here too."""

from __future__ import annotations

import functools
import json
import re
import socket
import threading
import time
import uuid
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Optional, Union

import anyio
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ..errors import TwoTowerError
from ..policy import GenerationError, GenerationSettings, blocks_needed
from ..tokenizer import TwoTowerTokenizer
from .client import ClientError, server_ready, stream_generate
from .openai_logprobs import TokenTexts, logprobs_object

RETRY_AFTER_S = 1
START_TIMEOUT_S = 30.0
TRITON_PREFIX = re.compile(r"^in ensemble '[^']*', ")  # where it failed, not what
SETTINGS = ("logprobs", "max_tokens", "block_size", "steps_per_block", "confidence_threshold",
            "temperature", "top_p", "mode")
HEALTH_TIMEOUT_S = 2.0
CLIENT_CLOSED = 499  # the status nginx logs for a client that left before its answer


class APIError(TwoTowerError):
    """A request the API refuses, carried to the client as an OpenAI error object."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, kind: str = "invalid_request_error",
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def _unavailable(message: str) -> APIError:
    """503 with Retry-After: the client should come back, not fix its request."""
    return APIError(503, message, kind="server_error", code="service_unavailable",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def _refusal(error: ClientError) -> APIError:
    """The Triton server's answer as an API error: unreachable or silent is the server's
    problem (503); a refusal is the request's (400), naming the input the server named."""
    message = str(error)
    if message.startswith(("cannot reach", "no response")):
        return _unavailable(message)
    message = TRITON_PREFIX.sub("", message.split(" refused the request: ", 1)[-1])
    return APIError(400, message, param=_named_param(message))


def _named_param(message: str) -> Optional[str]:
    """The parameter a validation message (the policy's or the server's) is about: both
    name the setting first, and call the prompt ``text_input`` or blame the context."""
    if "text_input" in message or "context" in message:
        return "prompt"
    return next((p for p in SETTINGS if p in message), None)


# --- requests ------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The body ``openai.completions.create`` sends, plus TwoTower's settings as extra body
    fields. Defaults are the project's (greedy), except OpenAI's ``max_tokens`` of 16."""

    model_config = ConfigDict(extra="allow")  # tools send fields (user, ...) that change nothing
    model: str
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(GenerationSettings.temperature, ge=0.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False
    mode: str = GenerationSettings.mode
    block_size: int = Field(GenerationSettings.block_size, ge=1)
    steps_per_block: int = Field(GenerationSettings.steps_per_block, ge=1)
    confidence_threshold: float = Field(GenerationSettings.confidence_threshold, ge=0.0, le=1.0)


def _unsupported(request: CompletionRequest) -> None:
    """Refuse, by name, what the API defines but this server does not serve yet."""
    if request.n != 1:
        raise APIError(400, f"n={request.n}: one choice per request is served (n=1)",
                       param="n")


def _prompt_ids(prompt: Union[str, list], tokenizer: TwoTowerTokenizer) -> list[int]:
    """The prompt as token ids, tokenized here exactly as the checkpoint's tokenizer.json
    does (ids are sent as they are): the request then goes straight to the orchestrator,
    whose stream a disconnecting client can cancel all the way to the towers."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and not all(isinstance(p, int) for p in prompt):
        raise APIError(400, f"prompt holds {len(prompt)} prompts: send one per request",
                       param="prompt")
    if not prompt:
        raise APIError(400, "prompt is empty: send a prompt", param="prompt")
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
        if not ids:
            raise APIError(400, "prompt encodes to no tokens", param="prompt")
        return ids
    if not all(0 <= i < tokenizer.vocab_size for i in prompt):
        raise APIError(400, f"prompt token ids must lie in [0, {tokenizer.vocab_size})",
                       param="prompt")
    return list(prompt)


def _settings(request: CompletionRequest) -> GenerationSettings:
    """The generation the orchestrator runs: diffusion makes whole blocks, so the budget is
    rounded up to a block multiple here and the text cut back to ``max_tokens`` later."""
    budget, mode = request.max_tokens, request.mode
    if request.logprobs is not None and "mode" not in request.model_fields_set:
        mode = "ar"  # log-probabilities come from the context tower's next-token steps
    if mode == "diffusion":
        budget = blocks_needed(budget, request.block_size) * request.block_size
    try:
        return GenerationSettings(
            mode=mode, max_new_tokens=budget, block_size=request.block_size,
            steps_per_block=request.steps_per_block,
            confidence_threshold=request.confidence_threshold,
            temperature=request.temperature, top_p=request.top_p,
            seed=request.seed if request.seed is not None else GenerationSettings.seed,
            logprobs=request.logprobs, echo=request.echo and request.logprobs is not None)
    except GenerationError as err:
        raise APIError(400, str(err), param=_named_param(str(err))) from None


def _stops(stop: Union[str, list[str], None]) -> tuple[str, ...]:
    return tuple(s for s in ([stop] if isinstance(stop, str) else stop or []) if s)


# --- text ----------------------------------------------------------------------------------


@dataclass
class TextCutter:
    """Blocks of ids in, text out: cut at the token budget and at the first stop string, and
    held back while it ends in a partial character or a possible start of a stop string, so
    that streamed pieces join to exactly the non-streamed text."""

    tokenizer: TwoTowerTokenizer
    max_tokens: int
    stops: tuple[str, ...]
    ids: list[int] = field(default_factory=list)
    sent: int = 0
    finish_reason: Optional[str] = None
    completion_tokens: int = 0

    def add(self, ids: list[int]) -> str:
        """The text that became final with these ids."""
        self.ids.extend(ids[:self.max_tokens - len(self.ids)])
        text = self.tokenizer.decode(self.ids)
        cut = self._first_stop(text)
        if cut is not None:
            self.finish_reason = "stop"
            self.completion_tokens = self._tokens_to_reach(cut)
            return self._emit(text[:cut])
        self.completion_tokens = len(self.ids)
        if len(self.ids) >= self.max_tokens:
            self.finish_reason = "length"
            return self._emit(text)
        return self._emit(text[:len(text) - self._held_back(text)])

    def close(self) -> str:
        """The rest once the server has ended the generation (its end-of-sequence token)."""
        if self.finish_reason is not None:
            return ""
        self.finish_reason = "stop"
        return self._emit(self.tokenizer.decode(self.ids))

    def _emit(self, text: str) -> str:
        piece, self.sent = text[self.sent:], max(self.sent, len(text))
        return piece

    def _first_stop(self, text: str) -> Optional[int]:
        found = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stops)
                 if i >= 0]
        return min(found) if found else None

    def _tokens_to_reach(self, cut: int) -> int:
        """The fewest ids whose text contains the stop: what the model spent on the answer."""
        for k in range(1, len(self.ids) + 1):
            stop = self._first_stop(self.tokenizer.decode(self.ids[:k]))
            if stop is not None and stop <= cut:
                return k
        return len(self.ids)

    def _held_back(self, text: str) -> int:
        partial = len(text) - len(text.rstrip("\ufffd"))
        prefixes = [n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:n])]
        return max([partial, *prefixes])


# --- metrics -------------------------------------------------------------------------------


@dataclass
class Metrics:
    """Counters for ``GET /metrics``. Only the event loop touches them (handlers and stream
    generators run there; worker threads only fetch responses), so they need no lock."""

    requests: dict[int, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generated_tokens: int = 0
    denoiser_evaluations: int = 0
    in_flight: int = 0

    def finished(self, status: int, usage: Optional[dict] = None) -> None:
        self.requests[status] = self.requests.get(status, 0) + 1
        if usage:
            self.prompt_tokens += usage["prompt_tokens"]
            self.completion_tokens += usage["completion_tokens"]
            evaluations = usage.get("denoiser_evaluations") or 0
            self.denoiser_evaluations += evaluations
            self.generated_tokens += round((usage.get("tokens_per_evaluation") or 0)
                                           * evaluations)

    def text(self) -> str:
        """Prometheus text exposition format."""
        ratio = (self.generated_tokens / self.denoiser_evaluations
                 if self.denoiser_evaluations else 0.0)
        lines = _metric("requests_total", "counter", "completed requests by HTTP status",
                        [(f'{{status="{s}"}}', n) for s, n in sorted(self.requests.items())])
        for name, kind, about, value in (
                ("prompt_tokens_total", "counter", "prompt tokens served", self.prompt_tokens),
                ("completion_tokens_total", "counter", "completion tokens returned",
                 self.completion_tokens),
                ("denoiser_evaluations_total", "counter", "denoiser tower evaluations",
                 self.denoiser_evaluations),
                ("tokens_per_denoiser_evaluation", "gauge",
                 "tokens committed per denoiser evaluation, over all requests", ratio),
                ("requests_in_flight", "gauge", "requests being generated now",
                 self.in_flight)):
            lines += _metric(name, kind, about, [("", value)])
        return "\n".join(lines) + "\n"


def _metric(name: str, kind: str, about: str, samples: list[tuple[str, float]]) -> list[str]:
    full = f"twotower_openai_{name}"
    return [f"# HELP {full} {about}", f"# TYPE {full} {kind}",
            *(f"{full}{labels} {value}" for labels, value in samples)]


# --- generation ----------------------------------------------------------------------------


@dataclass
class Job:
    """One completion request, ready to run against the orchestrator."""

    id: str
    created: int
    model: str
    prompt_ids: list[int]
    settings: GenerationSettings
    cutter: TextCutter
    wants_usage: bool  # run on after a stop string: the usage needs the server's final stats
    echo: bool = False
    stats: dict = field(default_factory=dict)
    scores: list = field(default_factory=list)          # the completion tokens'
    prompt_scores: Optional[list] = None               # echo: the prompt's, after the first
    texts: Optional[TokenTexts] = None                 # token texts, as far as worked out

    @functools.cached_property
    def prompt_text(self) -> str:
        return self.cutter.tokenizer.decode(self.prompt_ids)

    def pieces(self, url: str, timeout: float) -> Iterator[str]:
        """Text as it becomes final, block by block; closing it cancels the request."""
        with closing(stream_generate(url, self.prompt_ids, self.settings, True,
                                     timeout)) as stream:
            for ids, _, stats in stream:
                scored = stats.pop("logprobs", None) if stats else None
                if scored is not None:
                    self.scores += scored.get("tokens", [])
                    self.prompt_scores = scored.get("prompt", self.prompt_scores)
                self.stats = stats or self.stats
                if self.cutter.finish_reason is None:
                    yield self.cutter.add(ids)
                    if self.cutter.finish_reason == "stop" and not self.wants_usage:
                        return  # a stop string ended it and nobody asked what it cost: cancel
        yield self.cutter.close()

    def usage(self) -> dict:
        """OpenAI's usage plus what block diffusion costs (denoiser evaluations) and buys
        (tokens per evaluation), as the server counted them for the whole generation."""
        completion, prompt = self.cutter.completion_tokens, len(self.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "denoiser_evaluations": self.stats.get("denoiser_evaluations"),
                "tokens_per_evaluation": self.stats.get("tokens_per_evaluation")}

    def choice(self, text: str, finish_reason: Optional[str], logprobs: Optional[dict] = None
               ) -> dict:
        return {"text": text, "index": 0, "finish_reason": finish_reason, "logprobs": logprobs}

    def echoed(self) -> str:
        """The prompt's text when the request echoes it, else nothing."""
        return self.prompt_text if self.echo else ""

    def _texts(self) -> list[str]:
        """The prompt's and the kept completion tokens' texts, each decoded once."""
        if self.texts is None:
            self.texts = TokenTexts(self.cutter.tokenizer)
            self.texts.extend(self.prompt_ids)
        self.texts.extend(self.cutter.ids[len(self.texts.ids) - len(self.prompt_ids):])
        return self.texts.texts(len(self.prompt_ids) + self.cutter.completion_tokens)

    def logprobs(self, first: int = 0, last: Optional[int] = None) -> Optional[dict]:
        """The choice's logprobs object (entries ``first`` to ``last``) for the tokens the
        completion kept (a stop string may end it early)."""
        if self.settings.logprobs is None:
            return None
        kept = self.cutter.completion_tokens
        return logprobs_object(self.cutter.tokenizer, self._texts(), len(self.prompt_ids),
                               self.prompt_scores if self.echo else None, self.scores[:kept],
                               first, last)

    def logprobs_since(self, sent: int, final: bool) -> tuple[Optional[dict], int]:
        """A stream chunk's logprobs: the entries after the first ``sent`` whose token's text
        has been streamed in full (all that are left once ``final``); and the new count."""
        if self.settings.logprobs is None:
            return None, sent
        texts = self._texts()
        start = 0 if self.echo else len(self.prompt_ids)
        end = len(texts) - start
        if not final:
            streamed = len(self.prompt_text) + self.cutter.sent
            at, end = sum(len(t) for t in texts[:start + sent]), sent
            while start + end < len(texts) and at + len(texts[start + end]) <= streamed:
                at, end = at + len(texts[start + end]), end + 1
        return self.logprobs(sent, end), max(sent, end)

    def envelope(self, choices: list[dict], **extra: Any) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "choices": choices, **extra}


def _sse(payload: Union[dict, str]) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


# --- the app -------------------------------------------------------------------------------


def create_app(grpc_url: str, model_name: str, tokenizer: TwoTowerTokenizer,
               api_key: Optional[str] = None, max_in_flight: int = 64,
               timeout: float = 120.0) -> FastAPI:
    """The FastAPI app serving ``model_name`` from the Triton server at ``grpc_url``.
    ``max_in_flight`` bounds the requests generating at once (more get 503 and Retry-After)
    so that a burst queues at the client, where it can back off, rather than here."""
    app = FastAPI(title="trt-twotower OpenAI-compatible API")
    metrics = Metrics()
    app.state.metrics = metrics

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        metrics.finished(err.status)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return await api_error(request, _validation_error(err))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return await api_error(request, APIError(err.status_code, str(err.detail)))

    def authorize(request: Request) -> None:
        """Runs before the body is read, so a caller without the key learns nothing more."""
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "invalid API key: send it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def job_for(body: CompletionRequest) -> Job:
        if body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server "
                                f"serves {model_name!r}", param="model", code="model_not_found")
        _unsupported(body)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Job(f"cmpl-{uuid.uuid4().hex}", int(time.time()), model_name,
                   _prompt_ids(body.prompt, tokenizer), _settings(body),
                   TextCutter(tokenizer, body.max_tokens, _stops(body.stop)),
                   wants_usage=include_usage or not body.stream, echo=body.echo)

    def admit() -> None:
        if metrics.in_flight >= max_in_flight:
            raise _unavailable(f"the server is full ({max_in_flight} requests in flight)")
        metrics.in_flight += 1

    @app.get("/health")
    async def health() -> dict:
        """200 only while Triton answers ready, so a load balancer stops sending requests
        while `serve` restarts a server one of whose processes died."""
        if not await anyio.to_thread.run_sync(server_ready, grpc_url, HEALTH_TIMEOUT_S):
            raise _unavailable("the Triton server is not ready (starting or recovering)")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": 0, "owned_by": "trt-twotower"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat() -> None:
        raise APIError(400, "the served checkpoint is a base model with no chat template: "
                            "use /v1/completions with a plain prompt", param="messages")

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest) -> Any:
        job = job_for(body)
        admit()
        try:
            pieces = job.pieces(grpc_url, timeout)
            first = await _next_piece(pieces)
        except BaseException:
            metrics.in_flight -= 1
            raise
        first = job.echoed() + (first or "")
        if body.stream:
            return StreamingResponse(_stream(job, pieces, first, metrics),
                                     media_type="text/event-stream")
        return JSONResponse(await _whole(job, pieces, first, metrics))

    return app


def _validation_error(err: RequestValidationError) -> APIError:
    """FastAPI's 422 as OpenAI's 400, naming the first parameter that was wrong."""
    first = err.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = loc[0] if loc and first.get("type") != "json_invalid" else None
    message = first.get("msg", "invalid request")
    return APIError(400, f"{param}: {message}" if param else message, param=param)


async def _next_piece(pieces: Iterator[str]) -> Optional[str]:
    """The next piece from a worker thread (None at the end), as an APIError on failure."""
    try:
        return await anyio.to_thread.run_sync(next, pieces, None)
    except ClientError as err:
        raise _refusal(err) from None


async def _whole(job: Job, pieces: Iterator[str], first: Optional[str],
                 metrics: Metrics) -> dict:
    """The non-streaming response: every piece, then one choice (with its logprobs when
    asked) and the usage."""
    parts = [first or ""]
    try:
        while (piece := await _next_piece(pieces)) is not None:
            parts.append(piece)
    finally:
        metrics.in_flight -= 1
    usage = job.usage()
    metrics.finished(200, usage)
    return job.envelope([job.choice("".join(parts), job.cutter.finish_reason,
                                    job.logprobs())], usage=usage)


async def _stream(job: Job, pieces: Iterator[str], first: Optional[str],
                  metrics: Metrics) -> AsyncIterator[str]:
    """Server-sent events: a chunk per non-empty piece, the finish reason, the usage when
    asked, then [DONE]. A disconnect cancels this generator, which cancels the request."""
    usage_field = {"usage": None} if job.wants_usage else {}
    piece, scored = first, 0
    try:
        while piece is not None:
            if piece:
                logprobs, scored = job.logprobs_since(scored, final=False)
                yield _sse(job.envelope([job.choice(piece, None, logprobs)], **usage_field))
            piece = await _next_piece(pieces)
        logprobs, scored = job.logprobs_since(scored, final=True)
        yield _sse(job.envelope([job.choice("", job.cutter.finish_reason, logprobs)],
                                **usage_field))
        if job.wants_usage:
            yield _sse(job.envelope([], usage=job.usage()))
        metrics.finished(200, job.usage())
    except APIError as err:
        metrics.finished(err.status)
        yield _sse(err.body())
    except anyio.get_cancelled_exc_class():
        metrics.finished(CLIENT_CLOSED)
        raise
    finally:
        pieces.close()
        metrics.in_flight -= 1
    yield _sse("[DONE]")


# --- serving -------------------------------------------------------------------------------


class OpenAIServerError(TwoTowerError, RuntimeError):
    """The HTTP server could not start (the address or port is taken or wrong, or start-up
    timed out)."""


@dataclass
class OpenAIServer:
    """A running uvicorn server; ``stop`` ends it and waits for its thread."""

    server: uvicorn.Server
    thread: threading.Thread
    address: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def run_openai_server(app: FastAPI, address: str, port: int,
                      timeout: float = START_TIMEOUT_S) -> OpenAIServer:
    """Serve ``app`` with uvicorn on a thread, so that ``trt-twotower serve`` keeps its main
    thread for supervising tritonserver and Ctrl-C; returns once it listens, or raises within
    ``timeout``. Port 0 picks a free port, which the handle reports."""
    listener = _bound_socket(address, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]},
                              name="openai-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        server.should_exit = True
        thread.join(5.0)
        listener.close()
        raise OpenAIServerError(f"the OpenAI API on {address}:{port} did not start within "
                                f"{timeout:g} s")
    return OpenAIServer(server, thread, address, listener.getsockname()[1])


def _bound_socket(address: str, port: int) -> socket.socket:
    """The listening address, bound here so that a taken port is a clear error at once
    rather than an exception on uvicorn's thread."""
    try:
        family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]
        listener = socket.socket(family, socket.SOCK_STREAM)
    except OSError as err:
        raise OpenAIServerError(f"cannot listen on {address}: {err.strerror or err}") from None
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((address, port))
    except OSError as err:
        listener.close()
        raise OpenAIServerError(f"the OpenAI API cannot listen on {address}:{port}: "
                                f"{err.strerror or err} (is the port in use? choose another "
                                "port, or 0 for any free one)") from None
    return listener
