"""The `ensemble` model as clients try it first: Triton's HTTP generate extension and gRPC
requests that send only the inputs they care about, every other setting defaulting to
`trt-twotower generate`'s (GenerationSettings)."""

import http.client
import json
import queue

import numpy as np
import pytest

from test_server import PROMPTS, pytestmark, server  # noqa: F401  (fixtures)
from trt_twotower.policy import GenerationSettings


def _post(port, path, body, timeout=120):
    """(status, body lines) of one HTTP POST to the server, read to its end."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", path, json.dumps(body),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read().decode().splitlines()
    finally:
        connection.close()


def _events(lines):
    """The JSON events of a server-sent event stream."""
    return [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: ")]


def test_generate_stream_with_only_text_and_max_tokens_streams_the_clients_text(server):
    from trt_twotower.serve.client import generate
    status, lines = _post(server.http_port, "/v2/models/ensemble/generate_stream",
                          {"text_input": PROMPTS[0], "max_tokens": 32})
    events = _events(lines)
    assert status == 200 and events and all("error" not in e for e in events)
    expected = generate(server.grpc_url, PROMPTS[0], GenerationSettings(max_new_tokens=32),
                        stream=False)
    assert "".join(e["text_output"] for e in events) == expected.text
    assert sum((e["output_ids"] for e in events), []) == expected.ids


def test_generate_stream_with_stream_true_sends_each_block_as_the_client_gets_it(server):
    from trt_twotower.serve.client import generate
    status, lines = _post(server.http_port, "/v2/models/ensemble/generate_stream",
                          {"text_input": PROMPTS[1], "max_tokens": 32, "stream": True,
                           "block_size": 8})
    texts = [e["text_output"] for e in _events(lines) if e["output_ids"]]
    expected = generate(server.grpc_url, PROMPTS[1],
                        GenerationSettings(max_new_tokens=32, block_size=8), stream=True)
    assert status == 200 and len(texts) == len(expected.blocks) > 1
    assert texts == expected.texts


def test_generate_with_only_text_uses_the_cli_defaults(server):
    from trt_twotower.serve.client import generate
    status, lines = _post(server.http_port, "/v2/models/ensemble/generate",
                          {"text_input": PROMPTS[2]})
    answer = json.loads("".join(lines))
    expected = generate(server.grpc_url, PROMPTS[2], GenerationSettings(), stream=False)
    assert status == 200, answer
    assert answer["output_ids"] == expected.ids and len(expected.ids) == 64
    assert answer["text_output"] == expected.text


def test_a_bad_setting_over_http_is_one_clear_error(server):
    status, lines = _post(server.http_port, "/v2/models/ensemble/generate_stream",
                          {"text_input": PROMPTS[0], "max_tokens": 17})
    events = _events(lines)
    assert [e.get("error", "") for e in events][0].startswith(
        "max_new_tokens=17 is not a multiple of block_size=16"), (status, lines)


def test_a_grpc_request_with_only_text_input_gets_the_default_generation(server):
    import tritonclient.grpc as grpcclient

    from trt_twotower.serve.client import generate
    client = grpcclient.InferenceServerClient(server.grpc_url)
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([PROMPTS[0].encode()], dtype=np.object_))
    answers: "queue.Queue" = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer("ensemble", [text])
        result, error = answers.get(timeout=120)
    finally:
        client.stop_stream()
        client.close()
    assert error is None, error
    expected = generate(server.grpc_url, PROMPTS[0], GenerationSettings(), stream=False)
    assert result.as_numpy("output_ids").tolist() == expected.ids
    assert result.as_numpy("text_output")[0].decode() == expected.text


@pytest.mark.parametrize("argv,url", [
    (["tritonserver", "--grpc-address=127.0.0.1", "--grpc-port=8123"], "127.0.0.1:8123"),
    (["tritonserver", "--grpc-port", "9001"], "127.0.0.1:9001"),
    (["tritonserver"], "127.0.0.1:8001"),
    (["tritonserver", "--grpc-address=::", "--grpc-port=5"], "[::1]:5"),
    (["tritonserver", "--grpc-address=10.1.2.3", "--grpc-port=5"], "10.1.2.3:5"),
])
def test_the_ensemble_finds_its_servers_grpc_endpoint(argv, url):
    from trt_twotower.serve.hosting import server_grpc_url
    assert server_grpc_url(argv) == url


def test_the_ensemble_refuses_to_load_without_grpc():
    from trt_twotower.serve.hosting import server_grpc_url
    with pytest.raises(RuntimeError, match="gRPC enabled"):
        server_grpc_url(["tritonserver", "--allow-grpc=false"])
