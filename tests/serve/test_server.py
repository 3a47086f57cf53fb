"""End to end through a real tritonserver process over real gRPC (CPU, built-in model)."""

import concurrent.futures
import contextlib
import importlib.util
import queue
import time

import pytest

from trt_twotower.policy import GenerationSettings
from trt_twotower.reference.sources import BUILTIN_CHECKPOINT, open_source
from trt_twotower.runtime.backends import open_torch
from trt_twotower.runtime.session import Request, TwoTowerSession

pytestmark = pytest.mark.skipif(importlib.util.find_spec("pytriton") is None
                                or importlib.util.find_spec("tritonclient") is None,
                                reason="needs nvidia-pytriton (tritonserver) and tritonclient")
MAX_CONTEXT = 512
CAPACITY = 8  # fewer slots than the 16 concurrent clients below: the rest must wait


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from trt_twotower.serve.repository import render, repository_values
    from trt_twotower.serve.server import TritonServer

    work = tmp_path_factory.mktemp("triton")
    repo = render(work / "repo", repository_values(
        "builtin", "torch", BUILTIN_CHECKPOINT, "cpu", "cpu", MAX_CONTEXT, 128, "8,16",
        capacity=CAPACITY))
    process = TritonServer(repo, work).start(timeout=150)
    yield process
    assert process.stop() == 0  # the server shuts down cleanly


@pytest.fixture(scope="module")
def opened():
    return open_torch(open_source(None, None), MAX_CONTEXT)


@pytest.fixture(scope="module")
def local(opened):
    session = TwoTowerSession(opened.context, opened.denoiser, opened.config, MAX_CONTEXT)

    def run(prompt, settings):
        return session.generate([Request(opened.tokenizer.encode(prompt), settings)])[0].tokens
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


def test_missing_input_wrong_dtype_and_wrong_shape_are_refused(server):
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
    two = grpcclient.InferInput("text_input", [2], "BYTES")
    two.set_data_from_numpy(np.array([b"a", b"b"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="(?i)shape"):
        client.infer("preprocessing", [two])
    assert client.is_server_ready()


def test_a_cancelled_stream_stops_frees_its_caches_and_the_next_request_is_unaffected(
        server, local):
    from trt_twotower.serve.client import generate, stream_generate, tower_stats
    s = GenerationSettings(max_new_tokens=64, block_size=8, steps_per_block=8)
    before = tower_stats(server.grpc_url)
    got = list(stream_generate(server.grpc_url, PROMPTS[2], s, cancel_after_blocks=1))
    assert len(got) == 1
    after_cancel = _settled_stats(server.grpc_url)
    for tower in ("context_tower", "denoiser_tower"):
        assert after_cancel[tower]["live_sequences"] == 0
        assert after_cancel[tower]["cache_bytes"] == 0
        assert after_cancel[tower]["opened"] == before[tower]["opened"] + 1
        assert after_cancel[tower]["released"] == before[tower]["released"] + 1
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
    from trt_twotower.serve.repository import RepositoryError, render, repository_values
    values = repository_values("builtin", "torch", BUILTIN_CHECKPOINT, "cpu", "cpu", 64, 8, "8")
    del values["SOURCE"]
    with pytest.raises(RepositoryError, match="context_tower/config.pbtxt: no value for SOURCE"):
        render(tmp_path / "repo", values)
    with pytest.raises(RepositoryError, match="neither cpu nor cuda:N"):
        repository_values("builtin", "torch", BUILTIN_CHECKPOINT, "gpu1", "cpu", 64, 8, "8")


def _settled_stats(url, timeout=30.0):
    """Tower stats once no sequence is live (a cancelled request ends on the server shortly
    after the client has gone)."""
    import time

    from trt_twotower.serve.client import tower_stats
    deadline = time.monotonic() + timeout
    while True:
        stats = tower_stats(url)
        if all(s["live_sequences"] == 0 for s in stats.values()) or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def test_the_towers_hold_no_cache_once_requests_end_and_report_the_boundary_bytes(server):
    from trt_twotower.serve.client import generate, tower_stats
    out = generate(server.grpc_url, PROMPTS[0], GenerationSettings(
        max_new_tokens=16, block_size=8, steps_per_block=8), stream=False)
    stats = tower_stats(server.grpc_url)
    assert all(s["live_sequences"] == 0 and s["opened"] == s["released"]
               for s in stats.values())
    # ids, settings and two cache deltas (prompt, first block) crossed; never the logits
    assert out.stats["boundary_bytes"] > 2 * out.stats["handoff_bytes"] > 0
    assert out.stats["boundary_bytes"] < 3 * out.stats["handoff_bytes"] + 64 * 1024


def test_a_tower_model_refuses_unknown_ops_and_incomplete_requests(server):
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from trt_twotower.serve.repository import SECRET_FILE
    client = grpcclient.InferenceServerClient(server.grpc_url)
    op = grpcclient.InferInput("op", [1], "BYTES")
    op.set_data_from_numpy(np.array([b"rewind"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="unknown op 'rewind'"):
        client.infer("context_tower", [op])
    op.set_data_from_numpy(np.array([b"round"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="answer the orchestrator only"):
        client.infer("context_tower", [op])
    secret = grpcclient.InferInput("tower_secret", [1], "BYTES")
    secret.set_data_from_numpy(np.array([(server.repository / SECRET_FILE).read_bytes()],
                                        dtype=np.object_))
    rows = grpcclient.InferInput("group_rows", [1], "INT64")
    rows.set_data_from_numpy(np.array([1], dtype=np.int64))
    with pytest.raises(InferenceServerException, match="group_width has 0 values, expected 1"):
        client.infer("context_tower", [op, secret, rows])
    assert client.is_server_ready()


def test_load_clients_connect_before_the_clock_and_keep_their_streams(server, opened,
                                                                      monkeypatch):
    """A closed loop's streams are opened before it starts its clients (by the thread that
    runs it, not by the clients as the clock runs), one per client, each kept across that
    client's requests."""
    import threading

    from trt_twotower.runtime.load_benchmark import closed_loop
    from trt_twotower.serve import load_target

    opened_by, sent_on = [], set()

    class Counted(load_target._Stream):
        def __init__(self, url):
            opened_by.append(threading.get_ident())
            super().__init__(url)

        def send(self, *args):
            sent_on.add((id(self), threading.get_ident()))
            super().send(*args)
    monkeypatch.setattr(load_target, "_Stream", Counted)
    s = GenerationSettings(mode="ar", max_new_tokens=4)
    with load_target.TritonTarget(server.grpc_url, timeout=120) as target:
        row = closed_loop(target, [opened.tokenizer.encode(PROMPTS[0])], s, clients=3, total=7,
                          label="ar")
    assert row.requests == 7 and row.tokens == 28
    assert opened_by == [threading.get_ident()] * 3
    streams, threads = {stream for stream, _ in sent_on}, {thread for _, thread in sent_on}
    assert len(streams) == len(threads) == len(sent_on) <= 3


def test_a_load_target_closed_mid_request_fails_its_waiters_and_frees_the_towers(server):
    """Closing a load (say, the benchmark interrupted) while a request streams ends that
    request with an error at once instead of leaving its waiter to the target's timeout, and
    the cancel reaches both towers."""
    import threading

    from trt_twotower.serve.client import ClientError, tower_stats
    from trt_twotower.serve.load_target import TritonTarget

    # 8 blocks of 16 steps, none committed early: seconds here, far past the close
    s = GenerationSettings(max_new_tokens=128, block_size=16, steps_per_block=16,
                           confidence_threshold=1.0, seed=2)
    first_block = threading.Event()
    target = TritonTarget(server.grpc_url, timeout=60)
    with target:
        wait = target.start([1, 400, 500, 600], s, lambda ids: first_block.set())
        assert first_block.wait(30)
    closed = time.monotonic()
    with pytest.raises(ClientError, match="closed mid-request"):
        wait()
    assert time.monotonic() - closed < 1.0
    deadline = time.monotonic() + 5
    while any(stats["live_sequences"] for stats in tower_stats(server.grpc_url).values()):
        assert time.monotonic() < deadline, tower_stats(server.grpc_url)
        time.sleep(0.05)


def test_the_load_benchmark_runs_each_load_on_both_paths_with_ratio_and_bytes(server, opened):
    from trt_twotower.runtime.load_benchmark import SessionTarget, format_load, run_load
    from trt_twotower.runtime.session import TwoTowerSession
    from trt_twotower.serve.load_target import TritonTarget

    s = GenerationSettings(max_new_tokens=8, block_size=8, steps_per_block=8)
    prompts = [opened.tokenizer.encode(p) for p in PROMPTS]

    @contextlib.contextmanager
    def engine():
        with TwoTowerSession(opened.context, opened.denoiser, opened.config,
                             MAX_CONTEXT) as session:
            yield SessionTarget(session)
    triton = TritonTarget(server.grpc_url, timeout=120)
    rows = run_load([engine, lambda: triton], prompts,
                    [("diffusion", s)], [1, 3], [50.0], 2, 3)
    assert [(r.path, r.load) for r in rows] == [
        ("in-process", "1 clients"), ("triton", "1 clients"), ("in-process", "3 clients"),
        ("triton", "3 clients"), ("in-process", "Poisson 50/s"), ("triton", "Poisson 50/s")]
    for local_row, served in zip(rows[::2], rows[1::2]):
        assert served.tokens == local_row.tokens > 0 and local_row.ratio is None
        assert served.ratio == pytest.approx(served.tokens_per_second /
                                             local_row.tokens_per_second)
        assert served.boundary_bytes > 0 and local_row.boundary_bytes is None
    table = format_load(rows)
    assert "| triton | diffusion | 3 clients | 6 |" in table
    assert table.splitlines()[0].endswith("tok/s ratio | tower bytes/token |")
