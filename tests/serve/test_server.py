"""End to end through a real tritonserver process over real gRPC (CPU, built-in model)."""

import concurrent.futures
import importlib.util
import queue

import pytest

from trt_twotower.policy import GenerationSettings
from trt_twotower.reference.sources import BUILTIN_CHECKPOINT, open_source
from trt_twotower.runtime.backends import open_torch
from trt_twotower.runtime.session import Request, TwoTowerSession

pytestmark = pytest.mark.skipif(importlib.util.find_spec("pytriton") is None
                                or importlib.util.find_spec("tritonclient") is None,
                                reason="needs nvidia-pytriton (tritonserver) and tritonclient")
MAX_CONTEXT = 512


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from trt_twotower.serve.repository import render
    from trt_twotower.serve.server import TritonServer

    work = tmp_path_factory.mktemp("triton")
    repo = render(work / "repo", {"SOURCE": "builtin", "BACKEND": "torch", "DEVICE": "cpu",
                                  "MAX_CONTEXT": str(MAX_CONTEXT), "MAX_TOKENS": "128",
                                  "BLOCK_SIZES": "8,16", "INSTANCE_KIND": "KIND_CPU",
                                  "TOKENIZER_DIR": str(BUILTIN_CHECKPOINT)})
    process = TritonServer(repo, work).start(timeout=150)
    yield process
    assert process.stop() == 0  # the server shuts down cleanly


@pytest.fixture(scope="module")
def local():
    source = open_source(None, None)
    opened = open_torch(source, MAX_CONTEXT)
    session = TwoTowerSession(opened.context, opened.denoiser, opened.config, MAX_CONTEXT)

    def run(prompt, settings):
        return session.generate([Request(source.tokenizer.encode(prompt), settings)])[0].tokens
    return run


PROMPTS = ["def area(r):\n", "import os\n", "class Stack:\n    def push(self, item):\n"]


@pytest.mark.parametrize("mode", ["diffusion", "mock-ar", "ar"])
def test_each_mode_equals_the_in_process_session(server, local, mode):
    from trt_twotower.serve.client import generate
    s = GenerationSettings(mode=mode, max_new_tokens=16, block_size=8, steps_per_block=8)
    out = generate(server.grpc_url, PROMPTS[0], s, stream=False)
    assert out.ids == local(PROMPTS[0], s)
    assert out.stats["denoiser_evaluations"] >= (0 if mode == "ar" else 1)


def test_streaming_delivers_blocks_in_order_that_make_the_final_text(server, local):
    from trt_twotower.serve.client import generate
    from trt_twotower.tokenizer import load_tokenizer
    s = GenerationSettings(max_new_tokens=32, block_size=8, steps_per_block=8, stop_at_eos=True)
    out = generate(server.grpc_url, PROMPTS[1], s, stream=True)
    expected = local(PROMPTS[1], s)
    assert out.ids == expected and all(len(b) <= 8 for b in out.blocks)
    assert sum(out.blocks, []) == expected
    assert len(out.texts) == len(out.blocks)
    assert load_tokenizer(BUILTIN_CHECKPOINT).decode(out.ids).startswith(out.texts[0][:1])


def test_sixteen_concurrent_streaming_clients_get_what_they_get_alone(server, local):
    from trt_twotower.serve.client import generate
    jobs = [(PROMPTS[i % 3], GenerationSettings(
        mode=("diffusion", "ar", "mock-ar")[i % 3], max_new_tokens=8 * (1 + i % 2),
        block_size=8, steps_per_block=4 + i % 5, temperature=0.5 * (i % 2), seed=i,
        confidence_threshold=0.5 + 0.1 * (i % 4))) for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda j: generate(server.grpc_url, j[0], j[1], True), jobs))
    for (prompt, settings), out in zip(jobs, outs):
        assert out.ids == local(prompt, settings)


@pytest.mark.parametrize("prompt,changes,needle", [
    ("", {}, "empty"),
    ("x " * 600, {}, "maximum context"),
    ("def f():", {"mode": "beam"}, "unknown mode"),
    ("def f():", {"max_new_tokens": 0}, "max_tokens"),
    ("def f():", {"max_new_tokens": 4096}, "max_tokens"),
    ("def f():", {"confidence_threshold": 1.5}, "confidence_threshold"),
    ("def f():", {"block_size": 4, "max_new_tokens": 8}, "block_size 4"),
])
def test_bad_input_is_a_clear_error_and_the_server_stays_healthy(server, prompt, changes, needle):
    """The settings go out unvalidated (a plain namespace) so the server is what refuses."""
    import types

    import tritonclient.grpc as grpcclient

    from trt_twotower.serve.client import ClientError, generate
    fields = dict(mode="diffusion", max_new_tokens=16, block_size=8, steps_per_block=8,
                  confidence_threshold=0.8, temperature=0.0, top_k=None, top_p=None, seed=0)
    fields.update(changes)
    with pytest.raises(ClientError, match=needle):
        generate(server.grpc_url, prompt, types.SimpleNamespace(**fields), stream=False,
                 timeout=60)
    assert grpcclient.InferenceServerClient(server.grpc_url).is_server_ready()


def test_missing_input_and_wrong_dtype_are_refused(server):
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(server.grpc_url)
    ids = grpcclient.InferInput("input_ids", [3], "INT64")
    ids.set_data_from_numpy(np.array([5, 6, 7], dtype=np.int64))
    answers: "queue.Queue" = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put(error))
    client.async_stream_infer("twotower_bls", [ids])  # no max_tokens
    assert "max_tokens" in str(answers.get(timeout=60))
    client.stop_stream()
    bad = grpcclient.InferInput("text_input", [1], "INT64")
    bad.set_data_from_numpy(np.array([5], dtype=np.int64))
    with pytest.raises(InferenceServerException, match="(?i)data.type|datatype"):
        client.infer("preprocessing", [bad])
    assert client.is_server_ready()


def test_a_cancelled_stream_stops_and_the_next_request_is_unaffected(server, local):
    from trt_twotower.serve.client import generate, stream_generate
    s = GenerationSettings(max_new_tokens=64, block_size=8, steps_per_block=8)
    got = list(stream_generate(server.grpc_url, PROMPTS[2], s, cancel_after_blocks=1))
    assert len(got) == 1
    after = generate(server.grpc_url, PROMPTS[2], GenerationSettings(max_new_tokens=16,
                                                                     block_size=8), False)
    assert after.ids == local(PROMPTS[2], GenerationSettings(max_new_tokens=16, block_size=8))


def test_dead_server_is_a_clear_error():
    from trt_twotower.serve.client import ClientError, generate
    from trt_twotower.serve.server import free_port
    with pytest.raises(ClientError):
        generate(f"127.0.0.1:{free_port()}", "x", GenerationSettings(max_new_tokens=16,
                                                                      block_size=8),
                 timeout=5)


def test_unfilled_template_values_fail_loudly(tmp_path):
    from trt_twotower.serve.repository import RepositoryError, render
    values = {"BACKEND": "torch", "DEVICE": "cpu", "MAX_CONTEXT": "64", "MAX_TOKENS": "8",
              "BLOCK_SIZES": "8", "INSTANCE_KIND": "KIND_CPU", "TOKENIZER_DIR": "/x"}
    with pytest.raises(RepositoryError, match="twotower_bls/config.pbtxt: no value for SOURCE"):
        render(tmp_path / "repo", values)
