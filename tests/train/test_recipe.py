"""The training recipe at toy scale: both stages learn, the context tower stays frozen in
stage (b), and the checkpoint it writes loads and generates."""

import torch

from trt_twotower.policy import GenerationSettings
from trt_twotower.reference import generate
from trt_twotower.reference.init import initialise
from trt_twotower.reference.loading import load_model
from trt_twotower.reference.model import TwoTowerModel
from trt_twotower.tokenizer import MASK_ID
from trt_twotower.train.ar import train_ar
from trt_twotower.train.diffusion import (diffusion_loss, initialise_denoiser_from_backbone,
                                          mask_block, train_denoiser)
from trt_twotower.train.recipe import TOY_CONFIG, run_recipe


def _stream(n=4000, seed=0):
    """A learnable stream: a short repeating pattern with some noise tokens."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.arange(10, 30).repeat(n // 20)
    noise = torch.rand(len(base), generator=gen) < 0.05
    return torch.where(noise, torch.randint(4, 1000, base.shape, generator=gen), base)


def test_both_stages_learn_and_the_context_tower_stays_frozen():
    torch.manual_seed(0)
    model = initialise(TwoTowerModel(TOY_CONFIG), 0).train()
    stream = _stream()
    ar = train_ar(model, stream, steps=30, batch=4, length=24, lr=1e-2, seed=0, progress=False)
    assert sum(ar[-5:]) / 5 < ar[0] - 1.0
    initialise_denoiser_from_backbone(model)
    frozen = {n: t.clone() for n, t in model.state_dict().items()
              if n.startswith(("context_tower.", "context_lm_head."))}
    gen = torch.Generator().manual_seed(5)
    windows = torch.stack([stream[i:i + 24] for i in (0, 7, 13, 40)])
    with torch.no_grad():
        before = float(diffusion_loss(model, windows, 12, 8, gen))
    train_denoiser(model, stream, steps=30, batch=4, window=24, block=8, lr=1e-2, seed=1,
                   progress=False)
    with torch.no_grad():
        after = float(diffusion_loss(model, windows, 12, 8, torch.Generator().manual_seed(5)))
    assert after < before
    for name, tensor in frozen.items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_masking_covers_every_ratio_and_never_an_empty_mask():
    gen = torch.Generator().manual_seed(0)
    block = torch.randint(4, 1000, (2000, 16), generator=gen)
    noisy, mask = mask_block(block, MASK_ID, gen)
    assert mask.any(-1).all()
    assert torch.equal(noisy[mask], torch.full((int(mask.sum()),), MASK_ID))
    assert torch.equal(noisy[~mask], block[~mask])
    fractions = mask.float().mean(-1)
    assert fractions.min() <= 0.1 and fractions.max() == 1.0


def test_toy_recipe_writes_a_checkpoint_that_generates(tmp_path):
    result = run_recipe(tmp_path, "toy", seed=0, progress=False)
    assert all(torch.isfinite(torch.tensor(result["ar_losses"] + result["denoiser_losses"])))
    model = load_model(tmp_path)
    out = generate(model, torch.tensor([[5, 6, 7]]),
                   GenerationSettings(max_new_tokens=16, block_size=8, steps_per_block=8))
    assert 0 < len(out.tokens[0]) <= 16 and (tmp_path / "tokenizer.json").is_file()
    # stored in bf16 (router in fp32, as the spec keeps it), computed in float32
    from trt_twotower.checkpoint import CheckpointReader
    from trt_twotower.reference.model import FP32_PARAMETERS
    assert model.dtype == torch.float32
    assert CheckpointReader(tmp_path).config.torch_dtype == "float32"
    raw = _stored_dtypes(tmp_path / "model.safetensors")
    assert {d for n, d in raw.items() if n.endswith(FP32_PARAMETERS)} == {"F32"}
    assert {d for n, d in raw.items() if not n.endswith(FP32_PARAMETERS)} == {"BF16"}


def _stored_dtypes(path):
    import json
    import struct
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return {n: v["dtype"] for n, v in header.items() if n != "__metadata__"}
