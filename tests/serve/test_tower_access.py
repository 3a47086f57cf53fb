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


def _tower_call(server, model: str, op: str, **values):
    """One direct tower request, as a client that is not the orchestrator would send it."""
    import tritonclient.grpc as grpcclient

    dtypes = {"sequence_id": ("UINT64", np.uint64), "input_ids": ("INT64", np.int64),
              "step_key": ("INT64", np.int64)}
    inputs = []
    for name, value in {"op": op, **values}.items():
        dtype, numpy_type = dtypes.get(name, ("BYTES", np.object_))
        array = np.array(value if isinstance(value, list) else [value], dtype=numpy_type)
        if dtype == "BYTES":
            array = np.array([str(v).encode() for v in array], dtype=np.object_)
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        return client.infer(model, inputs, client_timeout=60)
    finally:
        client.close()


def _refusal(call, status: str = "") -> str:
    """The message of the error ``call`` raises, after checking its gRPC status."""
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as raised:
        call()
    assert raised.value.status().endswith(status)
    return str(raised.value.message())


def test_a_direct_tower_call_without_the_secret_is_refused(server):
    for secret in ({}, {"tower_secret": "guess"}):
        message = _refusal(lambda: _tower_call(server, "context_tower", "extend",
                                               sequence_id=12345, input_ids=[5, 6],
                                               **secret))
        assert "tower models answer the orchestrator only" in message
    from trt_twotower.serve.client import tower_stats
    assert tower_stats(server.grpc_url)["context_tower"]["live_sequences"] == 0


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
    from trt_twotower.serve.client import generate
    s = GenerationSettings(mode="ar", max_new_tokens=96, block_size=8)
    prefix = (_stub_pid("twotower_bls") & 0xFFFFFFFF) << 32
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        victim = pool.submit(generate, server.grpc_url, PROMPTS[1], s, False, 120.0)
        deadline = time.monotonic() + 60
        while not victim.done() and time.monotonic() < deadline:
            for counter in range(1, 64):
                for model in ("context_tower", "denoiser_tower"):
                    try:
                        _tower_call(server, model, "release", sequence_id=prefix | counter)
                    except Exception:  # refused, as it should be
                        pass
        out = victim.result(timeout=120)
    assert out.ids == local(PROMPTS[1], s)


def test_only_the_opener_can_step_or_release_a_sequence(server):
    """Even a caller holding the secret (another request of the orchestrator) cannot touch a
    sequence it did not open."""
    secret = _secret(server)

    def call(op, owner, **values):
        return _tower_call(server, "context_tower", op, tower_secret=secret,
                           sequence_id=777, owner=owner, **values)
    call("open", "owner-a")
    try:
        released = call("release", "owner-b").as_numpy("released")
        assert not released[0]
        message = _refusal(lambda: call("extend", "owner-b", input_ids=[5, 6]))
        assert "sequence 777 is not open here for this caller" in message
        assert "already open" in _refusal(lambda: call("open", "owner-b"))
        assert call("extend", "owner-a", input_ids=[5, 6]).as_numpy("cache_delta").size > 0
    finally:
        assert call("release", "owner-a").as_numpy("released")[0]


def test_a_step_for_an_unknown_sequence_is_an_error_not_a_fresh_cache(server):
    from trt_twotower.serve.client import tower_stats
    before = tower_stats(server.grpc_url)
    secret = _secret(server)
    for model, op, values in [("context_tower", "extend", {"input_ids": [5, 6]}),
                              ("context_tower", "extend_and_sample",
                               {"input_ids": [5], "step_key": 0,
                                "settings": '{"mode": "ar"}'}),
                              ("denoiser_tower", "step", {"input_ids": [3] * 8, "step_key": 0,
                                                          "settings": "{}"})]:
        message = _refusal(lambda: _tower_call(server, model, op, tower_secret=secret,
                                               sequence_id=4242, owner="o", **values),
                           "NOT_FOUND")
        assert "sequence 4242 is not open here" in message
    after = tower_stats(server.grpc_url)
    assert all(after[m]["opened"] == before[m]["opened"] for m in after)


@pytest.mark.parametrize("settings", ['{"mode": "ar",', '{"beam_width": 4}', "[1]"])
def test_malformed_tower_settings_are_a_clear_one_line_error(server, settings):
    secret = _secret(server)

    def call(op, **values):
        return _tower_call(server, "context_tower", op, tower_secret=secret,
                           sequence_id=99, owner="o", **values)
    call("open")
    try:
        message = _refusal(lambda: call("extend_and_sample", input_ids=[5], step_key=0,
                                        settings=settings), "INVALID_ARGUMENT")
    finally:
        call("release")
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
