"""Time conditioning numerics (spec §4.1)."""

import torch

from trt_twotower.reference.timestep import sinusoid


def test_bf16_timestep_product_rounds_like_the_released_model():
    """t = 15/16 in bf16 times 1000 gives 936, not 937.5 (the product happens in bf16)."""
    t = torch.tensor([15 / 16], dtype=torch.bfloat16)
    features = sinusoid(t).float()
    assert torch.allclose(features[0, 0], torch.cos(torch.tensor(936.0)).bfloat16().float())
    assert features.shape == (1, 256)


def test_sinusoid_is_cos_then_sin():
    t = torch.tensor([0.3])
    f = sinusoid(t)
    assert torch.allclose(f[0, 0], torch.cos(torch.tensor(300.0)))
    assert torch.allclose(f[0, 128], torch.sin(torch.tensor(300.0)))
