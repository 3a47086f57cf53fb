"""The tower models are closed to clients, against a real tritonserver over real gRPC (CPU,
built-in model): only the orchestrator holds the tower secret, a sequence exists only once
opened and only its opener can step or release it, tower errors are one clear line, prompts
too long to fit are refused before tokenizing, and the admin APIs are restricted."""

import concurrent.futures
import os
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from test_server import PROMPTS, local, opened, pytestmark, server  # noqa: F401  (fixtures)

from trt_twotower.policy import GenerationSettings
from trt_twotower.serve.repository import SECRET_FILE


def _secret(server) -> str:
    return (server.repository / SECRET_FILE).read_text().strip()


def _tower_call(server, model: str, work, secret=None, order=None):
    """One direct tower request carrying ``work`` (the real protocol's tensors), as a client
    that is not the orchestrator would send it; ``secret`` None leaves the secret out;
    ``order``: the (caller, index) the orchestrator numbers its calls with."""
    import tritonclient.grpc as grpcclient

    from trt_twotower.serve.tower_requests import encode_context, encode_denoiser
    encode = encode_context if model == "context_tower" else encode_denoiser
    values = encode(work, secret or "")
    if secret is None:
        values.pop("tower_secret")
    if order is not None:
        values["call_order"] = np.array(order, dtype=np.int64)
    inputs = []
    for name, array in values.items():
        dtype = {np.object_: "BYTES", np.uint64: "UINT64", np.int64: "INT64",
                 np.bool_: "BOOL"}[array.dtype.type]
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        return client.infer(model, inputs, client_timeout=60)
    finally:
        client.close()


def _push(keys, ids, sample=None):
    """A context step of ``ids`` for each sequence (sampling with ``sample`` settings)."""
    import torch

    from trt_twotower.runtime.tower_work import ContextWork, ExtendGroup, Sample
    samples = [None if sample is None else Sample(sample, 0) for _ in keys]
    return ContextWork(groups=[ExtendGroup(keys, torch.tensor([ids] * len(keys)),
                                           [True] * len(keys), [False] * len(keys), samples)])


def _refusal(call, status: str = "") -> str:
    """The message of the error ``call`` raises, after checking its gRPC status."""
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as raised:
        call()
    assert raised.value.status().endswith(status)
    return str(raised.value.message())


def test_a_direct_tower_call_without_the_secret_is_refused(server):
    from trt_twotower.runtime.tower_work import ContextWork, DenoiserWork
    from trt_twotower.serve.client import tower_stats
    from trt_twotower.serve.towers import SequenceKey
    key = SequenceKey.new()
    for model, work in (("context_tower", ContextWork(opened=[key])),
                        ("denoiser_tower", DenoiserWork(opened=[key])),
                        ("context_tower", _push([key], [5, 6]))):
        for secret in (None, "guess"):
            message = _refusal(lambda: _tower_call(server, model, work, secret))
            assert "tower models answer the orchestrator only" in message
    assert all(s["opened"] == 0 for s in tower_stats(server.grpc_url).values())


def _stub_pid(model: str) -> int:
    """The Python stub process serving ``model`` (its command line names the model's path)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if b"triton_python_backend_stub" in cmdline and f"/{model}/".encode() in cmdline:
                return int(entry)
    raise AssertionError(f"no stub process for {model}")


def test_a_client_cannot_release_another_requests_sequence(server, local):
    """Releases aimed at every id the old scheme (stub PID << 32 plus a counter) would have
    given, sent while the victim's AR request runs: the victim still gets its tokens."""
    from trt_twotower.runtime.tower_work import ContextWork, DenoiserWork
    from trt_twotower.serve.client import generate
    from trt_twotower.serve.towers import SequenceKey
    s = GenerationSettings(mode="ar", max_new_tokens=96, block_size=8)
    prefix = (_stub_pid("twotower_bls") & 0xFFFFFFFF) << 32
    guesses = [SequenceKey(prefix | counter, "") for counter in range(1, 64)]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        victim = pool.submit(generate, server.grpc_url, PROMPTS[1], s, False, 120.0)
        deadline = time.monotonic() + 60
        while not victim.done() and time.monotonic() < deadline:
            for model, work in (("context_tower", ContextWork(released=guesses)),
                                ("denoiser_tower", DenoiserWork(released=guesses))):
                try:
                    _tower_call(server, model, work, "guess")
                except Exception:  # refused, as it should be
                    pass
        out = victim.result(timeout=120)
    assert out.ids == local(PROMPTS[1], s)


def test_only_the_opener_can_step_or_release_a_sequence(server):
    """Even a caller holding the secret (another request of the orchestrator) cannot touch a
    sequence it did not open."""
    from trt_twotower.runtime.tower_work import ContextWork
    from trt_twotower.serve.client import tower_stats
    from trt_twotower.serve.towers import SequenceKey
    secret = _secret(server)
    mine, thief = SequenceKey(777, "owner-a"), SequenceKey(777, "owner-b")

    def live():
        return tower_stats(server.grpc_url)["context_tower"]["live_sequences"]
    before = live()
    _tower_call(server, "context_tower", ContextWork(opened=[mine]), secret)
    try:
        _tower_call(server, "context_tower", ContextWork(released=[thief]), secret)
        assert live() == before + 1
        message = _refusal(lambda: _tower_call(server, "context_tower", _push([thief], [5, 6]),
                                               secret))
        assert "sequence 777 is not open here for this caller" in message
        assert "already open" in _refusal(lambda: _tower_call(
            server, "context_tower", ContextWork(opened=[thief]), secret))
        out = _tower_call(server, "context_tower", _push([mine], [5, 6]), secret)
        assert len(out.as_numpy("cache_delta")[0]) > 0
    finally:
        _tower_call(server, "context_tower", ContextWork(released=[mine]), secret)
    assert live() == before


def test_both_towers_run_a_callers_calls_in_the_order_it_numbered_them(server):
    """The orchestrator starts a round before the last is answered, and Triton can deliver
    the two swapped: each tower model refuses a call that overtook its predecessor (UNAVAILABLE,
    nothing done) and runs it once the predecessor has run."""
    import secrets

    from trt_twotower.runtime.tower_work import ContextWork, DenoiserWork
    from trt_twotower.serve.client import tower_stats
    from trt_twotower.serve.towers import SequenceKey
    secret, caller = _secret(server), secrets.randbits(62)
    for model, work in (("context_tower", ContextWork), ("denoiser_tower", DenoiserWork)):
        first, second = SequenceKey.new(), SequenceKey.new()
        opened = tower_stats(server.grpc_url)[model]["opened"]
        message = _refusal(lambda: _tower_call(server, model, work(opened=[second]), secret,
                                               (caller, 2)), "UNAVAILABLE")
        assert message.startswith("out of order: call 2 arrived before call 1")
        assert tower_stats(server.grpc_url)[model]["opened"] == opened
        _tower_call(server, model, work(opened=[first]), secret, (caller, 1))
        _tower_call(server, model, work(opened=[second]), secret, (caller, 2))
        assert tower_stats(server.grpc_url)[model]["opened"] == opened + 2
        _tower_call(server, model, work(released=[first, second]), secret, (caller, 3))


def test_a_step_for_an_unknown_sequence_is_an_error_not_a_fresh_cache(server):
    import torch

    from trt_twotower.runtime.tower_work import DenoiserWork, DenoiseGroup
    from trt_twotower.serve.client import tower_stats
    from trt_twotower.serve.towers import SequenceKey
    before = tower_stats(server.grpc_url)
    secret = _secret(server)
    key = SequenceKey(4242, "o")
    step = DenoiserWork(groups=[DenoiseGroup([key], torch.full((1, 8), 3), [GenerationSettings()],
                                             [0], [8])])
    for model, work in [("context_tower", _push([key], [5, 6])),
                        ("context_tower", _push([key], [5], GenerationSettings(mode="ar"))),
                        ("denoiser_tower", step)]:
        message = _refusal(lambda: _tower_call(server, model, work, secret), "NOT_FOUND")
        assert "sequence 4242 is not open here" in message
    after = tower_stats(server.grpc_url)
    assert all(after[m]["opened"] == before[m]["opened"] for m in after)


@pytest.mark.parametrize("settings", ['{"mode": "ar",', '{"beam_width": 4}', "[1]"])
def test_malformed_tower_settings_are_a_clear_one_line_error(server, settings):
    from trt_twotower.runtime.tower_work import ContextWork
    from trt_twotower.serve import tower_requests
    from trt_twotower.serve.towers import SequenceKey
    secret = _secret(server)
    key = SequenceKey.new()
    work = _push([key], [5], GenerationSettings(mode="ar"))
    work.opened = [key]
    original = tower_requests.settings_to_json
    tower_requests.settings_to_json = lambda s: settings
    try:
        message = _refusal(lambda: _tower_call(server, "context_tower", work, secret),
                           "INVALID_ARGUMENT")
    finally:
        tower_requests.settings_to_json = original
        _tower_call(server, "context_tower", ContextWork(released=[key]), secret)
    assert message.startswith("settings must be a JSON object of GenerationSettings fields")
    assert "\n" not in message and "Error" not in message


def test_oversized_prompts_are_refused_before_tokenizing_and_others_are_unaffected(server,
                                                                                  local):
    from trt_twotower.serve.client import ClientError, generate
    s = GenerationSettings(max_new_tokens=16, block_size=8, steps_per_block=8)
    huge = ("def f(x):\n    return x + 1\n" * 300_000)[:8_000_000]

    def refused(prompt):
        start = time.monotonic()
        with pytest.raises(ClientError, match="8000000 bytes, more than the"):
            generate(server.grpc_url, prompt, s, False, 60.0)
        return time.monotonic() - start

    def short():
        start = time.monotonic()
        out = generate(server.grpc_url, PROMPTS[0], s, False, 60.0)
        return out, time.monotonic() - start
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        bigs = [pool.submit(refused, huge) for _ in range(3)]
        time.sleep(0.2)
        small = pool.submit(short)
        seconds = [b.result(timeout=120) for b in bigs]
        out, small_seconds = small.result(timeout=120)
    assert max(seconds) < 8.0  # tokenizing each would take ~6 s here, one after another
    assert small_seconds < 8.0 and out.ids == local(PROMPTS[0], s)


def test_the_admin_apis_are_restricted_on_both_protocols(server):
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for call in (lambda: client.get_model_config("context_tower"),
                     lambda: client.update_log_settings({"log_verbose_level": 1}),
                     lambda: client.register_system_shared_memory("r", "/r", 64),
                     lambda: client.get_trace_settings()):
            assert "restricted" in _refusal(call).lower()
        assert client.is_server_ready() and client.get_model_metadata("ensemble")
    finally:
        client.close()
    for path in ("models/context_tower/config", "logging"):
        with pytest.raises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v2/{path}", timeout=30)
        assert raised.value.code in (401, 403)
