"""The decoding policy (spec §5.1 commit rule; token sampling)."""

import math

import pytest
import torch

from trt_twotower import policy
from trt_twotower.policy import GenerationError, GenerationSettings

MASK = 3


def _step(conf, block=None, threshold=0.9, steps_left=4, pred=None):
    conf = torch.tensor(conf, dtype=torch.float32)[None]
    block = torch.full(conf.shape, MASK) if block is None else torch.tensor(block)[None]
    pred = torch.arange(10, 10 + conf.shape[1])[None] if pred is None else pred
    nxt, c = policy.commit_step(block, pred, conf, MASK, threshold, steps_left)
    return nxt[0].tolist(), c[0]


def test_threshold_one_commits_only_the_minimum():
    # 8 masked, 4 steps left: ceil(8/4) = 2 commits, the two most confident.
    nxt, _ = _step([0.9, 0.2, 0.99, 0.5, 0.1, 0.3, 0.4, 0.6], threshold=1.0, steps_left=4)
    assert nxt == [10, MASK, 12, MASK, MASK, MASK, MASK, MASK]


def test_everything_above_threshold_commits_strictly():
    nxt, _ = _step([0.95, 0.9, 0.91, 0.1], threshold=0.9, steps_left=4)
    assert nxt == [10, MASK, 12, MASK]  # 0.9 is not > 0.9


def test_no_confident_position_still_commits_one():
    nxt, _ = _step([0.1, 0.2, 0.15], threshold=0.9, steps_left=16)
    assert nxt == [MASK, 11, MASK]


def test_last_step_commits_the_rest_and_no_mask_leaves():
    nxt, _ = _step([0.1, 0.2, 0.15, 0.3], threshold=0.99, steps_left=1)
    assert MASK not in nxt


def test_committed_tokens_are_never_revised_and_report_infinite_confidence():
    block = [7, MASK, 8, MASK]
    nxt, conf = _step([0.99, 0.5, 0.99, 0.6], block=block, steps_left=2)
    assert nxt[0] == 7 and nxt[2] == 8
    assert math.isinf(conf[0]) and math.isinf(conf[2])
    assert nxt == [7, MASK, 8, 13]  # 2 masked, 2 steps left: commit 1, the more confident


def test_ties_commit_the_earlier_position_first():
    nxt, _ = _step([0.5, 0.5, 0.5, 0.5], threshold=1.0, steps_left=2)
    assert nxt == [10, 11, MASK, MASK]


def test_rows_follow_their_own_counts():
    conf = torch.tensor([[0.95, 0.96, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]])
    block = torch.full((2, 4), MASK)
    nxt, _ = policy.commit_step(block, torch.ones_like(block) * 9, conf, MASK, 0.9, 4)
    assert (nxt == 9).sum(-1).tolist() == [2, 1]


def test_predictions_never_choose_the_mask_token():
    logits = torch.zeros(1, 2, 10)
    logits[..., MASK] = 100.0
    pred, conf = policy.diffusion_predictions(logits, MASK)
    assert (pred != MASK).all()
    assert torch.allclose(conf, torch.full_like(conf, 1 / 9))


def test_sampling_is_a_function_of_seed_and_step_only():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    seeds = torch.tensor([5, 6, 5])
    a = policy.sample_tokens(logits, 1.0, seeds=seeds, step_key=4)
    b = policy.sample_tokens(logits[2:], 1.0, seeds=seeds[2:], step_key=4)
    assert a[2] == b[0]  # same seed, same logits, other batch → same token
    draws = {int(policy.sample_tokens(logits[:1], 1.0, seeds=torch.tensor([s]), step_key=0))
             for s in range(40)}
    assert len(draws) > 5  # and it does sample


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    picks = [int(policy.sample_tokens(logits, 1.0, seeds=torch.tensor([s]), step_key=0))
             for s in range(2000)]
    freq = [picks.count(i) / len(picks) for i in range(3)]
    assert abs(freq[0] - 0.7) < 0.04 and abs(freq[2] - 0.1) < 0.03


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    for s in range(200):
        seeds = torch.tensor([s])
        assert int(policy.sample_tokens(logits, 1.0, top_k=2, seeds=seeds)) in (0, 1)
        assert int(policy.sample_tokens(logits, 1.0, top_p=0.7, seeds=seeds)) in (0, 1)


def test_counter_uniform_lies_strictly_inside_unit_interval():
    u = policy.counter_uniform(torch.tensor([0, 2**31 - 1]), 123, (4, 1000))
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01


@pytest.mark.parametrize("kwargs,needle", [
    (dict(block_size=0), "block_size"),
    (dict(steps_per_block=0), "steps_per_block"),
    (dict(confidence_threshold=1.5), "confidence_threshold"),
    (dict(confidence_threshold=-0.1), "confidence_threshold"),
    (dict(max_new_tokens=20, block_size=16), "multiple of block_size"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(mode="beam"), "unknown mode"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
])
def test_invalid_settings_are_rejected_with_a_clear_message(kwargs, needle):
    with pytest.raises(GenerationError, match=needle):
        GenerationSettings(**kwargs)


def test_ar_modes_accept_any_token_count():
    assert GenerationSettings(mode="ar", max_new_tokens=7).max_new_tokens == 7


def test_forced_commits_commit_exactly_k_whatever_the_confidence():
    nxt, _ = _step([0.99, 0.98, 0.97, 0.1, 0.2], threshold=0.5, steps_left=1)
    assert MASK not in nxt
    conf = torch.tensor([[0.99, 0.98, 0.97, 0.1, 0.2]])
    block = torch.full(conf.shape, MASK)
    for k in (1, 2, 4):
        nxt, _ = policy.commit_step(block, torch.ones_like(block), conf, MASK, 0.5, 1, forced=k)
        assert int((nxt != MASK).sum()) == k
