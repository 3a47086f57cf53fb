"""The reference executor runs rows of different cache lengths in one batch (as the step graphs
do): each row's logits and new cache entries must equal that row run alone through the
reference model, with its own unpadded cache (an independent computation: no StepCache, no
padding, no mask). Random prompts of different lengths.

Tolerance 1e-4 (float32 logits), from measured drift: over 30 random trials, rows batched with
the *same* length (no padding, the executor's old path) already differ from the row alone by
up to 3.9e-5 (denoiser logits; batch size changes the matmul blocking); ragged rows by up to
2.8e-5 (denoiser), 4.8e-6 (context), 5.6e-6 (mock-AR)."""

import torch

from trt_twotower import names
from trt_twotower.runtime.cache import StepCache
from trt_twotower.runtime.slot_towers import gather, scatter
from trt_twotower.runtime.torch_executor import TorchContextExecutor, TorchDenoiserExecutor

MAX_CONTEXT = 48
PROMPT_LENGTHS = (3, 11, 7, 1)
ATOL = 1e-4


def _prompts(model, rng):
    return [torch.randint(4, model.config.vocab_size, (1, n), generator=rng)
            for n in PROMPT_LENGTHS]


def _pool(model, prompts) -> StepCache:
    """Each row prefilled on its own (one row: the plain path), so the rows differ in
    length."""
    executor = TorchContextExecutor(model)
    pool = StepCache.allocate(model.config, len(prompts), MAX_CONTEXT, torch.float32)
    for slot, prompt in enumerate(prompts):
        rows = gather(pool, [slot])
        executor.context_step(prompt, rows)
        scatter(pool, [slot], rows)
    assert len(set(pool.lengths.tolist())) == len(prompts)
    return pool


def _counting(monkeypatch, model, name):
    """Count the model's forwards of one kind: rows of different lengths take one."""
    calls, forward = [], getattr(model, name)

    def counted(*args):
        calls.append(args[0].shape[0])
        return forward(*args)
    monkeypatch.setattr(model, name, counted)
    return calls


def _alone(model, prompt):
    """The reference's own cache after the prompt, and its last logits."""
    cache = model.new_cache(1)
    logits = model.context_step(prompt, cache)
    return cache, logits


@torch.no_grad()
def test_context_rows_of_different_lengths_step_together_as_each_alone(tiny_model, rng,
                                                                        monkeypatch):
    prompts = _prompts(tiny_model, rng)
    pool = _pool(tiny_model, prompts)
    before = pool.lengths.clone()
    new = torch.randint(4, tiny_model.config.vocab_size, (len(prompts), 3), generator=rng)
    calls = _counting(monkeypatch, tiny_model, "context_step")
    logits = TorchContextExecutor(tiny_model).context_step(new, pool)
    monkeypatch.undo()
    assert calls == [len(prompts)], "rows of different lengths must share one forward"
    assert torch.equal(pool.lengths, before + 3)
    for row, prompt in enumerate(prompts):
        cache, _ = _alone(tiny_model, prompt)
        expected = tiny_model.context_step(new[row:row + 1], cache)
        torch.testing.assert_close(logits[row:row + 1], expected, atol=ATOL, rtol=0)
        length = int(pool.lengths[row])
        for i in tiny_model.config.attention_layers:
            torch.testing.assert_close(pool.tensors[names.past_key(i)][row, :, :length],
                                       cache.keys[i][0], atol=ATOL, rtol=0)
            torch.testing.assert_close(pool.tensors[names.past_value(i)][row, :, :length],
                                       cache.values[i][0], atol=ATOL, rtol=0)
        for i in tiny_model.config.mamba_layers:
            torch.testing.assert_close(pool.tensors[names.ssm_state(i)][row], cache.ssm[i][0],
                                       atol=ATOL, rtol=0)


@torch.no_grad()
def test_denoiser_and_mock_ar_rows_of_different_lengths_read_each_own_context(tiny_model,
                                                                              rng,
                                                                              monkeypatch):
    prompts = _prompts(tiny_model, rng)
    pool = _pool(tiny_model, prompts)
    c = tiny_model.config
    blocks = torch.randint(4, c.vocab_size, (len(prompts), 8), generator=rng)
    blocks[:, ::3] = c.mask_token_id
    t = (blocks == c.mask_token_id).float().mean(-1)
    executor = TorchDenoiserExecutor(tiny_model)
    latest = torch.randint(4, c.vocab_size, (len(prompts), 1), generator=rng)
    steps = _counting(monkeypatch, tiny_model, "denoiser_step")
    mocks = _counting(monkeypatch, tiny_model, "mock_ar_step")
    logits = executor.denoiser_step(blocks, t, pool)
    mock = executor.mock_ar_step(latest, pool)
    monkeypatch.undo()
    assert steps == mocks == [len(prompts)], "rows of different lengths share one forward"
    for row, prompt in enumerate(prompts):
        cache, _ = _alone(tiny_model, prompt)
        expected = tiny_model.denoiser_step(blocks[row:row + 1], t[row:row + 1], cache)
        torch.testing.assert_close(logits[row:row + 1], expected, atol=ATOL, rtol=0)
        expected_mock = tiny_model.mock_ar_step(latest[row:row + 1], cache)
        torch.testing.assert_close(mock[row:row + 1], expected_mock, atol=ATOL, rtol=0)
