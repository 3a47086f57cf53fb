"""The gRPC client of a trt-twotower Triton server (streaming and not, timeouts,
cancellation). Decoupled models only answer the streaming RPC, so both modes use it; with
stream=False the server sends one response."""

from __future__ import annotations

import json
import queue
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np

from ..policy import GenerationSettings
from .repository import TOWER_MODELS


class ClientError(RuntimeError):
    """The server refused the request, is unreachable, or did not answer in time."""


@dataclass
class Completion:
    text: str = ""
    ids: list[int] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    blocks: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


def _arrays(prompt: str, settings: GenerationSettings, stream: bool
            ) -> list[tuple[str, np.ndarray, str]]:
    """Each input as (name, one-element array, Triton dtype)."""
    def entry(name: str, value, dtype: str):
        kind = {"BYTES": np.object_, "INT32": np.int32, "INT64": np.int64,
                "FP32": np.float32, "BOOL": np.bool_}[dtype]
        return name, np.array([value], dtype=kind), dtype

    return [entry("text_input", prompt.encode("utf-8"), "BYTES"),
            entry("max_tokens", settings.max_new_tokens, "INT32"),
            entry("stream", stream, "BOOL"),
            entry("temperature", settings.temperature, "FP32"),
            entry("top_k", settings.top_k or 0, "INT32"),
            entry("top_p", settings.top_p or 1.0, "FP32"),
            entry("mode", settings.mode.encode(), "BYTES"),
            entry("block_size", settings.block_size, "INT32"),
            entry("steps_per_block", settings.steps_per_block, "INT32"),
            entry("confidence_threshold", settings.confidence_threshold, "FP32"),
            entry("seed", settings.seed, "INT64")]


def _inputs(prompt: str, settings: GenerationSettings, stream: bool) -> list:
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, array, dtype in _arrays(prompt, settings, stream):
        tensor = grpcclient.InferInput(name, [1], dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def request_bytes(prompt: str, settings: GenerationSettings) -> int:
    """The payload a request sends: its tensors' data, without gRPC framing."""
    return sum(len(a[0]) if a.dtype == np.object_ else a.nbytes
               for _, a, _ in _arrays(prompt, settings, True))


def stream_generate(url: str, prompt: str, settings: GenerationSettings, stream: bool = True,
                    timeout: float = 120.0, model: str = "ensemble",
                    cancel_after_blocks: Optional[int] = None,
                    before_send: Optional[Callable[[], None]] = None) -> Iterator[tuple]:
    """Yields (ids, text, stats) per response; stops after the final response.
    ``before_send`` runs once the stream is open, just before the request goes out."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    responses: "queue.Queue" = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        if before_send is not None:
            before_send()
        client.async_stream_infer(model, _inputs(prompt, settings, stream),
                                  enable_empty_final_response=True)
        seen = 0
        while True:
            try:
                result, error = responses.get(timeout=timeout)
            except queue.Empty:
                raise ClientError(f"no response from {url} within {timeout:.0f} s") from None
            if error is not None:
                raise ClientError(str(error))
            final = result.get_response().parameters["triton_final_response"].bool_param
            ids = result.as_numpy("output_ids")
            if ids is not None and (len(ids) or not final):
                text = result.as_numpy("text_output")
                stats = result.as_numpy("stats")
                yield (ids.tolist(), text[0].decode() if text is not None else "",
                       json.loads(stats[0]) if stats is not None and stats[0] else {})
                seen += 1
                if cancel_after_blocks is not None and seen >= cancel_after_blocks:
                    client.stop_stream(cancel_requests=True)
                    return
            elif ids is not None:
                stats = result.as_numpy("stats")
                if stats is not None and stats[0]:
                    yield [], "", json.loads(stats[0])
            if final:
                return
    except InferenceServerException as err:
        raise ClientError(f"cannot reach {url}: {err}") from err
    finally:
        try:
            client.stop_stream()
        except Exception:
            pass
        client.close()


def generate(url: str, prompt: str, settings: GenerationSettings, stream: bool = True,
             timeout: float = 120.0) -> Completion:
    """The whole completion; with stream=True its blocks as they arrived too."""
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
