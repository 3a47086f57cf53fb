"""A cache delta carries exactly the new positions and the Mamba states, and refuses to be
applied to a copy it does not continue."""

import copy

import numpy as np
import pytest
import torch

from trt_twotower.runtime.cache import StepCache
from trt_twotower.runtime.cache_delta import DeltaError, apply_delta, pack_delta
from trt_twotower.runtime.torch_executor import TorchContextExecutor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copies_kept_by_deltas_equal_the_cache(tiny_model, rng, dtype):
    config = tiny_model.config
    model = copy.deepcopy(tiny_model).to_dtype(dtype)
    executor = TorchContextExecutor(model)
    cache = StepCache.allocate(config, 1, 40, dtype)
    mirror = StepCache.allocate(config, 1, 40, dtype)
    sizes = []
    for n in (7, 4, 1):
        old = int(cache.lengths[0])
        executor.context_step(torch.randint(4, config.vocab_size, (1, n), generator=rng), cache)
        delta = pack_delta(cache, 0, old)
        apply_delta(mirror, 0, delta)
        sizes.append(delta.size)
        for name, tensor in cache.tensors.items():
            assert torch.equal(mirror.tensors[name], tensor), name
        assert int(mirror.lengths[0]) == int(cache.lengths[0])
    per_token = (sizes[0] - sizes[1]) / 3  # 7 vs 4 new positions, same Mamba states
    assert sizes[1] - sizes[2] == 3 * per_token > 0


def test_a_delta_that_does_not_continue_the_copy_is_refused(tiny_model, rng):
    config = tiny_model.config
    cache, copy = (StepCache.allocate(config, 1, 40, torch.float32) for _ in range(2))
    executor = TorchContextExecutor(tiny_model)
    executor.context_step(torch.randint(4, 100, (1, 5), generator=rng), cache)
    first = pack_delta(cache, 0, 0)
    executor.context_step(torch.randint(4, 100, (1, 3), generator=rng), cache)
    second = pack_delta(cache, 0, 5)
    with pytest.raises(DeltaError, match=r"\[5, 8\) but the copy holds 0"):
        apply_delta(copy, 0, second)
    with pytest.raises(DeltaError, match="past its tensors"):
        apply_delta(copy, 0, np.concatenate([first, np.zeros(3, np.uint8)]))
    with pytest.raises(DeltaError, match="short of its tensors"):
        apply_delta(copy, 0, first[:-8])
    with pytest.raises(DeltaError, match="uint8"):
        apply_delta(copy, 0, np.zeros(4, np.int64))
    apply_delta(copy, 0, first)  # nothing above changed the copy's length
    assert int(copy.lengths[0]) == 5
