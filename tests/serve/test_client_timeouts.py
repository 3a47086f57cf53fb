"""Every client call is bounded by its timeout, stream shutdown included, against a real gRPC
server on 127.0.0.1 that accepts the call and then stops answering: before any response, after
a block, or after the final response without closing the stream. A finished stream is still
closed gracefully, since tritonserver stops slowly after a cancelled one.

Each call runs in a helper thread that the test waits for with a deadline, so a hang fails the
test instead of stalling the run; the server lets its held calls go when the test ends."""

from __future__ import annotations

import queue
import threading
import time
from concurrent import futures
from typing import Any, Callable, Optional

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc]")

import grpc  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import serialize_byte_tensor  # noqa: E402

from trt_twotower.cli import main  # noqa: E402
from trt_twotower.policy import GenerationSettings  # noqa: E402
from trt_twotower.serve.client import (CLOSE_GRACE_S, ClientError, generate,  # noqa: E402
                                       stream_generate, tower_stats)

HOLD_S = 30.0   # longest a held call stays open if a test forgets to let it go
SLACK_S = 2.0   # a call may overrun its timeout by this much (thread start, gRPC teardown)
SETTINGS = GenerationSettings(max_new_tokens=16, block_size=8)


def response(final: bool, **outputs) -> service_pb2.ModelStreamInferResponse:
    """A streamed response as the orchestrator sends it."""
    tensor = service_pb2.ModelInferResponse.InferOutputTensor
    flag = service_pb2.InferParameter(bool_param=final)
    return service_pb2.ModelStreamInferResponse(infer_response=service_pb2.ModelInferResponse(
        model_name="ensemble", parameters={"triton_final_response": flag},
        outputs=[tensor(name=name, datatype=dtype, shape=[len(raw)])
                 for name, (dtype, raw) in outputs.items()],
        raw_output_contents=[raw.tobytes() if dtype != "BYTES"
                             else serialize_byte_tensor(raw).item()
                             for dtype, raw in outputs.values()]))


def one_block() -> service_pb2.ModelStreamInferResponse:
    return response(False, output_ids=("INT32", np.array([5, 6, 7], dtype=np.int32)),
                    text_output=("BYTES", np.array([b"abc"], dtype=np.object_)))


class StallingService(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Takes every call and sends ``replies`` on streams; then holds the call without an
    answer, or, if ``polite``, waits for the client to end the stream and records how it
    ended ("closed" by the client's half-close, or "cancelled")."""

    def __init__(self, replies: list, polite: bool = False) -> None:
        self.replies, self.polite = replies, polite
        self.release = threading.Event()
        self.ended: "queue.Queue[str]" = queue.Queue()

    def ModelStreamInfer(self, request_iterator, context):
        next(request_iterator, None)
        yield from self.replies
        if not self.polite:
            self.release.wait(HOLD_S)
            return
        try:
            for _ in request_iterator:
                pass
        except grpc.RpcError:
            pass  # the client cancelled
        self.ended.put("closed" if context.is_active() else "cancelled")

    def ModelInfer(self, request, context):
        self.release.wait(HOLD_S)
        return service_pb2.ModelInferResponse()


def serve_stalling(replies: list, polite: bool = False):
    service = StallingService(replies, polite)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, service, f"127.0.0.1:{port}"


@pytest.fixture
def silent():
    server, service, url = serve_stalling([])
    yield url
    service.release.set()
    server.stop(grace=None)


@pytest.fixture
def one_then_silent():
    server, service, url = serve_stalling([one_block()])
    yield url
    service.release.set()
    server.stop(grace=None)


@pytest.fixture
def finished_then_silent():
    server, service, url = serve_stalling([one_block(), response(True)])
    yield url
    service.release.set()
    server.stop(grace=None)


@pytest.fixture
def finished_politely():
    server, service, url = serve_stalling([one_block(), response(True)], polite=True)
    yield url, service
    server.stop(grace=None)


def within(seconds: float, call: Callable[[], Any]) -> tuple[Any, Optional[BaseException]]:
    """(result, raised) of ``call``; fails the test if it has not returned within ``seconds``."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["result"] = call()
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            outcome["raised"] = err

    start = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked {time.monotonic() - start:.1f} s after the call"
    return outcome.get("result"), outcome.get("raised")


def test_a_silent_server_raises_the_timeout_and_the_stream_shuts_down_within_it(silent):
    _, raised = within(1.0 + SLACK_S, lambda: generate(silent, "x", SETTINGS, timeout=1.0))
    assert isinstance(raised, ClientError) and "no response" in str(raised)


def test_abandoning_a_stream_after_a_block_returns_at_once(one_then_silent):
    responses = stream_generate(one_then_silent, "x", SETTINGS, timeout=HOLD_S)
    ids, text, _ = next(responses)
    assert (ids, text) == ([5, 6, 7], "abc")
    _, raised = within(SLACK_S, responses.close)
    assert raised is None


def test_a_server_that_never_closes_a_finished_stream_delays_the_call_by_the_grace_only(
        finished_then_silent):
    out, raised = within(CLOSE_GRACE_S + SLACK_S,
                         lambda: generate(finished_then_silent, "x", SETTINGS, timeout=HOLD_S))
    assert raised is None and out.ids == [5, 6, 7]


def test_a_finished_stream_is_closed_not_cancelled(finished_politely):
    url, service = finished_politely
    out, raised = within(SLACK_S, lambda: generate(url, "x", SETTINGS, timeout=HOLD_S))
    assert raised is None and out.text == "abc"
    assert service.ended.get(timeout=SLACK_S) == "closed"


def test_the_client_command_ends_with_a_one_line_error_within_its_timeout(silent):
    result, raised = within(1.0 + SLACK_S, lambda: CliRunner().invoke(
        main, ["client", "--url", silent, "--prompt", "x", "--timeout", "1"]))
    assert raised is None and result.exit_code == 1, result.output
    last = [line for line in result.output.splitlines() if line.strip()][-1]
    assert last.startswith("Error: no response from") and "Traceback" not in result.output


def test_tower_stats_from_a_silent_server_time_out(silent):
    _, raised = within(1.0 + SLACK_S, lambda: tower_stats(silent, timeout=1.0))
    assert isinstance(raised, ClientError)
