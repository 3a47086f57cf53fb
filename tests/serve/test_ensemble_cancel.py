"""A text request to `ensemble` that its client abandons — cancelled, killed, or an HTTP
generate_stream closed — stops the orchestrator and frees both towers' sequences at once,
as a cancel sent straight to `twotower_bls` does."""

import http.client
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_server import pytestmark  # noqa: F401  (skips without tritonserver)
from trt_twotower.policy import GenerationSettings
from trt_twotower.reference.sources import BUILTIN_CHECKPOINT

MAX_CONTEXT = 4096  # the built-in model's positions
LONG = 4000         # ~40 s of generation here: far past any deadline below
RELEASE_SECONDS = 1.0  # one round here is ~30 ms; measured 0.09-0.17 s
PROMPT = "def f(x):"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
SETTINGS = GenerationSettings(max_new_tokens=LONG, block_size=8, steps_per_block=8)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from trt_twotower.serve.repository import render, repository_values
    from trt_twotower.serve.server import TritonServer

    work = tmp_path_factory.mktemp("triton")
    repo = render(work / "repo", repository_values(
        "builtin", "torch", BUILTIN_CHECKPOINT, "cpu", "cpu", MAX_CONTEXT, LONG, "8",
        capacity=4))
    process = TritonServer(repo, work).start(timeout=150)
    yield process
    assert process.stop() == 0  # no cancelled request holds the shutdown up


def _live(url):
    from trt_twotower.serve.client import tower_stats
    return {tower: (s["live_sequences"], s["cache_bytes"])
            for tower, s in tower_stats(url).items()}


def _running(url):
    """True once the long request holds a sequence in both towers."""
    return all(live == 1 for live, _ in _live(url).values())


def _freed_within(url, seconds):
    """Seconds until both towers hold no sequence, or None if they still do after
    ``seconds``."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if all(state == (0, 0) for state in _live(url).values()):
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def test_a_cancelled_text_stream_frees_both_towers_at_once(server):
    from trt_twotower.serve.client import stream_generate
    blocks = 0
    for _ in stream_generate(server.grpc_url, PROMPT, SETTINGS, cancel_after_blocks=2):
        blocks += 1
        assert _running(server.grpc_url)
    assert blocks == 2
    assert _freed_within(server.grpc_url, RELEASE_SECONDS) is not None, _live(server.grpc_url)


KILLED_CLIENT = """
import sys
from trt_twotower.policy import GenerationSettings
from trt_twotower.serve.client import stream_generate
settings = GenerationSettings(max_new_tokens={long}, block_size=8, steps_per_block=8)
for _ in stream_generate(sys.argv[1], {prompt!r}, settings):
    print("block", flush=True)
"""


def test_a_client_process_killed_mid_stream_frees_both_towers_at_once(server):
    client = subprocess.Popen([sys.executable, "-c",
                               KILLED_CLIENT.format(long=LONG, prompt=PROMPT), server.grpc_url],
                              stdout=subprocess.PIPE, text=True, cwd=PROJECT_ROOT)
    try:
        assert client.stdout.readline() == "block\n"
        assert _running(server.grpc_url)
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait()
    assert _freed_within(server.grpc_url, RELEASE_SECONDS) is not None, _live(server.grpc_url)


def test_a_closed_http_generate_stream_frees_both_towers_at_once(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    connection.request("POST", "/v2/models/ensemble/generate_stream", json.dumps(
        {"text_input": PROMPT, "max_tokens": LONG, "stream": True, "block_size": 8,
         "steps_per_block": 8}))
    response = connection.getresponse()
    try:
        assert response.status == 200
        assert response.readline().startswith(b"data: ")
        assert _running(server.grpc_url)
    finally:
        response.close()  # the socket closes with the last of its users
        connection.close()
    assert _freed_within(server.grpc_url, RELEASE_SECONDS) is not None, _live(server.grpc_url)


def test_after_the_cancels_the_server_still_answers_in_full(server):
    from trt_twotower.serve.client import generate
    out = generate(server.grpc_url, PROMPT, GenerationSettings(max_new_tokens=16, block_size=8),
                   stream=True, timeout=120)
    assert len(out.ids) == 16 and not out.stats["cancelled"]
    assert all(state == (0, 0) for state in _live(server.grpc_url).values())
