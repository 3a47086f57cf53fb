"""The OpenAI-compatible API with the official ``openai`` client, against a real tritonserver
(CPU, built-in model) and the app served by uvicorn on 127.0.0.1."""

import http.client
import importlib.util
import json
import time
import urllib.error
import urllib.request

import pytest

from trt_twotower.policy import GenerationSettings
from trt_twotower.reference.sources import BUILTIN_CHECKPOINT
from trt_twotower.tokenizer import builtin_tokenizer

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None
        for m in ("pytriton", "tritonclient", "fastapi", "uvicorn", "openai")),
    reason="needs nvidia-pytriton (tritonserver), tritonclient, fastapi, uvicorn and openai")
MODEL = "twotower-builtin"
KEY = "sk-test-key"
PROMPT = "def area(r):\n"
BODY = {"block_size": 8, "steps_per_block": 8}
LONG = 480  # tokens of a request that would run for many seconds if nothing stopped it
RELEASE_SECONDS = 2.0  # a cancel must free the towers' caches within this


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from trt_twotower.serve.repository import render, repository_values
    from trt_twotower.serve.server import TritonServer

    work = tmp_path_factory.mktemp("triton")
    repo = render(work / "repo", repository_values(
        "builtin", "torch", BUILTIN_CHECKPOINT, "cpu", "cpu", 512, LONG, "8,16", capacity=4))
    process = TritonServer(repo, work).start(timeout=150)
    yield process
    # Not asserted to be 0: after a cancelled stream (three tests here cancel one) the
    # ensemble model sometimes stays loaded until tritonserver's exit timeout, which then
    # exits 1; the stop itself is bounded either way.
    assert process.stop() is not None


@pytest.fixture(scope="module")
def api(server):
    from trt_twotower.serve.openai_api import create_app, run_openai_server

    handle = run_openai_server(create_app(server.grpc_url, MODEL, builtin_tokenizer(),
                                          api_key=KEY), "127.0.0.1", 0)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(api):
    from openai import OpenAI
    return OpenAI(base_url=f"{api.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(server):
    """What trt_twotower.serve.client generates for PROMPT, greedy, 16 tokens in blocks of 8."""
    from trt_twotower.serve.client import generate
    return generate(server.grpc_url, PROMPT, GenerationSettings(max_new_tokens=16, **BODY),
                    stream=False)


def _complete(client, **changes):
    fields = dict(model=MODEL, prompt=PROMPT, max_tokens=16, extra_body=BODY)
    fields.update(changes)
    return client.completions.create(**fields)


def test_the_models_list_names_the_served_model_and_health_answers(api, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    with urllib.request.urlopen(f"{api.url}/health", timeout=10) as answer:
        assert answer.status == 200


def test_a_completion_equals_what_the_grpc_client_generates(client, reference):
    out = _complete(client)
    assert out.object == "text_completion" and out.model == MODEL and out.id.startswith("cmpl-")
    assert out.choices[0].text == reference.text
    assert out.choices[0].index == 0 and out.choices[0].logprobs is None
    assert out.choices[0].finish_reason == ("length" if len(reference.ids) == 16 else "stop")
    assert out.usage.prompt_tokens == len(builtin_tokenizer().encode(PROMPT))
    assert out.usage.completion_tokens == len(reference.ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.usage.denoiser_evaluations == reference.stats["denoiser_evaluations"]
    assert out.usage.tokens_per_evaluation == reference.stats["tokens_per_evaluation"]


def test_a_budget_that_is_not_a_block_multiple_is_cut_to_its_tokens(client, reference):
    out = _complete(client, max_tokens=11)
    assert out.choices[0].text == builtin_tokenizer().decode(reference.ids[:11])
    assert out.usage.completion_tokens == min(11, len(reference.ids))


def test_token_id_prompts_are_accepted(client, reference):
    out = _complete(client, prompt=builtin_tokenizer().encode(PROMPT))
    assert out.choices[0].text == reference.text


def test_stream_chunks_join_to_the_completion_and_end_with_its_usage(client):
    whole = _complete(client)
    chunks = list(_complete(client, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason


def test_a_stop_list_cuts_at_the_first_stop_streaming_or_not(client, reference):
    stop = reference.text[4:7]
    expected = reference.text[:reference.text.find(stop)]
    out = _complete(client, stop=["never seen \x01", stop])
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    streamed = _complete(client, stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


@pytest.mark.parametrize("changes,param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 2}, "n"),
    ({"logprobs": 6}, "logprobs"),
    ({"logprobs": 1, "extra_body": {"mode": "diffusion"}}, "logprobs"),
    ({"top_p": 1.5}, "top_p"),
    ({"extra_body": {"mode": "beam"}}, "mode"),
    ({"extra_body": {"block_size": 4}}, "block_size"),  # the server refuses it
    ({"prompt": ["a", "b"]}, "prompt"),
])
def test_a_bad_parameter_is_a_400_that_names_it(client, changes, param):
    from openai import BadRequestError
    with pytest.raises(BadRequestError) as caught:
        _complete(client, **changes)
    assert caught.value.status_code == 400 and caught.value.param == param


def test_logprobs_with_echo_score_prompt_and_completion_as_the_model_does(client):
    """The official client's logprobs object against one full forward pass of the built-in
    model's context tower over prompt + completion (fp32; tolerance 1e-4)."""
    import torch

    from trt_twotower.reference.sources import open_source
    out = _complete(client, logprobs=2, echo=True, max_tokens=6)
    choice = out.choices[0]
    lp = choice.logprobs
    tokenizer = builtin_tokenizer()
    prompt_ids = tokenizer.encode(PROMPT)
    assert choice.text.startswith(PROMPT) and "".join(lp.tokens) == choice.text
    assert len(lp.tokens) == len(prompt_ids) + out.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    ids = tokenizer.encode(choice.text)
    assert ids[:len(prompt_ids)] == prompt_ids
    model = open_source(None, None).model
    with torch.no_grad():
        logp = torch.log_softmax(model.context_logits(torch.tensor([ids]),
                                                      model.new_cache(1))[0], -1)
    for j in range(1, len(ids)):
        assert abs(lp.token_logprobs[j] - float(logp[j - 1, ids[j]])) < 1e-4
        assert len(lp.top_logprobs[j]) <= 2
        assert max(lp.top_logprobs[j].values()) == pytest.approx(float(logp[j - 1].max()),
                                                                 abs=1e-4)


def test_streamed_logprobs_join_to_the_whole_answers(client):
    whole = _complete(client, logprobs=2, echo=True, max_tokens=12).choices[0]
    chunks = [c.choices[0] for c in _complete(client, logprobs=2, echo=True, max_tokens=12,
                                               stream=True) if c.choices]
    assert "".join(c.text for c in chunks) == whole.text
    joined = {key: [x for c in chunks if c.logprobs for x in getattr(c.logprobs, key)]
              for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    for key, values in joined.items():
        assert values == getattr(whole.logprobs, key), key
    streamed = ""
    for chunk in chunks:  # a chunk never scores a token whose text it has not yet sent
        streamed += chunk.text
        if chunk.logprobs and chunk.logprobs.tokens:
            last = chunk.logprobs.text_offset[-1] + len(chunk.logprobs.tokens[-1])
            assert last <= len(streamed)


def test_echo_alone_prepends_the_prompt_and_logprobs_alone_cover_the_completion(client):
    plain = _complete(client, max_tokens=8)
    echoed = _complete(client, max_tokens=8, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    assert echoed.choices[0].logprobs is None
    scored = _complete(client, max_tokens=5, logprobs=0)
    lp = scored.choices[0].logprobs
    assert "".join(lp.tokens) == scored.choices[0].text and len(lp.token_logprobs) == 5
    assert lp.text_offset[0] == len(PROMPT) and all(t == {} for t in lp.top_logprobs)


def test_a_wrong_key_is_401_and_an_unknown_model_404(api, client):
    from openai import AuthenticationError, NotFoundError, OpenAI
    stranger = OpenAI(base_url=f"{api.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(AuthenticationError):
        stranger.models.list()
    with pytest.raises(AuthenticationError):
        _complete(stranger, max_tokens=0)  # the key is checked before the body
    with pytest.raises(NotFoundError) as caught:
        _complete(client, model="gpt-4")
    assert caught.value.code == "model_not_found"


def test_chat_without_a_template_says_the_checkpoint_is_a_base_model(client):
    from openai import BadRequestError
    with pytest.raises(BadRequestError, match="no chat template"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])


def test_an_unreachable_server_is_503_with_retry_after():
    from openai import InternalServerError, OpenAI

    from trt_twotower.serve.openai_api import create_app, run_openai_server
    handle = run_openai_server(create_app("127.0.0.1:1", MODEL, builtin_tokenizer()),
                               "127.0.0.1", 0)
    try:
        with pytest.raises(InternalServerError) as caught:
            _complete(OpenAI(base_url=f"{handle.url}/v1", api_key="x", max_retries=0))
        assert caught.value.status_code == 503
        assert caught.value.response.headers["retry-after"]
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(f"{handle.url}/health", timeout=10)
        assert health.value.code == 503 and "not ready" in health.value.read().decode()
    finally:
        handle.stop()


def _open_stream(port, key=KEY):
    """A long streaming request on a raw connection, read up to its first event."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("POST", "/v1/completions", json.dumps(
        {"model": MODEL, "prompt": PROMPT, "max_tokens": LONG, "stream": True, **BODY}),
        {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    answer = connection.getresponse()
    assert answer.status == 200 and answer.readline().startswith(b"data: ")
    return connection


def test_a_full_server_is_503_with_retry_after(server):
    from openai import InternalServerError, OpenAI

    from trt_twotower.serve.openai_api import create_app, run_openai_server
    handle = run_openai_server(create_app(server.grpc_url, MODEL, builtin_tokenizer(),
                                          max_in_flight=1), "127.0.0.1", 0)
    try:
        connection = _open_stream(handle.port)
        with pytest.raises(InternalServerError) as caught:
            _complete(OpenAI(base_url=f"{handle.url}/v1", api_key="x", max_retries=0))
        assert caught.value.status_code == 503 and "full" in caught.value.message
        assert caught.value.response.headers["retry-after"]
        connection.close()
    finally:
        handle.stop()


def test_a_client_that_leaves_mid_stream_cancels_its_request(api, server):
    """The request would run for ~LONG / 30 s; its caches must be freed within
    RELEASE_SECONDS of the client leaving, so running to its end cannot pass this."""
    before = _settled(server.grpc_url)
    _open_stream(api.port).close()
    after = _settled(server.grpc_url, timeout=RELEASE_SECONDS)
    assert after["live_sequences"] == 0, "the cancel did not reach the towers in time"
    assert after["released"] == before["released"] + 1
    assert after["opened"] == before["opened"] + 1
    with urllib.request.urlopen(f"{api.url}/metrics", timeout=10) as answer:
        assert 'requests_total{status="499"} 1' in answer.read().decode()


def _settled(url, timeout=30.0):
    """The denoiser tower's sequence counts once none is live (a cancelled request ends on
    the server shortly after its client has gone)."""
    from trt_twotower.serve.client import tower_stats
    deadline = time.monotonic() + timeout
    while True:
        stats = tower_stats(url)["denoiser_tower"]
        if stats["live_sequences"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def test_metrics_count_requests_tokens_and_evaluations(api, client):
    _complete(client)
    with urllib.request.urlopen(f"{api.url}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    assert 'twotower_openai_requests_total{status="200"}' in text
    for name in ("completion_tokens_total", "tokens_per_denoiser_evaluation",
                 "requests_in_flight 0"):
        assert f"twotower_openai_{name}" in text



TEXT = "def f(x):\n    return x + 1\n"


@pytest.mark.parametrize("stops,cut_by", [((), None), (("never", "return"), "return"),
                                          (("x + 1\n",), "x + 1\n")])
def test_text_pieces_join_to_the_whole_text_cut_at_the_first_stop(stops, cut_by):
    """Blocks of three ids, so stop strings straddle blocks and must be held back; the
    completion's tokens are the fewest that spell the stop."""
    from trt_twotower.serve.openai_api import TextCutter
    tokenizer = builtin_tokenizer()
    ids = tokenizer.encode(TEXT)
    cutter = TextCutter(tokenizer, len(ids), stops)
    pieces = [cutter.add(ids[i:i + 3]) for i in range(0, len(ids), 3)] + [cutter.close()]
    assert "".join(pieces) == (TEXT[:TEXT.find(cut_by)] if cut_by else TEXT)
    assert cutter.finish_reason == ("stop" if cut_by else "length")
    spent = cutter.completion_tokens
    if cut_by:
        assert cut_by in tokenizer.decode(ids[:spent])
        assert cut_by not in tokenizer.decode(ids[:spent - 1])
    else:
        assert spent == len(ids)


def test_a_taken_port_is_a_clear_error_within_the_timeout():
    import socket

    from trt_twotower.serve.openai_api import OpenAIServerError, create_app, run_openai_server
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        start = time.monotonic()
        with pytest.raises(OpenAIServerError, match="in use"):
            run_openai_server(create_app("127.0.0.1:1", MODEL, builtin_tokenizer()),
                              "127.0.0.1", taken.getsockname()[1], timeout=10)
        assert time.monotonic() - start < 10
