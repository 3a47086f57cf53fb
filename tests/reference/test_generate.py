"""The three generation modes over the reference (spec §5)."""

import pytest
import torch

from trt_twotower.policy import GenerationError, GenerationSettings
from trt_twotower.reference import generate


def _prompt(model, rng, batch=2, length=5):
    return torch.randint(4, model.config.vocab_size, (batch, length), generator=rng)


def test_diffusion_blocks_hold_no_mask_and_count_evaluations(tiny_model, rng):
    s = GenerationSettings(max_new_tokens=16, block_size=8, steps_per_block=4,
                           confidence_threshold=1.0, stop_at_eos=False)
    r = generate(tiny_model, _prompt(tiny_model, rng), s)
    for row in r.tokens:
        assert len(row) == 16 and tiny_model.config.mask_token_id not in row
    # γ = 1 commits the minimum ceil(n / steps left): 2 per step, 4 evaluations per block.
    assert r.denoiser_evals == [8, 8]
    assert all(c == [2, 2] for c in r.committed_per_eval)


def test_diffusion_with_one_step_per_block_commits_everything_at_once(tiny_model, rng):
    s = GenerationSettings(max_new_tokens=16, block_size=8, steps_per_block=1, stop_at_eos=False)
    r = generate(tiny_model, _prompt(tiny_model, rng), s)
    assert r.denoiser_evals == [2, 2] and r.context_steps == 2  # no extension after the last


def test_one_token_prompt_works_in_every_mode(tiny_model, rng):
    for mode in ("diffusion", "mock-ar", "ar"):
        s = GenerationSettings(mode=mode, max_new_tokens=8, block_size=4, steps_per_block=4,
                               stop_at_eos=False)
        r = generate(tiny_model, _prompt(tiny_model, rng, length=1), s)
        assert [len(t) for t in r.tokens] == [8, 8]


def test_eos_stops_the_row_that_produced_it(tiny_model, rng):
    """Declare a token that row 0 generates early to be EOS: row 0 stops right after it,
    row 1 (which does not produce it then) goes on."""
    prompts = _prompt(tiny_model, rng)
    for mode in ("ar", "mock-ar", "diffusion"):
        s = GenerationSettings(mode=mode, max_new_tokens=8, block_size=4, steps_per_block=4,
                               stop_at_eos=False)
        free = generate(tiny_model, prompts, s).tokens
        eos = free[0][2]
        stopped = generate(tiny_model, prompts, GenerationSettings(
            mode=mode, max_new_tokens=8, block_size=4, steps_per_block=4), eos_token_id=eos)
        first = free[0].index(eos)
        assert stopped.tokens[0] == free[0][:first + 1], mode
        if eos not in free[1]:
            assert stopped.tokens[1] == free[1], mode


def test_batched_generation_equals_each_row_alone(tiny_model, rng):
    prompts = _prompt(tiny_model, rng, batch=3)
    for mode in ("diffusion", "mock-ar", "ar"):
        s = GenerationSettings(mode=mode, max_new_tokens=8, block_size=4, steps_per_block=4,
                               temperature=0.7, stop_at_eos=False)
        together = generate(tiny_model, prompts, s, seeds=[1, 2, 3])
        for row in range(3):
            alone = generate(tiny_model, prompts[row:row + 1], s, seeds=[row + 1])
            assert together.tokens[row] == alone.tokens[0], mode


def test_bad_prompts_are_rejected(tiny_model):
    s = GenerationSettings(mode="ar", max_new_tokens=4)
    with pytest.raises(GenerationError, match="shape"):
        generate(tiny_model, torch.zeros(1, 0, dtype=torch.long), s)
    with pytest.raises(GenerationError, match="prompt ids"):
        generate(tiny_model, torch.tensor([[tiny_model.config.vocab_size]]), s)
