"""Checkpoint ⇄ reference model: names and shapes from the spec (§3), one tower group read at a
time, dtypes (router kept fp32) and devices per group."""

import pytest
import torch

from tests.conftest import random_model
from trt_twotower.checkpoint import CheckpointReader
from trt_twotower.config import preset
from trt_twotower.reference.loading import (
    TOWER_GROUPS, expected_shapes, load_model, make_random_checkpoint, save_model)
from trt_twotower.reference.model import FP32_PARAMETERS


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_random_checkpoint(preset("tiny"), tmp_path_factory.mktemp("ckpt"), seed=7)


def test_expected_shapes_follow_the_spec_names_at_full_width():
    """Spec §3 shapes at the released width, computed on meta (the slice preset has one layer
    of each kind at full width, so no memory is allocated and nothing is slow)."""
    config = preset("nano-30b-a3b-slice")
    shapes = expected_shapes(config)
    m, a, e = (config.hybrid_override_pattern.index(c) for c in "M*E")
    want = {
        "context_tower.embeddings.weight": (131072, 2688),
        "context_lm_head.weight": (131072, 2688),
        "lm_head.weight": (131072, 2688),
        f"denoiser_tower.layers.{m}.mixer.in_proj.weight": (10304, 2688),
        f"denoiser_tower.layers.{m}.mixer.conv1d.weight": (6144, 1, 4),
        f"denoiser_tower.layers.{m}.mixer.A_log": (64,),
        f"denoiser_tower.layers.{m}.mixer.norm.weight": (4096,),
        f"context_tower.layers.{a}.mixer.k_proj.weight": (256, 2688),
        f"context_tower.layers.{a}.mixer.o_proj.weight": (2688, 4096),
        f"context_tower.layers.{e}.mixer.gate.weight": (128, 2688),
        f"context_tower.layers.{e}.mixer.gate.e_score_correction_bias": (128,),
        f"context_tower.layers.{e}.mixer.experts.127.up_proj.weight": (1856, 2688),
        f"context_tower.layers.{e}.mixer.shared_experts.down_proj.weight": (2688, 3712),
        "context_tower.norm_f.weight": (2688,),
        "t_embedder.mlp.0.weight": (2688, 256),
        "t_embedder.mlp.2.bias": (2688,),
        "t_block.1.weight": (8064, 2688),
        f"scale_shift_tables.{config.num_hidden_layers - 1}": (3, 2688),
    }
    assert {name: shapes.get(name) for name in want} == want


def test_tower_groups_partition_the_state_dict(tiny_model):
    context = expected_shapes(tiny_model.config, ["context"])
    denoiser = expected_shapes(tiny_model.config, ["denoiser"])
    assert not set(context) & set(denoiser)
    assert set(context) | set(denoiser) == set(tiny_model.state_dict())
    assert all(n.startswith(TOWER_GROUPS["context"]) for n in context)
    assert "lm_head.weight" in denoiser and "context_lm_head.weight" in context


def test_load_reads_one_tower_group_before_the_next(checkpoint, monkeypatch):
    order = []
    real = CheckpointReader.read

    def spy(self, name, dtype=None):
        order.append(name)
        return real(self, name, dtype)

    monkeypatch.setattr(CheckpointReader, "read", spy)
    load_model(checkpoint)
    context = set(expected_shapes(preset("tiny"), ["context"]))
    first_denoiser = next(i for i, n in enumerate(order) if n not in context)
    assert set(order[:first_denoiser]) == context
    assert not context & set(order[first_denoiser:])
    assert len(order) == len(set(order))  # every tensor read exactly once


def test_denoiser_step_survives_the_round_trip(checkpoint, rng):
    """The context-logits round trip is in tests/test_checkpoint.py; this one covers the
    denoiser group (tower, lm_head, t_embedder, t_block, scale_shift_tables)."""
    loaded, original = load_model(checkpoint), random_model(preset("tiny"), seed=7)
    prefix = torch.randint(4, 1000, (2, 5), generator=rng)
    block = torch.randint(4, 1000, (2, 8), generator=rng)
    t = torch.tensor([0.5, 1.0])
    outputs = []
    for model in (loaded, original):
        cache = model.new_cache(2)
        model.context_step(prefix, cache)
        outputs.append(model.denoiser_step(block, t, cache))
    a, b = outputs
    assert float((a - b).abs().max() / b.abs().max()) < 1e-6  # same weights, fp32


def test_bf16_load_casts_everything_but_the_router(checkpoint):
    model = load_model(checkpoint, dtype=torch.bfloat16)
    tensors = dict([*model.named_parameters(), *model.named_buffers()])
    fp32 = {n for n, t in tensors.items() if t.dtype == torch.float32}
    assert fp32 == {n for n in tensors if n.endswith(FP32_PARAMETERS)}
    assert len(fp32) == 2 * 2 * preset("tiny").hybrid_override_pattern.count("E")
    assert all(t.dtype == torch.bfloat16 for n, t in tensors.items() if n not in fp32)


def test_default_dtype_is_the_config_torch_dtype(tmp_path):
    config = preset("tiny").replace(torch_dtype="bfloat16")
    make_random_checkpoint(config, tmp_path, seed=0)
    model = load_model(tmp_path)
    assert model.dtype == torch.bfloat16
    e = config.hybrid_override_pattern.index("E")
    assert model.denoiser_tower.layers[e].mixer.gate.e_score_correction_bias.dtype == torch.float32


def test_loaded_model_is_materialised_and_frozen(checkpoint):
    model = load_model(checkpoint)
    tensors = [*model.parameters(), *model.buffers()]
    assert not any(t.is_meta for t in tensors)
    assert not any(t.requires_grad for t in model.parameters())
    assert not model.training


def test_same_seed_gives_the_same_weights(tmp_path, checkpoint):
    make_random_checkpoint(preset("tiny"), tmp_path, seed=7)
    a, b = CheckpointReader(tmp_path), CheckpointReader(checkpoint)
    assert all(torch.equal(a.read(n), b.read(n)) for n in a.names())


def test_save_model_writes_the_loaded_names(tmp_path, checkpoint):
    save_model(load_model(checkpoint), tmp_path)
    assert CheckpointReader(tmp_path).names() == CheckpointReader(checkpoint).names()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_each_group_lands_on_its_device(checkpoint):
    model = load_model(checkpoint, context_device="cpu", denoiser_device="cuda")
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        want = "cpu" if name.startswith(TOWER_GROUPS["context"]) else "cuda"
        assert tensor.device.type == want, name


@pytest.mark.parametrize("tower", ["context", "denoiser"])
def test_one_tower_loads_alone_and_the_other_takes_no_memory(checkpoint, tower):
    full = load_model(checkpoint)
    alone = load_model(checkpoint, towers=(tower,))
    mine = TOWER_GROUPS[tower]
    for name, tensor in alone.state_dict().items():
        if name.startswith(mine):
            assert torch.equal(tensor, full.state_dict()[name]), name
        else:
            assert tensor.is_meta, name
    with pytest.raises(ValueError, match="towers must be drawn from"):
        load_model(checkpoint, towers=("decoder",))
