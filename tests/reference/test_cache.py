"""One cache layout serves every path: prefill, single steps and block extension give the same
logits and states as one pass over the whole sequence (spec §4.6)."""

import pytest
import torch

from trt_twotower.config import preset

TOL = 1e-5  # fp32 relative error on logits


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _one_pass(model, ids):
    cache = model.new_cache(ids.shape[0])
    return model.context_logits(ids, cache), cache


@pytest.mark.parametrize("prompt_len,steps", [(1, 6), (5, 4), (9, 3)])
def test_prefill_then_single_steps_equals_one_pass(tiny_model, rng, prompt_len, steps):
    ids = torch.randint(4, tiny_model.config.vocab_size, (2, prompt_len + steps), generator=rng)
    full, full_cache = _one_pass(tiny_model, ids)
    cache = tiny_model.new_cache(2)
    logits = [tiny_model.context_logits(ids[:, :prompt_len], cache)]
    for i in range(prompt_len, prompt_len + steps):
        logits.append(tiny_model.context_logits(ids[:, i:i + 1], cache))
    assert _rel(torch.cat(logits, 1), full) < TOL
    for i in full_cache.ssm:
        assert _rel(cache.ssm[i], full_cache.ssm[i]) < TOL
        assert _rel(cache.conv[i], full_cache.conv[i]) < TOL
    for i in full_cache.keys:
        assert _rel(cache.keys[i], full_cache.keys[i]) < TOL


@pytest.mark.parametrize("block", [3, 4, 8])
def test_blockwise_extension_equals_one_pass(tiny_model, rng, block):
    """Blocks that cross Mamba chunk boundaries (tiny chunk size is 4)."""
    ids = torch.randint(4, tiny_model.config.vocab_size, (2, 7 + 3 * block), generator=rng)
    full, _ = _one_pass(tiny_model, ids)
    cache = tiny_model.new_cache(2)
    parts = [tiny_model.context_logits(ids[:, :7], cache)]
    for start in range(7, ids.shape[1], block):
        parts.append(tiny_model.context_logits(ids[:, start:start + block], cache))
    assert cache.length == ids.shape[1]
    assert _rel(torch.cat(parts, 1), full) < TOL


def test_one_token_back_view_matches_a_cache_that_stopped_a_token_early(tiny_model, rng):
    ids = torch.randint(4, tiny_model.config.vocab_size, (2, 9), generator=rng)
    early = tiny_model.new_cache(2)
    tiny_model.context_step(ids[:, :-1], early)
    cache = early.clone()
    s2 = cache.mamba_states()
    tiny_model.context_step(ids[:, -1:], cache)
    view = cache.one_token_back(*s2)
    assert view.length == early.length
    for i in early.keys:
        assert torch.equal(view.keys[i], early.keys[i])
    for i in early.ssm:
        assert torch.equal(view.ssm[i], early.ssm[i])


def test_bf16_model_runs_and_keeps_router_in_fp32(rng):
    from tests.conftest import random_model
    model = random_model(preset("tiny")).to_dtype(torch.bfloat16)
    layer = model.config.hybrid_override_pattern.index("E")
    assert model.context_tower.layers[layer].mixer.gate.weight.dtype == torch.float32
    ids = torch.randint(4, model.config.vocab_size, (1, 6), generator=rng)
    cache = model.new_cache(1)
    logits = model.context_logits(ids, cache)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert all(s.dtype == torch.float32 for s in cache.ssm.values())
