"""Checkpoint directories: round trips, lazy reads, and one test per malformed case."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from trt_twotower.checkpoint import CheckpointError, CheckpointReader, write_checkpoint
from trt_twotower.config import ConfigError, preset
from trt_twotower.reference.loading import load_model, make_random_checkpoint, save_model
from tests.conftest import random_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_random_checkpoint(preset("tiny"), tmp_path_factory.mktemp("ckpt"), seed=1)


def test_round_trip_gives_identical_weights_and_logits(checkpoint, rng):
    loaded = load_model(checkpoint)
    original = random_model(preset("tiny"), seed=1)
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = torch.randint(4, 1000, (1, 9), generator=rng)
    a = loaded.context_logits(ids, loaded.new_cache(1))
    b = original.context_logits(ids, original.new_cache(1))
    assert float((a - b).abs().max() / b.abs().max()) < 1e-6  # same weights, fp32


def test_sharded_round_trip(tmp_path):
    model = random_model(preset("tiny"), seed=2)
    save_model(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    loaded = load_model(tmp_path)
    assert all(torch.equal(loaded.state_dict()[n], t) for n, t in model.state_dict().items())


def test_bf16_load_keeps_the_router_in_fp32(checkpoint):
    model = load_model(checkpoint, dtype=torch.bfloat16)
    layer = preset("tiny").hybrid_override_pattern.index("E")
    assert model.context_tower.layers[layer].mixer.gate.weight.dtype == torch.float32
    assert model.context_lm_head.weight.dtype == torch.bfloat16


def test_digest_is_stable_and_changes_with_a_tensor(tmp_path):
    model = random_model(preset("tiny"), seed=3)
    save_model(model, tmp_path)
    first = CheckpointReader(tmp_path).digest()
    assert CheckpointReader(tmp_path).digest() == first
    state = model.state_dict()
    state["lm_head.weight"] = state["lm_head.weight"][:-1]
    write_checkpoint(tmp_path, model.config, state)
    assert CheckpointReader(tmp_path).digest() != first


def test_embedding_alias_is_accepted(tmp_path):
    model = random_model(preset("tiny"), seed=4)
    state = dict(model.state_dict())
    state["context_tower.embedding.weight"] = state.pop("context_tower.embeddings.weight")
    write_checkpoint(tmp_path, model.config, state)
    loaded = load_model(tmp_path)
    assert torch.equal(loaded.context_tower.embeddings.weight,
                       model.context_tower.embeddings.weight)


def _broken(tmp_path, mutate):
    model = random_model(preset("tiny"), seed=5)
    state = dict(model.state_dict())
    mutate(state)
    write_checkpoint(tmp_path, model.config, state)
    return tmp_path


def test_missing_tensor_is_named(tmp_path):
    path = _broken(tmp_path, lambda s: s.pop("denoiser_tower.norm_f.weight"))
    with pytest.raises(CheckpointError, match="missing tensors: denoiser_tower.norm_f.weight"):
        load_model(path)


def test_unexpected_tensor_is_named(tmp_path):
    path = _broken(tmp_path, lambda s: s.update({"context_tower.layers.0.extra": torch.ones(2)}))
    with pytest.raises(CheckpointError, match="unexpected tensors: context_tower.layers.0.extra"):
        load_model(path)


def test_misshaped_tensor_is_named(tmp_path):
    path = _broken(tmp_path, lambda s: s.update({"lm_head.weight": torch.ones(3, 3)}))
    with pytest.raises(CheckpointError, match=r"lm_head.weight has shape \[3, 3\]"):
        load_model(path)


def test_truncated_file_is_named(tmp_path, checkpoint):
    for f in checkpoint.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    weights = tmp_path / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    with pytest.raises(CheckpointError, match=f"{weights} is truncated"):
        CheckpointReader(tmp_path)


def test_index_pointing_at_a_missing_shard(tmp_path):
    save_model(random_model(preset("tiny")), tmp_path, max_shard_bytes=200_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard {shard.name}, which is missing"):
        CheckpointReader(tmp_path)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    preset("tiny").save(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match=r"pickle weights \(pytorch_model.bin\)"):
        CheckpointReader(tmp_path)


def _weights_only(tmp_path):
    save_file({"x": torch.ones(1)}, str(tmp_path / "model.safetensors"))
    return tmp_path


def test_missing_config_is_named(tmp_path):
    with pytest.raises(ConfigError, match=f"no config.json at {tmp_path / 'config.json'}"):
        CheckpointReader(_weights_only(tmp_path))


def test_invalid_json_config_is_named(tmp_path):
    (_weights_only(tmp_path) / "config.json").write_text("[1, 2")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        CheckpointReader(tmp_path)


def test_config_with_an_unknown_layer_type_is_named(tmp_path):
    raw = preset("tiny").to_dict()
    raw["hybrid_override_pattern"] = "MQ"
    raw.pop("num_hidden_layers")
    (_weights_only(tmp_path) / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"unknown layer type\(s\) \['Q'\]"):
        CheckpointReader(tmp_path)


def test_garbage_weights_file(tmp_path):
    preset("tiny").save(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        CheckpointReader(tmp_path)


def test_header_that_is_not_an_object_is_named(tmp_path):
    preset("tiny").save(tmp_path)
    header = b"[1, 2]"
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'model.safetensors'} is not a"):
        CheckpointReader(tmp_path)


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    save_model(random_model(preset("tiny")), tmp_path, max_shard_bytes=200_000)
    index = tmp_path / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    shard = raw["weight_map"]["lm_head.weight"]
    raw["weight_map"]["lm_head.weight"] = next(
        v for v in raw["weight_map"].values() if v != shard)
    index.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="tensor 'lm_head.weight' in model-"):
        CheckpointReader(tmp_path)


def test_digest_changes_with_values_of_the_same_shape(tmp_path):
    make_random_checkpoint(preset("tiny"), tmp_path / "a", seed=1)
    make_random_checkpoint(preset("tiny"), tmp_path / "b", seed=2)
    assert CheckpointReader(tmp_path / "a").digest() != CheckpointReader(tmp_path / "b").digest()


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match=f"cannot write a checkpoint to {blocker / 'ckpt'}"):
        write_checkpoint(blocker / "ckpt", preset("tiny"), {})


def test_rewriting_a_sharded_checkpoint_as_one_file_leaves_no_stale_index(tmp_path):
    """The index of the first write would win over the second write's single file."""
    save_model(random_model(preset("tiny"), seed=4), tmp_path, max_shard_bytes=200_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    second = random_model(preset("tiny"), seed=5)
    save_model(second, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors*")) == ["model.safetensors"]
    loaded = load_model(tmp_path)
    assert all(torch.equal(loaded.state_dict()[n], t) for n, t in second.state_dict().items())


def test_resharding_leaves_only_the_new_shards(tmp_path):
    model = random_model(preset("tiny"), seed=6)
    save_model(model, tmp_path, max_shard_bytes=100_000)
    first = set(tmp_path.glob("model-*.safetensors"))
    save_model(model, tmp_path, max_shard_bytes=400_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = {p.name for p in tmp_path.glob("model-*.safetensors")}
    assert shards == set(index["weight_map"].values()) and len(shards) < len(first)


def test_reads_are_lazy_per_tensor(checkpoint, monkeypatch):
    reader = CheckpointReader(checkpoint)
    opened = []
    import trt_twotower.checkpoint as module
    real = module.safe_open

    def spy(path, framework):
        handle = real(path, framework=framework)
        original = handle.get_tensor

        class Wrapped:
            def __enter__(self):
                handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def get_tensor(self, name):
                opened.append(name)
                return original(name)
        return Wrapped()

    monkeypatch.setattr(module, "safe_open", spy)
    reader.read("lm_head.weight")
    assert opened == ["lm_head.weight"]
