"""Parity on two devices: the denoiser is handed the context tower's cache on its own device,
never on the context tower's (an engine would read the other GPU's addresses as garbage)."""

import torch

from trt_twotower.runtime.parity import Backend, compare_steps
from trt_twotower.runtime.torch_executor import TorchContextExecutor, TorchDenoiserExecutor

OTHER_DEVICE = torch.device("meta")  # stands in for a second GPU on this GPU-less machine


class DenoiserOnAnotherDevice:
    """Claims ``OTHER_DEVICE``, refuses a cache elsewhere (as the TensorRT executor does), and
    computes on a CPU copy of what it was given."""

    def __init__(self, model):
        self.inner, self.device, self.seen = TorchDenoiserExecutor(model), OTHER_DEVICE, []

    def _check(self, cache, source):
        self.seen.append(cache.device)
        assert cache.device == OTHER_DEVICE, f"the denoiser got a cache on {cache.device}"
        return source.to("cpu")

    def denoiser_step(self, block_ids, t, cache):
        return self.inner.denoiser_step(block_ids, t, self._check(cache, self.source))

    def mock_ar_step(self, token_ids, cache):
        return self.inner.mock_ar_step(token_ids, self._check(cache, self.source))


def test_the_denoiser_reads_a_copy_of_the_cache_on_its_own_device(tiny_model, monkeypatch):
    from trt_twotower.runtime import cache as cache_module

    denoiser = DenoiserOnAnotherDevice(tiny_model)
    original_to = cache_module.StepCache.to

    def to(self, device):
        """Meta tensors hold no values: keep the CPU original beside the moved copy."""
        moved = original_to(self, device)
        denoiser.source = self
        return moved
    monkeypatch.setattr(cache_module.StepCache, "to", to)
    reference = Backend(TorchContextExecutor(tiny_model), TorchDenoiserExecutor(tiny_model))
    candidate = Backend(TorchContextExecutor(tiny_model), denoiser)
    rows = compare_steps(reference, candidate, tiny_model.config, 64, block_size=8,
                         prefill_lengths=(3,))
    assert all(r.passed for r in rows)
    assert len(denoiser.seen) == 6 and set(denoiser.seen) == {OTHER_DEVICE}
