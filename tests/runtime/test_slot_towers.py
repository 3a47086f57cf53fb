"""The towers' memory of each row's last step (``FROM_TOWER``): an AR row pushes the token
sampled for it, and a diffusion row goes on from the block its last step left, without the loop
sending either back; a call that does not follow the row's last one is an error, never a wrong
token."""

import pytest
import torch

from trt_twotower.policy import GenerationError, GenerationSettings
from trt_twotower.runtime.slot_towers import ContextSlots, DenoiserSlots
from trt_twotower.runtime.torch_executor import TorchContextExecutor, TorchDenoiserExecutor
from trt_twotower.runtime.tower_work import FROM_TOWER, Sample

AR = GenerationSettings(mode="ar", max_new_tokens=16, stop_at_eos=False)


def _slots(model, tower=ContextSlots, executor=TorchContextExecutor):
    slots = tower(executor(model), model.config, 4, 32, torch.float32)
    for slot in range(4):
        slots.empty(slot)
    return slots


def test_a_row_pushing_its_own_token_equals_the_loop_sending_it(tiny_model):
    own, sent = _slots(tiny_model), _slots(tiny_model)
    for slots in (own, sent):
        first, _, _ = slots.extend([1], torch.tensor([[5, 6, 7]]), [Sample(AR, 0)])
    ids = own.extend([1], torch.tensor([[FROM_TOWER]]), [Sample(AR, 1, chain=3)])[0]
    expected = sent.extend([1], torch.tensor([[first[0][0]]]), [Sample(AR, 1, chain=3)])[0]
    assert ids == expected and len(ids[0]) == 3


def test_a_call_out_of_step_or_without_a_sample_is_refused(tiny_model):
    slots = _slots(tiny_model)
    with pytest.raises(GenerationError, match="none was"):
        slots.extend([0], torch.tensor([[FROM_TOWER]]), [Sample(AR, 0)])
    slots.extend([0], torch.tensor([[5, 6]]), [Sample(AR, 0, chain=2)])
    with pytest.raises(GenerationError, match="asks for step 5 but its last sample left "
                                              "step 2: calls out of order"):
        slots.extend([0], torch.tensor([[FROM_TOWER]]), [Sample(AR, 5)])
    with pytest.raises(GenerationError, match="only one-token steps"):
        slots.extend([0], torch.tensor([[FROM_TOWER, 5]]), [Sample(AR, 2)])


def test_a_row_that_stopped_at_eos_takes_no_step_while_the_others_do(tiny_model):
    import dataclasses

    probe = _slots(tiny_model)
    drawn = probe.extend([0], torch.tensor([[5, 6]]), [Sample(AR, 0)])[0][0][0]
    config = dataclasses.replace(tiny_model.config, eos_token_id=drawn)
    slots = ContextSlots(TorchContextExecutor(tiny_model), config, 4, 32, torch.float32)
    stop = dataclasses.replace(AR, stop_at_eos=True)
    slots.empty(0), slots.empty(1)
    slots.extend([0, 1], torch.tensor([[5, 6], [7, 8]]), [Sample(stop, 0), Sample(AR, 0)])
    length = int(slots.pool.lengths[0])
    tokens, _, before = slots.extend([0, 1], torch.tensor([[FROM_TOWER], [FROM_TOWER]]),
                                     [Sample(stop, 1, chain=2), Sample(AR, 1, chain=2)])
    assert tokens[0] == [] and before[0] == length == int(slots.pool.lengths[0])
    assert len(tokens[1]) == 2


def test_rows_on_scattered_slots_chain_as_rows_side_by_side(tiny_model):
    """Scattered rows are gathered once per call and written back when the chaining set
    changes and at the end: two calls in a row (the second reads what the first wrote
    back), with rows leaving the chain at different steps, equal the same rows on
    consecutive slots."""
    prompts = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]])

    def run(slot_ids):
        slots = _slots(tiny_model)
        taken = []
        slots.extend(slot_ids, prompts, [Sample(AR, 0)] * 3)
        keys = [1, 1, 1]
        for counts in ([3, 1, 2], [1, 3, 2]):
            chains = [Sample(AR, k, chain=c) for k, c in zip(keys, counts)]
            taken.append(slots.extend(slot_ids, torch.full((3, 1), FROM_TOWER), chains)[0])
            keys = [k + c for k, c in zip(keys, counts)]
        return taken, [int(slots.pool.lengths[s]) for s in slot_ids]
    side_by_side, scattered = run([0, 1, 2]), run([3, 0, 2])
    assert scattered == side_by_side
    assert [len(t) for t in side_by_side[0][0]] == [3, 1, 2]


def test_rows_with_an_idle_slot_between_them_step_as_one_span(tiny_model):
    """Four rows with one idle row between them (a row full to the last position, as a
    finished one is) step as one view of the pool: the stepping rows chain the same tokens
    and reach the same caches as on consecutive slots, and the idle row's caches and length
    are exactly as before. Once rows leave the chain, the two idle rows between the rest
    are too many for a span of three: those are copied out and back."""
    prompts = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13], [14, 15, 16]])
    max_context = 12

    def run(slot_ids, idle=None):
        slots = ContextSlots(TorchContextExecutor(tiny_model), tiny_model.config, 6,
                             max_context, torch.float32)
        for slot in range(6):
            slots.empty(slot)
        if idle is not None:  # a row filled to max_context, not stepping in these calls
            slots.extend([idle], torch.arange(20, 20 + max_context)[None], [None])
        kept = {n: t[idle].clone() for n, t in slots.pool.tensors.items()} if idle else {}
        views = []
        step = slots.executor.context_step

        def watched(ids, cache):
            pool = slots.pool.lengths
            views.append((cache.batch, pool.data_ptr() <= cache.lengths.data_ptr()
                          < pool.data_ptr() + pool.nbytes))
            return step(ids, cache)
        slots.executor.context_step = watched
        taken = [slots.extend(slot_ids, prompts, [Sample(AR, 0)] * 4)[0]]
        chains = [Sample(AR, 1, chain=c) for c in (3, 1, 2, 3)]
        taken.append(slots.extend(slot_ids, torch.full((4, 1), FROM_TOWER), chains)[0])
        caches = {n: t[slot_ids] for n, t in slots.pool.tensors.items()}
        if idle is not None:
            assert int(slots.pool.lengths[idle]) == max_context
            for name, before in kept.items():
                assert torch.equal(slots.pool.tensors[name][idle], before), name
        return taken, caches, views
    side_by_side, caches, _ = run([0, 1, 2, 3])
    spanned, spanned_caches, views = run([1, 2, 4, 5], idle=3)
    assert spanned == side_by_side
    assert views == [(5, True), (5, True), (3, False), (2, False)]
    # atol: the float32 drift of a larger batch, as measured in test_torch_executor.py
    for name, cache in caches.items():
        torch.testing.assert_close(spanned_caches[name], cache, atol=1e-4, rtol=0)


def test_rows_side_by_side_in_the_pool_step_as_a_view_in_any_order(tiny_model):
    """A group that names adjacent slots out of order steps in slot order, on the pool itself
    (no copy), and each row still gets its own tokens."""
    def run(slot_ids):
        slots = _slots(tiny_model)
        views = []
        step = slots.executor.context_step

        def watched(ids, cache):
            views.append(cache.lengths.data_ptr() ==
                         slots.pool.lengths[min(slot_ids):].data_ptr())
            return step(ids, cache)
        slots.executor.context_step = watched
        prompts = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]])
        first = slots.extend(slot_ids, prompts, [Sample(AR, 0)] * 3)[0]
        then = slots.extend(slot_ids, torch.full((3, 1), FROM_TOWER),
                            [Sample(AR, 1, chain=2)] * 3)[0]
        return first, then, views
    in_order, reversed_order = run([0, 1, 2]), run([2, 1, 0])
    assert reversed_order[:2] == in_order[:2]
    assert all(reversed_order[2]) and len(reversed_order[2]) == 3


def test_a_block_going_on_in_the_tower_equals_the_loop_sending_it_back(tiny_model):
    """The denoiser's memory of each row's last step (``FROM_TOWER`` blocks): a step written
    before the last one's answer equals the loop sending that answer back with the next step
    key and one step fewer; a row whose block resolved there takes no step and gets
    FROM_TOWER back, beside a row that steps; a slot the denoiser never stepped is refused."""
    mask, s = tiny_model.config.mask_token_id, 4
    settings = [GenerationSettings(block_size=s, steps_per_block=4, temperature=0.9, seed=3,
                                   confidence_threshold=0.5),
                GenerationSettings(block_size=s, steps_per_block=4, forced_commits=4, seed=4)]
    start = torch.full((2, s), mask)
    own, sent = (_slots(tiny_model, DenoiserSlots, TorchDenoiserExecutor) for _ in range(2))
    first = own.denoise([0, 2], start, settings, [8, 8], [4, 4])
    assert torch.equal(first, sent.denoise([0, 2], start, settings, [8, 8], [4, 4]))
    assert (first[0] == mask).any() and not (first[1] == mask).any()  # row 2 resolved
    going_on = own.denoise([0, 2], torch.full((2, s), FROM_TOWER), settings,
                           [FROM_TOWER] * 2, [FROM_TOWER] * 2)
    expected = sent.denoise([0], first[:1], settings[:1], [9], [3])
    assert torch.equal(going_on[0], expected[0])
    assert (going_on[1] == FROM_TOWER).all()
    with pytest.raises(GenerationError, match="never stepped"):
        own.denoise([1], torch.full((1, s), FROM_TOWER), settings[:1], [FROM_TOWER],
                    [FROM_TOWER])
