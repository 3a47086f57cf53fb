"""The denoiser's block forward (spec §4): bidirectional inside the block, the prefix visible
only through the context caches, conditioned on the seeded Mamba states and the timestep."""

import torch

TOL = 1e-6


def _setup(model, rng, prefix=6, block=8, batch=2):
    v = model.config.vocab_size
    ctx = torch.randint(4, v, (batch, prefix), generator=rng)
    blk = torch.randint(4, v, (batch, block), generator=rng)
    cache = model.new_cache(batch)
    model.context_step(ctx, cache)
    return ctx, blk, cache


def test_block_tokens_see_each_other_in_both_directions(tiny_model, rng):
    _, blk, cache = _setup(tiny_model, rng)
    t = torch.full((2,), 0.5)
    base = tiny_model.denoiser_step(blk, t, cache)
    changed = blk.clone()
    changed[:, -1] = (changed[:, -1] + 1) % tiny_model.config.vocab_size
    out = tiny_model.denoiser_step(changed, t, cache)
    # The first position changes although only the last token did: attention is bidirectional.
    assert (out[:, 0] - base[:, 0]).abs().max() > 1e-4


def test_prefix_is_visible_through_context_caches(tiny_model, rng):
    ctx, blk, cache = _setup(tiny_model, rng)
    other = ctx.clone()
    other[:, 0] = (other[:, 0] + 1) % tiny_model.config.vocab_size
    other_cache = tiny_model.new_cache(2)
    tiny_model.context_step(other, other_cache)
    t = torch.full((2,), 0.75)
    a = tiny_model.denoiser_step(blk, t, cache)
    b = tiny_model.denoiser_step(blk, t, other_cache)
    assert (a - b).abs().max() > 1e-4


def test_context_cache_is_read_only(tiny_model, rng):
    _, blk, cache = _setup(tiny_model, rng)
    before = cache.clone()
    tiny_model.denoiser_step(blk, torch.full((2,), 1.0), cache)
    assert cache.length == before.length
    for i in cache.keys:
        assert torch.equal(cache.keys[i], before.keys[i])
    for i in cache.ssm:
        assert torch.equal(cache.ssm[i], before.ssm[i]) and torch.equal(cache.conv[i],
                                                                       before.conv[i])


def test_seeded_mamba_state_changes_output(tiny_model, rng):
    _, blk, cache = _setup(tiny_model, rng)
    t = torch.full((2,), 0.5)
    base = tiny_model.denoiser_step(blk, t, cache)
    layer = tiny_model.config.mamba_layers[0]
    cache.ssm[layer] = cache.ssm[layer] + 0.5 * torch.randn(cache.ssm[layer].shape, generator=rng)
    assert (tiny_model.denoiser_step(blk, t, cache) - base).abs().max() > 1e-4


def test_timestep_changes_output(tiny_model, rng):
    _, blk, cache = _setup(tiny_model, rng)
    a = tiny_model.denoiser_step(blk, torch.full((2,), 1.0), cache)
    b = tiny_model.denoiser_step(blk, torch.full((2,), 0.25), cache)
    assert (a - b).abs().max() > 1e-4


def test_rows_are_independent_with_their_own_timestep(tiny_model, rng):
    """A row's logits depend only on its own block, caches and t (batch invariance)."""
    _, blk, cache = _setup(tiny_model, rng)
    t = torch.tensor([1.0, 0.25])
    both = tiny_model.denoiser_step(blk, t, cache)
    alone = tiny_model.denoiser_step(blk[1:], t[1:], cache.select_rows([1]))
    assert float((both[1:] - alone).abs().max() / alone.abs().max()) < 1e-5


def test_empty_prefix_block_matches_no_context(tiny_model, rng):
    """A zero-length context (fresh cache) is a legal denoiser input."""
    blk = torch.randint(4, tiny_model.config.vocab_size, (1, 8), generator=rng)
    logits = tiny_model.denoiser_step(blk, torch.ones(1), tiny_model.new_cache(1))
    assert logits.shape == (1, 8, tiny_model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_mock_ar_step_uses_denoiser_weights_without_time_conditioning(tiny_model, rng):
    """Mock-AR's step is the plain denoiser tower: time tables have no effect on it."""
    ctx, _, _ = _setup(tiny_model, rng)
    cache = tiny_model.new_cache(2)
    tiny_model.context_step(ctx[:, :-1], cache)
    s2 = cache.mamba_states()
    tiny_model.context_step(ctx[:, -1:], cache)
    before = tiny_model.mock_ar_step(ctx[:, -1:], cache.one_token_back(*s2))
    saved = [t.detach().clone() for t in tiny_model.scale_shift_tables]
    for t in tiny_model.scale_shift_tables:
        t.data.add_(1.0)
    try:
        after = tiny_model.mock_ar_step(ctx[:, -1:], cache.one_token_back(*s2))
    finally:
        for t, s in zip(tiny_model.scale_shift_tables, saved):
            t.data.copy_(s)
    assert torch.equal(before, after)
    # ... and it is not the context tower's prediction.
    ar = tiny_model.context_step(ctx[:, -1:], cache.one_token_back(*s2))
    assert (ar - before).abs().max() > 1e-4
