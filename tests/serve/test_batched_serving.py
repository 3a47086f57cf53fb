"""Continuous batching through a real tritonserver (CPU, built-in model): 64 concurrent
requests of every mode and setting get exactly their solo tokens, a request arriving mid-batch
does not wait for the batch, a cancel frees both towers within a second, and a bounded soak
ends with no error, flat memory and empty towers."""

import concurrent.futures
import os
import threading
import time

import pytest
import torch
from test_server import pytestmark  # noqa: F401  (skips without tritonserver)

from trt_twotower.policy import GenerationSettings
from trt_twotower.reference.sources import BUILTIN_CHECKPOINT, open_source
from trt_twotower.runtime.backends import open_torch
from trt_twotower.runtime.session import Request, TwoTowerSession

MAX_CONTEXT, MAX_TOKENS, CAPACITY = 2400, 2048, 64


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from trt_twotower.serve.repository import render, repository_values
    from trt_twotower.serve.server import TritonServer

    work = tmp_path_factory.mktemp("batched")
    repo = render(work / "repo", repository_values(
        "builtin", "torch", BUILTIN_CHECKPOINT, "cpu", "cpu", MAX_CONTEXT, MAX_TOKENS, "8,16",
        capacity=CAPACITY))
    process = TritonServer(repo, work).start(timeout=150)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def solo():
    """Each request alone in the in-process engine: the tokens every served one must equal."""
    opened = open_torch(open_source(None, None), MAX_CONTEXT)
    session = TwoTowerSession(opened.context, opened.denoiser, opened.config, MAX_CONTEXT)
    yield lambda prompt, s: session.generate([Request(prompt, s)])[0].tokens
    session.close()


def _ids(server, prompt, settings, timeout=180.0, **options):
    from trt_twotower.serve.client import stream_generate
    return [int(i) for ids, _, _ in stream_generate(server.grpc_url, prompt, settings, True,
                                                    timeout, **options) for i in ids]


def _jobs(count, seed=0):
    draw = torch.Generator().manual_seed(seed)
    jobs = []
    for i in range(count):
        mode = ("diffusion", "ar", "mock-ar", "diffusion")[i % 4]
        hot = i % 3 == 1
        s = GenerationSettings(mode=mode, max_new_tokens=(16, 32, 16)[i % 3],
                               block_size=(8, 16)[i % 2] if mode == "diffusion" else 8,
                               steps_per_block=4 + i % 5, temperature=0.7 if hot else 0.0,
                               top_k=50 if hot else None, seed=1000 + i,
                               confidence_threshold=(0.5, 0.7, 0.9)[i % 3],
                               forced_commits=4 if i % 8 == 3 else None,
                               stop_at_eos=i % 2 == 0)
        prompt = torch.randint(4, 1000, (1 + (7 * i) % 30,), generator=draw).tolist()
        jobs.append((prompt, s))
    return jobs


def _live(server):
    from trt_twotower.serve.client import tower_stats
    return tower_stats(server.grpc_url)


def test_64_concurrent_mixed_requests_get_exactly_their_solo_tokens(server, solo):
    jobs = _jobs(64)
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        served = list(pool.map(lambda job: _ids(server, *job), jobs))
    for (prompt, s), tokens in zip(jobs, served):
        assert tokens == solo(prompt, s), s


def test_a_request_arriving_mid_batch_does_not_wait_for_the_batch(server):
    long = GenerationSettings(mode="ar", max_new_tokens=1500, stop_at_eos=False)
    short = GenerationSettings(mode="ar", max_new_tokens=8, stop_at_eos=False)
    started, stop = threading.Barrier(9), threading.Event()

    def long_request(index):
        from trt_twotower.serve.client import stream_generate
        stream = stream_generate(server.grpc_url, [5 + index, 6, 7], long, True, 180.0)
        next(stream)
        started.wait(60)
        for _ in stream:
            if stop.is_set():
                stream.close()  # cancels it
                return False
        return True

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        runs = [pool.submit(long_request, i) for i in range(8)]
        started.wait(60)
        begin = time.monotonic()
        assert len(_ids(server, [9, 10, 11], short)) == 8
        waited = time.monotonic() - begin
        still_running = not any(r.done() for r in runs)
        stop.set()
        finished_alone = [r.result(timeout=120) for r in runs]
    assert still_running and not any(finished_alone)
    assert waited < 10.0, f"the short request took {waited:.1f} s behind the batch"


def test_ar_tokens_chain_in_the_context_tower_and_stream_a_round_at_a_time(server, solo):
    """The server's rounds of AR requests alone take --ar-steps (default 4) tokens each:
    1 (with the prompt), 1 (the call written ahead right after an admission), 4, 4, then the
    2 left. The stream sends the first token at once and then at least --stream-interval
    (default 4) at a time: the second round's token waits for the third's four, and the last
    two come with the final answer and its stats. One token a round would stream
    [1, 4, 4, 3]; every round as it comes, [1, 1, 4, 4, 2]."""
    from trt_twotower.serve.client import stream_generate

    s = GenerationSettings(mode="ar", max_new_tokens=12, temperature=0.7, seed=5,
                           stop_at_eos=False)
    answers = [(ids, stats) for ids, _, stats in
               stream_generate(server.grpc_url, [5, 6, 7], s, True, 120.0) if ids]
    blocks = [ids for ids, _ in answers]
    assert [len(ids) for ids in blocks] == [1, 5, 4, 2]
    assert "context_steps" in answers[-1][1] and not answers[0][1]
    assert sum(blocks, []) == solo([5, 6, 7], s)


def _message_outputs(server, prompt, settings):
    """Each response of a raw stream as (final, the names of the outputs it carries)."""
    import queue

    import tritonclient.grpc as grpcclient

    from trt_twotower.serve.client import ORCHESTRATOR, request_inputs

    answers = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer(ORCHESTRATOR, request_inputs(prompt, settings, True),
                                  enable_empty_final_response=True)
        messages = []
        while not messages or not messages[-1][0]:
            result, error = answers.get(timeout=120)
            assert error is None, error
            response = result.get_response()
            messages.append((response.parameters["triton_final_response"].bool_param,
                             sorted(o.name for o in response.outputs)))
        return messages
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.parametrize("logprobs", [None, 2])
def test_streamed_messages_carry_their_tokens_alone_and_the_final_answer_its_stats(server,
                                                                                  logprobs):
    """A message is ``output_ids`` (with ``logprobs`` when the request asks for scores): no
    empty ``stats`` string crossing every process under load. The final answer adds them."""
    s = GenerationSettings(mode="ar", max_new_tokens=12, seed=5, stop_at_eos=False,
                           logprobs=logprobs)
    messages = _message_outputs(server, [5, 6, 7], s)
    streamed = ["output_ids"] + (["logprobs"] if logprobs else [])
    assert len(messages) == 4, messages
    assert all(sorted(names) == sorted(streamed) for _, names in messages[:-1]), messages
    assert messages[-1] == (True, sorted(streamed + ["stats"])), messages


def test_a_stream_whose_last_block_is_its_final_answer_is_closed_not_cancelled(server,
                                                                               monkeypatch):
    """The final answer carries the last tokens (here the 4th of [1, 5, 4, 2]): a client
    stopping after 4 blocks got everything and must close its stream gracefully; cancelling a
    request already answered leaves Triton's Python backend holding it (client.py)."""
    from trt_twotower.serve import client

    graces, close = [], client.close_stream
    monkeypatch.setattr(client, "close_stream",
                        lambda stream, grace: graces.append(grace) or close(stream, grace))
    s = GenerationSettings(mode="ar", max_new_tokens=12, temperature=0.7, seed=5,
                           stop_at_eos=False)
    blocks = [ids for ids, _, _ in client.stream_generate(server.grpc_url, [5, 6, 7], s, True,
                                                          120.0, cancel_after_blocks=4)]
    assert sum(len(ids) for ids in blocks) == 12
    assert len(graces) == 1 and graces[0] is not None, "a finished request was cancelled"


def test_a_cancel_frees_both_towers_within_a_second(server):
    from trt_twotower.serve.client import stream_generate
    for mode in ("diffusion", "mock-ar", "ar"):
        s = GenerationSettings(mode=mode, max_new_tokens=2000, block_size=8,
                               steps_per_block=8, stop_at_eos=False)
        blocks = list(stream_generate(server.grpc_url, [5, 6, 7], s, True, 120.0,
                                      cancel_after_blocks=2))
        assert 0 < sum(len(ids) for ids, _, _ in blocks) < 2000
        cancelled = time.monotonic()
        while any(t["live_sequences"] for t in _live(server).values()):
            assert time.monotonic() - cancelled < 1.0, f"{mode}: slots held after a cancel"
            time.sleep(0.05)


def _tree_rss_kib(pid):
    """Resident memory of a process and all its descendants (the server and its stubs)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            pass
        todo += children.get(current, [])
    return total


def _closed_loop(server, jobs, clients):
    errors, lock, queue = [], threading.Lock(), list(jobs)

    def client():
        while True:
            with lock:
                if not queue:
                    return
                prompt, s = queue.pop()
            try:
                tokens = _ids(server, prompt, s)
                assert tokens and len(tokens) <= s.max_new_tokens
            except Exception as err:  # counted: the soak must end with none
                with lock:
                    errors.append(err)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_a_bounded_soak_ends_with_no_error_flat_memory_and_empty_towers(server):
    """64 clients, 64 warm-up requests then 320 more of every mode; RSS of the whole server
    tree after the soak within 1.1x of its RSS after warm-up."""
    assert not _closed_loop(server, _jobs(64, seed=1), 64)
    warm = _tree_rss_kib(server.process.pid)
    errors = _closed_loop(server, _jobs(320, seed=2), 64)
    after = _tree_rss_kib(server.process.pid)
    assert not errors, f"{len(errors)} of 320 requests failed: {errors[0]}"
    assert after <= 1.1 * warm, f"RSS grew from {warm} to {after} KiB"
    stats = _live(server)
    assert all(s["live_sequences"] == 0 and s["cache_bytes"] == 0 for s in stats.values())
    assert all(s["opened"] == s["released"] for s in stats.values())
    # each tower froze its model and pools out of full collections once set up
    assert all(s["frozen_objects"] > 10_000 for s in stats.values()), stats
