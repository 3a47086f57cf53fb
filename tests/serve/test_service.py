"""The orchestrator model's request validation and the repository's values, without a
server."""

import numpy as np
import pytest

from trt_twotower.policy import GenerationSettings
from trt_twotower.serve.repository import RepositoryError, repository_values
from trt_twotower.serve.service import (RequestError, ServiceLimits, check_prompt_bytes,
                                        prompt_byte_limit, settings_from_inputs)

LIMITS = ServiceLimits(max_context=64, max_tokens=32, block_sizes=(8, 16))


def test_fp32_inputs_arrive_as_the_values_the_client_wrote():
    values = {"max_tokens": np.int32(16), "confidence_threshold": np.float32(0.9),
              "temperature": np.float32(0.7), "top_p": np.float32(0.95),
              "mode": np.bytes_(b"diffusion"), "block_size": np.int32(8)}
    s = settings_from_inputs(values, 4, LIMITS)
    assert (s.confidence_threshold, s.temperature, s.top_p) == (0.9, 0.7, 0.95)
    assert float(np.float32(0.9)) != 0.9  # what would reach the policy without rounding


def test_missing_inputs_take_the_in_process_defaults():
    s = settings_from_inputs({"max_tokens": np.int32(16)}, 4, LIMITS)
    d = GenerationSettings()
    assert (s.mode, s.block_size, s.steps_per_block, s.confidence_threshold, s.seed) == \
        (d.mode, d.block_size, d.steps_per_block, d.confidence_threshold, d.seed)


@pytest.mark.parametrize("values,length,needle", [
    ({"max_tokens": np.int32(40)}, 4, r"max_tokens must lie in \[1, 32\]"),
    ({"max_tokens": np.int32(30)}, 40, "exceeds the maximum context of 64"),
    ({"max_tokens": np.int32(8), "block_size": np.int32(4)}, 4, "block_size 4"),
    ({"max_tokens": np.int32(8), "steps_per_block": np.int32(0)}, 4, "steps_per_block"),
])
def test_requests_outside_the_limits_are_refused_with_the_reason(values, length, needle):
    with pytest.raises(RequestError, match=needle):
        settings_from_inputs(values, length, LIMITS)


def test_capacity_must_give_every_orchestrator_instance_a_slot(tmp_path):
    values = repository_values("builtin", "torch", tmp_path, "cuda:0", "cuda:1", 64, 8, "16",
                               capacity=4, bls_instances=2, dtype="bfloat16")
    assert values["CONTEXT_PLACEMENT"] == "kind: KIND_GPU gpus: [ 0 ]"
    assert values["DENOISER_PLACEMENT"] == "kind: KIND_GPU gpus: [ 1 ]"
    assert values["DTYPE"] == "bfloat16"
    with pytest.raises(RepositoryError, match="capacity 1 for 2 instances"):
        repository_values("builtin", "torch", tmp_path, "cpu", "cpu", 64, 8, "16",
                          capacity=1, bls_instances=2)
    assert repository_values("builtin", "torch", tmp_path, "cpu", "cpu", 64, 8, "16",
                             ar_steps=2)["AR_STEPS"] == "2"
    with pytest.raises(RepositoryError, match="ar_steps must be at least 1, got 0"):
        repository_values("builtin", "torch", tmp_path, "cpu", "cpu", 64, 8, "16",
                          ar_steps=0)
    assert repository_values("builtin", "torch", tmp_path, "cpu", "cpu", 64, 8, "16",
                             stream_interval=2)["STREAM_INTERVAL"] == "2"
    with pytest.raises(RepositoryError, match="stream_interval must be at least 1, got 0"):
        repository_values("builtin", "torch", tmp_path, "cpu", "cpu", 64, 8, "16",
                          stream_interval=0)


def test_towers_sharing_the_cpu_split_its_cores(monkeypatch):
    from trt_twotower.serve import repository
    monkeypatch.setattr(repository.os, "cpu_count", lambda: 16)
    assert repository.tower_threads("cpu", "cpu", None) == 8
    assert repository.tower_threads("cpu", "cuda:1", None) == 16
    assert repository.tower_threads("cuda:0", "cuda:1", None) == 0
    assert repository.tower_threads("cpu", "cpu", 3) == 3
    with pytest.raises(RepositoryError, match="cpu_threads must be 0 or more"):
        repository.tower_threads("cpu", "cpu", -1)


def test_a_prompt_is_refused_by_bytes_only_when_no_tokenization_could_fit_it():
    from tokenizers import Tokenizer

    from trt_twotower.tokenizer import BUILTIN_TOKENIZER, builtin_tokenizer
    vocabulary = ["a", "bb", "\u0120\u0120\u0120"]  # byte-level tokens spell 2 bytes a char
    limit = prompt_byte_limit(vocabulary, max_context=10)
    assert limit == 60
    check_prompt_bytes(limit, limit)
    with pytest.raises(RequestError, match="61 bytes, more than the 60 bytes"):
        check_prompt_bytes(limit + 1, limit)
    vocabulary = Tokenizer.from_file(str(BUILTIN_TOKENIZER)).get_vocab()
    for text in ("    return x\n" * 50, " " * 300, "déjà vu → ∑ " * 20):
        tokens = len(builtin_tokenizer().encode(text))
        assert len(text.encode()) <= prompt_byte_limit(vocabulary, tokens)
