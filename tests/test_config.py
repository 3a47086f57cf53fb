"""config.json in the released NemotronH format, both layer-type spellings, clear errors."""

import json

import pytest

from trt_twotower.config import PRESETS, ConfigError, TwoTowerConfig, preset


def test_released_dimensions_and_derived_sizes():
    c = preset("nano-30b-a3b")
    assert c.num_hidden_layers == 52
    assert (len(c.mamba_layers), len(c.attention_layers)) == (23, 6)
    assert c.attention_layers == (5, 12, 19, 26, 33, 42)
    assert (c.d_inner, c.conv_dim, c.in_proj_dim) == (4096, 6144, 10304)


def test_tiny_preset_has_every_block_type_twice_and_crosses_chunks():
    c = preset("tiny")
    for kind in "ME*-":
        assert c.hybrid_override_pattern.count(kind) >= 2
    assert c.chunk_size < 8


def test_slice_keeps_full_width_and_every_block_type():
    c = preset("nano-30b-a3b-slice")
    assert c.hidden_size == 2688 and set(c.hybrid_override_pattern) >= {"M", "E", "*"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_round_trip_through_config_json(tmp_path, name):
    c = preset(name)
    c.save(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "nemotron_h" and raw["num_hidden_layers"] == c.num_hidden_layers
    assert TwoTowerConfig.load(tmp_path) == c


def test_newer_layers_block_type_spelling_is_accepted():
    raw = preset("tiny").to_dict()
    del raw["hybrid_override_pattern"]
    raw["layers_block_type"] = ["linear_attention", "moe", "full_attention", "mlp"]
    raw["num_hidden_layers"] = 4
    assert TwoTowerConfig.from_dict(raw).hybrid_override_pattern == "ME*-"


def test_remote_code_spelling_and_legacy_aliases_are_accepted():
    raw = preset("tiny").to_dict()
    del raw["hybrid_override_pattern"], raw["n_groups"], raw["num_hidden_layers"]
    raw["layers_block_type"] = ["mamba", "attention", "moe"]
    raw["mamba_n_groups"] = 2
    c = TwoTowerConfig.from_dict(raw)
    assert c.hybrid_override_pattern == "M*E" and c.n_groups == 2


def _broken(**changes):
    raw = preset("tiny").to_dict()
    raw.update(changes)
    return {k: v for k, v in raw.items() if v is not None}


@pytest.mark.parametrize("raw,needle", [
    (_broken(hybrid_override_pattern="MEX*"), "unknown layer type"),
    (_broken(hybrid_override_pattern=None, layers_block_type=["mamba", "conv"]),
     "unknown layer type"),
    (_broken(num_key_value_heads=3), "not divisible"),
    (_broken(n_groups=3), "not divisible"),
    (_broken(hidden_size=None), "missing required field"),
    (_broken(num_hidden_layers=3), "num_hidden_layers"),
    (_broken(model_type="llama"), "model_type"),
    (_broken(num_experts_per_tok=99), "exceeds"),
    (_broken(mask_token_id=10**6), "outside the vocabulary"),
    (_broken(vocab_size=-1), "positive integer"),
])
def test_invalid_configs_raise_specific_errors(raw, needle):
    with pytest.raises(ConfigError, match=needle):
        TwoTowerConfig.from_dict(raw)


def test_unreadable_config_files_raise(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        TwoTowerConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        TwoTowerConfig.load(tmp_path)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="tiny"):
        preset("huge")


def test_extra_fields_survive_a_round_trip(tmp_path):
    raw = preset("tiny").to_dict()
    raw["rope_theta"] = 10000
    c = TwoTowerConfig.from_dict(raw)
    c.save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["rope_theta"] == 10000
