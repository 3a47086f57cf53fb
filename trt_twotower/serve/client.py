"""The gRPC client of a trt-twotower Triton server (streaming and not, timeouts,
cancellation). Decoupled models only answer the streaming RPC, so both modes use it; with
stream=False the server sends one response."""

from __future__ import annotations

import json
import math
import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Generator, Iterator, Optional, Union

import numpy as np

from ..errors import TwoTowerError
from ..policy import GenerationSettings
from .repository import TOWER_MODELS

if TYPE_CHECKING:
    from tritonclient.grpc import InferenceServerClient
    from tritonclient.utils import InferenceServerException

CLOSE_GRACE_S = 2.0  # a finished stream closes in milliseconds; past this it is cancelled


class ClientError(TwoTowerError, RuntimeError):
    """The server refused the request, is unreachable, or did not answer in time."""


@dataclass
class Completion:
    text: str = ""
    ids: list[int] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    blocks: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


# The range of each integer Triton dtype: numpy would wrap a value outside it silently
# (max_tokens 4294967312 arrives as 16), so such a value is refused before it is sent.
INT_RANGES = {"INT32": np.iinfo(np.int32), "INT64": np.iinfo(np.int64)}
ENSEMBLE, ORCHESTRATOR = "ensemble", "twotower_bls"
NUMPY_TYPES = {"BYTES": np.object_, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32,
               "BOOL": np.bool_}


def _entry(name: str, value, dtype: str) -> tuple[str, np.ndarray, str]:
    """One input as (name, one-element array, Triton dtype), refusing an integer its dtype
    cannot hold."""
    limits = INT_RANGES.get(dtype)
    if limits is not None and not limits.min <= value <= limits.max:
        raise ClientError(f"{name}={value} does not fit the server's {dtype} input: it must "
                          f"lie in {limits.min}..{limits.max}")
    return name, np.array([value], dtype=NUMPY_TYPES[dtype]), dtype


def _utf8(prompt: str) -> bytes:
    try:
        return prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ClientError(f"the prompt is not valid UTF-8 text ({err.reason} at character "
                          f"{err.start}); send text, not raw bytes") from None


def _prompt_entry(prompt: Union[str, list[int]]) -> tuple[str, np.ndarray, str]:
    """Text for the ensemble (``text_input``), or token ids for the orchestrator
    (``input_ids``) from a caller that tokenizes itself."""
    if isinstance(prompt, str):
        return _entry("text_input", _utf8(prompt), "BYTES")
    limits = INT_RANGES["INT64"]
    if not prompt or not all(isinstance(i, int) and limits.min <= i <= limits.max
                             for i in prompt):
        raise ClientError("prompt ids must be a non-empty list of int64 token ids")
    return "input_ids", np.array(prompt, dtype=np.int64), "INT64"


def _arrays(prompt: Union[str, list[int]], settings: GenerationSettings, stream: bool
            ) -> list[tuple[str, np.ndarray, str]]:
    """Each input as (name, array, Triton dtype)."""
    return [_prompt_entry(prompt),
            _entry("max_tokens", settings.max_new_tokens, "INT32"),
            _entry("stream", stream, "BOOL"),
            _entry("temperature", settings.temperature, "FP32"),
            _entry("top_k", settings.top_k or 0, "INT32"),
            _entry("top_p", settings.top_p or 1.0, "FP32"),
            _entry("mode", settings.mode.encode(), "BYTES"),
            _entry("block_size", settings.block_size, "INT32"),
            _entry("steps_per_block", settings.steps_per_block, "INT32"),
            _entry("confidence_threshold", settings.confidence_threshold, "FP32"),
            _entry("seed", settings.seed, "INT64")] + _orchestrator_only(prompt, settings)


def _orchestrator_only(prompt: Union[str, list[int]], settings: GenerationSettings
                       ) -> list[tuple[str, np.ndarray, str]]:
    """Settings the orchestrator takes and the ensemble does not pass on: sent with token
    ids only, and only when they differ from the defaults."""
    if isinstance(prompt, str):
        return []
    extra = []
    if settings.forced_commits is not None:
        extra.append(_entry("forced_commits", settings.forced_commits, "INT32"))
    if not settings.stop_at_eos:
        extra.append(_entry("ignore_eos", True, "BOOL"))
    if settings.logprobs is not None:
        extra.append(_entry("logprobs", settings.logprobs, "INT32"))
    if settings.echo:
        extra.append(_entry("echo", True, "BOOL"))
    return extra


def request_inputs(prompt: Union[str, list[int]], settings: GenerationSettings, stream: bool
                   ) -> list:
    """A generation request's ``InferInput`` tensors."""
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, array, dtype in _arrays(prompt, settings, stream):
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def request_bytes(prompt: str, settings: GenerationSettings) -> int:
    """The payload a request sends: its tensors' data, without gRPC framing."""
    return sum(len(a[0]) if a.dtype == np.object_ else a.nbytes
               for _, a, _ in _arrays(prompt, settings, True))


def stream_generate(url: str, prompt: Union[str, list[int]], settings: GenerationSettings,
                    stream: bool = True, timeout: float = 120.0, model: Optional[str] = None,
                    cancel_after_blocks: Optional[int] = None,
                    before_send: Optional[Callable[[], None]] = None) -> Iterator[tuple]:
    """Yields (ids, text, stats) per response; stops after the final response, or raises
    ClientError when the server refuses, is unreachable or sends nothing for ``timeout``
    seconds. ``before_send`` runs once the stream is open, just before the request goes out.
    With ``settings.logprobs``, a response's stats carry its tokens' scores under
    ``logprobs`` (``tokens``; the first also ``prompt`` when the settings echo).

    A text prompt goes to ``ensemble``, token ids straight to the orchestrator
    (``twotower_bls``). Either way a stream that ends early (``cancel_after_blocks``, a
    timeout, this process dying) cancels the request: the orchestrator stops within a block
    and the towers free its caches."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    if not 0 < timeout < math.inf:
        raise ClientError(f"timeout must be a finite number of seconds above 0, got "
                          f"{timeout!r}")
    inputs = request_inputs(prompt, settings, stream)
    model = model or (ENSEMBLE if isinstance(prompt, str) else ORCHESTRATOR)
    responses: "queue.Queue" = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    finished = False
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        if before_send is not None:
            before_send()
        try:
            client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        except InferenceServerException:
            pass  # the stream has already failed: its cause is the next thing in `responses`
        finished = yield from _responses(responses, url, timeout, cancel_after_blocks)
    except _Answered as answered:
        finished = True  # the server's error was the request's last answer: nothing to cancel
        raise answered.error from None
    except InferenceServerException as err:
        raise client_error(url, err) from None
    finally:
        close_stream(client, min(timeout, CLOSE_GRACE_S) if finished else None)


def _responses(responses: "queue.Queue", url: str, timeout: float,
               cancel_after_blocks: Optional[int]) -> Generator[tuple, None, bool]:
    """The stream's answers as (ids, text, stats), each within ``timeout`` of the one before;
    returns True after the final one, False when ``cancel_after_blocks`` stops it before."""
    seen = 0
    while True:
        try:
            result, error = responses.get(timeout=timeout)
        except queue.Empty:
            raise ClientError(f"no response from {url} within {timeout:g} s") from None
        if error is not None:
            raise _Answered(client_error(url, error))
        final, ids, text, stats = response_parts(result)
        if ids is not None and (len(ids) or not final):
            yield ids, text, stats
            seen += 1
            if cancel_after_blocks is not None and seen >= cancel_after_blocks:
                return final  # a request whose final answer came is not cancelled
        elif ids is not None and stats:
            yield [], "", stats
        if final:
            return True


def response_parts(result) -> tuple[bool, Optional[list[int]], str, dict]:
    """One streamed answer as (final, its ids or None, their text, stats): the stats with this
    answer's scores under ``logprobs`` where it carries them."""
    final = result.get_response().parameters["triton_final_response"].bool_param
    ids = result.as_numpy("output_ids")
    stats = result.as_numpy("stats")
    stats = json.loads(stats[0]) if stats is not None and stats[0] else {}
    scores = result.as_numpy("logprobs")
    if scores is not None and scores[0]:
        stats["logprobs"] = json.loads(scores[0])  # this response's tokens' scores
    text = result.as_numpy("text_output")
    return (final, None if ids is None else ids.tolist(),
            text[0].decode() if text is not None and ids is not None else "", stats)


class _Answered(Exception):
    """The server ended the request with an error: its stream closes gracefully, since
    cancelling a request that already had its final answer leaves Triton's Python backend
    holding it (measured: the ensemble model then never unloaded, and the server outlived its
    exit timeout)."""

    def __init__(self, error: ClientError) -> None:
        super().__init__(str(error))
        self.error = error


def client_error(url: str, error: "InferenceServerException") -> ClientError:
    """A one-line ClientError for an InferenceServerException: unreachable, or refused."""
    message = " ".join(str(error.message() or error).split())
    if error.status() == "StatusCode.UNAVAILABLE":
        return ClientError(f"cannot reach {url}: {message}; is `trt-twotower serve` running "
                           "there?")
    return ClientError(f"{url} refused the request: {message}")


def close_stream(client: "InferenceServerClient", grace_s: Optional[float]) -> None:
    """Stop the stream within a deadline, then close the channel. A finished stream is
    closed gracefully, for at most ``grace_s`` (tritonserver takes its whole exit timeout to
    stop after a cancelled stream); any other is cancelled, which ends it on this side at
    once. tritonclient's graceful stop waits for the server to close its side, which a
    stalled server never does, so it runs on a helper thread."""
    if grace_s is None:
        client.stop_stream(cancel_requests=True)
    else:
        stream = client._stream  # tritonclient has no stop with a deadline: cancel it here
        closing = threading.Thread(target=client.stop_stream, daemon=True)
        closing.start()
        closing.join(grace_s)
        if closing.is_alive():
            stream.close(cancel_requests=True)
            closing.join()  # returns at once: the cancel ended the stream it waited for
    client.close()


def generate(url: str, prompt: str, settings: GenerationSettings, stream: bool = True,
             timeout: float = 120.0) -> Completion:
    """The whole completion; with stream=True its messages (blocks, or a few AR tokens) as
    they arrived too."""
    out = Completion()
    for ids, text, stats in stream_generate(url, prompt, settings, stream, timeout):
        if ids:
            out.blocks.append(ids)
            out.texts.append(text)
            out.ids.extend(ids)
        if stats:
            out.stats = stats
    out.text = "".join(out.texts)
    return out


def server_ready(url: str, timeout: float = 2.0) -> bool:
    """Whether the server at ``url`` answers ready within ``timeout`` (False when it answers
    nothing: stopped, starting or restarting)."""
    import tritonclient.grpc as grpcclient

    try:
        client = grpcclient.InferenceServerClient(url)
        try:
            return bool(client.is_server_ready(client_timeout=timeout))
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - unreachable, refused, timed out: all mean not ready
        return False


def tower_stats(url: str, timeout: float = 30.0) -> dict[str, dict]:
    """Each tower model's sequences: live, opened, released, cache bytes held."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url)
    try:
        op = grpcclient.InferInput("op", [1], "BYTES")
        op.set_data_from_numpy(np.array([b"stats"], dtype=np.object_))
        return {model: json.loads(client.infer(model, [op], client_timeout=timeout)
                                  .as_numpy("stats")[0])
                for model in TOWER_MODELS}
    except InferenceServerException as err:
        raise ClientError(f"cannot read tower stats from {url}: {err}") from err
    finally:
        client.close()
