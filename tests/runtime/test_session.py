"""The session over two executors equals the reference generation; the handoff moves exactly
one block's worth of state; batching, streaming and cancellation behave."""

import pytest
import torch

from trt_twotower import names
from trt_twotower.policy import GenerationSettings
from trt_twotower.reference import generate
from trt_twotower.runtime.cache import CacheFullError
from trt_twotower.runtime.session import Request, TwoTowerSession
from trt_twotower.runtime.torch_executor import TorchContextExecutor, TorchDenoiserExecutor

MAX_CONTEXT = 80


def _session(model, **kw):
    return TwoTowerSession(TorchContextExecutor(model), TorchDenoiserExecutor(model),
                           model.config, MAX_CONTEXT, **kw)


def _prompts(model, rng, lengths=(5, 1, 9)):
    return [torch.randint(4, model.config.vocab_size, (n,), generator=rng).tolist()
            for n in lengths]


@pytest.mark.parametrize("mode", ["diffusion", "mock-ar", "ar"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_session_equals_reference_generation(tiny_model, rng, mode, temperature):
    s = GenerationSettings(mode=mode, max_new_tokens=16, block_size=8, steps_per_block=8,
                           temperature=temperature, stop_at_eos=False, seed=3)
    prompts = _prompts(tiny_model, rng)
    results = _session(tiny_model).generate([Request(p, s) for p in prompts])
    for prompt, result in zip(prompts, results):
        ref = generate(tiny_model, torch.tensor([prompt]), s)
        assert result.tokens == ref.tokens[0]
        assert result.stats.denoiser_evals == ref.denoiser_evals[0]


def test_batched_requests_equal_each_request_alone(tiny_model, rng):
    """Different prompt lengths, seeds and stopping points in one batch."""
    prompts = _prompts(tiny_model, rng, (3, 7, 1, 12))
    settings = [GenerationSettings(max_new_tokens=n, block_size=4, steps_per_block=4,
                                   temperature=0.7, seed=i, stop_at_eos=False)
                for i, n in enumerate((8, 16, 4, 12))]
    session = _session(tiny_model)
    together = session.generate([Request(p, s) for p, s in zip(prompts, settings)])
    for p, s, result in zip(prompts, settings, together):
        alone = session.generate([Request(p, s)])[0]
        assert result.tokens == alone.tokens and len(result.tokens) == s.max_new_tokens


def _expected_block_bytes(config, tokens):
    kv = len(config.attention_layers) * 2 * config.num_key_value_heads * config.head_dim * 4
    conv = config.conv_dim * (config.conv_kernel - 1) * 4
    ssm = config.mamba_num_heads * config.mamba_head_dim * config.ssm_state_size * 4
    return tokens * kv + len(config.mamba_layers) * (conv + ssm)


def test_mirror_equals_context_cache_and_moves_one_block_per_commit(tiny_model, rng):
    config = tiny_model.config
    session = _session(tiny_model)
    context, denoiser = session.scheduler.towers.slots
    seen = []
    original = denoiser.copy_from

    def checked_copy(source, slot, old):
        moved = original(source, slot, old)
        src, dst = context.pool, denoiser.pool
        for name, t in src.tensors.items():
            assert torch.equal(t[slot], dst.tensors[name][slot]), name
        assert src.lengths[slot] == dst.lengths[slot]
        seen.append(moved)
        return moved

    denoiser.copy_from = checked_copy
    s = GenerationSettings(max_new_tokens=24, block_size=8, steps_per_block=8, stop_at_eos=False)
    session.generate([Request(p, s) for p in _prompts(tiny_model, rng, (5, 2))])
    assert seen[:2] == [_expected_block_bytes(config, 5), _expected_block_bytes(config, 2)]
    assert seen[2:] == [_expected_block_bytes(config, 8)] * 4  # two commits of two rows


def test_streaming_yields_blocks_in_order_that_concatenate_to_the_result(tiny_model, rng):
    deltas = []
    s = GenerationSettings(max_new_tokens=24, block_size=8, steps_per_block=8, stop_at_eos=False)
    result = _session(tiny_model).generate([Request(_prompts(tiny_model, rng)[0], s,
                                                    deltas.append)])[0]
    assert [len(d) for d in deltas] == [8, 8, 8]
    assert sum(deltas, []) == result.tokens


def test_cancellation_stops_a_request_and_frees_its_rows(tiny_model, rng):
    s = GenerationSettings(max_new_tokens=32, block_size=8, steps_per_block=8, stop_at_eos=False)
    session = _session(tiny_model)
    batches = []
    towers = session.scheduler.towers
    original = towers.context

    def spy(work):  # the 4-token prompts go in alone; a block commit is [rows, 8]
        batches.extend(len(g.rows) for g in work.groups if g.ids.shape[1] == 8)
        return original(work)

    towers.context = spy
    prompts = _prompts(tiny_model, rng, (4, 4))
    results = session.generate([Request(prompts[0], s, lambda ids: False),
                                Request(prompts[1], s)])
    assert results[0].cancelled and len(results[0].tokens) == 8
    assert not results[1].cancelled and len(results[1].tokens) == 32
    assert batches == [1, 1, 1]  # after the first block only the live row is extended
    assert len(session.scheduler.towers.free) == session.scheduler.limits.capacity
    alone = _session(tiny_model).generate([Request(prompts[1], s)])[0]
    assert alone.tokens == results[1].tokens


def test_oversized_requests_are_refused_before_any_work(tiny_model):
    s = GenerationSettings(max_new_tokens=64, block_size=8, steps_per_block=8)
    with pytest.raises(CacheFullError, match="maximum context"):
        _session(tiny_model).generate([Request(list(range(4, 30)), s)])


def test_cache_layout_follows_the_names_module(tiny_model):
    from trt_twotower.runtime.cache import StepCache
    cache = StepCache.allocate(tiny_model.config, 2, 16, torch.float32)
    expected = [s.name for s in names.context_cache_inputs(tiny_model.config, 16)]
    assert list(cache.tensors) == expected
