"""Generation over two tower hosts (what the Triton models run) equals the in-process session,
keeps caches only in the towers, and frees them however a request ends."""

import pytest
import torch

from trt_twotower.policy import GenerationSettings
from trt_twotower.runtime.session import Request, TwoTowerSession
from trt_twotower.runtime.torch_executor import TorchContextExecutor, TorchDenoiserExecutor
from trt_twotower.serve.orchestrator import LocalLink, generate
from trt_twotower.serve.towers import (ContextTower, DenoiserTower, SequenceKey, TowerBusy,
                                       TowerRequestError, UnknownSequence, settings_from_json,
                                       settings_to_json)

MAX_CONTEXT = 80


@pytest.fixture
def towers(tiny_model):
    c = tiny_model.config
    return (ContextTower(TorchContextExecutor(tiny_model), c, MAX_CONTEXT, torch.float32, 4),
            DenoiserTower(TorchDenoiserExecutor(tiny_model), c, MAX_CONTEXT, torch.float32, 4))


def _run(model, towers, prompt, settings, sequence=None, on_delta=None):
    link = LocalLink(*towers)
    return generate(link, sequence or SequenceKey.new(), prompt, settings, model.config,
                    on_delta)


@pytest.mark.parametrize("mode", ["diffusion", "mock-ar", "ar"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("prompt_length", [1, 6])
def test_equals_the_in_process_session(tiny_model, towers, rng, mode, temperature,
                                       prompt_length):
    s = GenerationSettings(mode=mode, max_new_tokens=16, block_size=8, steps_per_block=5,
                           temperature=temperature, top_k=40 if temperature else None,
                           confidence_threshold=0.3, seed=11, stop_at_eos=False)
    prompt = torch.randint(4, tiny_model.config.vocab_size, (prompt_length,),
                           generator=rng).tolist()
    session = TwoTowerSession(TorchContextExecutor(tiny_model),
                              TorchDenoiserExecutor(tiny_model), tiny_model.config, MAX_CONTEXT)
    expected = session.generate([Request(prompt, s)])[0]
    got = _run(tiny_model, towers, prompt, s)
    assert got.tokens == expected.tokens and len(got.tokens) == 16
    assert got.stats.denoiser_evals == expected.stats.denoiser_evals
    assert got.stats.context_steps == expected.stats.context_steps
    if mode == "diffusion":
        assert got.stats.handoff_bytes == expected.stats.handoff_bytes
    assert all(t.stats()["live_sequences"] == 0 for t in towers)


def test_a_cancelled_request_frees_both_towers(tiny_model, towers, rng):
    blocks = []
    s = GenerationSettings(max_new_tokens=32, block_size=8, steps_per_block=8)
    result = _run(tiny_model, towers, [5, 6, 7], s,
                  on_delta=lambda ids: blocks.append(ids) or len(blocks) < 2)
    assert result.cancelled and len(result.tokens) == 16 and len(blocks) == 2
    for tower in towers:
        stats = tower.stats()
        assert stats["live_sequences"] == 0 and stats["cache_bytes"] == 0
        assert stats["opened"] == stats["released"] == 1


def test_an_error_inside_a_tower_still_frees_the_sequence(tiny_model, towers):
    s = GenerationSettings(max_new_tokens=16, block_size=8)
    with pytest.raises(Exception, match="maximum context"):
        _run(tiny_model, towers, list(range(4, 4 + MAX_CONTEXT)), s)
    assert all(t.stats()["live_sequences"] == 0 for t in towers)


def test_prompt_ids_outside_the_vocabulary_are_refused_before_tower_work(tiny_model, towers):
    with pytest.raises(ValueError, match=r"prompt ids must lie in \[0, "):
        _run(tiny_model, towers, [5, tiny_model.config.vocab_size], GenerationSettings())
    assert all(t.stats()["opened"] == 0 for t in towers)


def test_a_full_tower_refuses_new_sequences_and_keeps_the_others(tiny_model, towers):
    context, _ = towers
    keys = [SequenceKey.new() for _ in range(5)]
    for key in keys[:4]:
        context.open(key)
        context.extend(key, [5, 6])
    with pytest.raises(TowerBusy, match="all 4 sequence slots"):
        context.open(keys[4])
    assert context.stats()["live_sequences"] == 4
    assert context.release(keys[2]) and not context.release(keys[2])
    context.open(keys[4])
    context.extend(keys[4], [5])


def test_settings_cross_the_boundary_unchanged_and_are_validated_again():
    s = GenerationSettings(mode="mock-ar", max_new_tokens=24, block_size=8, temperature=0.5,
                           top_p=0.9, seed=2**40)
    assert settings_from_json(settings_to_json(s)) == s
    with pytest.raises(ValueError, match="confidence_threshold"):
        settings_from_json(settings_to_json(s).replace('"confidence_threshold": 0.8',
                                                       '"confidence_threshold": 2.0'))


@pytest.mark.parametrize("text", ['{"mode": "ar",', '{"beam_width": 4}', "[1, 2]", "null"])
def test_malformed_settings_are_one_clear_request_error(text):
    with pytest.raises(TowerRequestError, match="^settings must be a JSON object") as raised:
        settings_from_json(text)
    assert "\n" not in str(raised.value)


def test_steps_for_a_sequence_the_tower_does_not_hold_are_refused_not_started(tiny_model,
                                                                              towers):
    context, denoiser = towers
    s = GenerationSettings(block_size=8)
    mask = tiny_model.config.mask_token_id
    key = SequenceKey(3, "owner")
    with pytest.raises(UnknownSequence, match="sequence 3 is not open here"):
        denoiser.denoise(key, [mask] * 8, s, 0)
    for step in (lambda: context.extend(key, [5]),
                 lambda: context.extend_and_sample(key, [5], s, 0),
                 lambda: denoiser.append(key, b"")):
        with pytest.raises(UnknownSequence):
            step()
    assert context.stats()["opened"] == denoiser.stats()["opened"] == 0
    context.open(key)
    denoiser.open(key)
    denoiser.append(key, context.extend(key, [5, 6, 7]))
    assert len(denoiser.denoise(key, [mask] * 8, s, 0)) == 8
    assert denoiser.release(key)
    with pytest.raises(UnknownSequence):
        denoiser.mock_ar(key, 5, s, 0)
    assert denoiser.stats()["live_sequences"] == 0 and denoiser.stats()["opened"] == 1


def test_only_the_opener_can_step_or_release_a_sequence(tiny_model, towers):
    context, _ = towers
    s = GenerationSettings(mode="ar", max_new_tokens=8)
    mine = SequenceKey.new()
    context.open(mine)
    thief = SequenceKey(mine.id, "guessed-owner-\u00e9")
    assert not context.release(thief)
    with pytest.raises(UnknownSequence, match="belongs to another request"):
        context.extend_and_sample(thief, [5, 6], s, 0)
    with pytest.raises(TowerRequestError, match="already open"):
        context.open(thief)
    assert context.stats()["live_sequences"] == 1
    assert context.release(mine)


def test_sequence_keys_are_random_not_counted():
    ids = {SequenceKey.new().id for _ in range(64)}
    assert len(ids) == 64 and all(0 <= i < 2**63 for i in ids)
    assert len({i >> 32 for i in ids}) > 1  # a PID << 32 plus a counter keeps one prefix
