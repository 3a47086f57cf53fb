"""Our context tower equals transformers' NemotronHForCausalLM on the same random weights
(fp32): the independent check that the backbone is right.

Tolerance: max|ours − theirs| / max|theirs| ≤ 1e-5 over all logits. transformers routes in
fp32 and we route in fp64; the inputs are random and no routing near-tie occurred on them (a
flipped expert would show as an error far above 1e-5)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from trt_twotower.config import preset  # noqa: E402
from trt_twotower.policy import GenerationSettings  # noqa: E402
from trt_twotower.reference import generate  # noqa: E402
from trt_twotower.reference.transformers_mapping import (  # noqa: E402
    context_tower_to_transformers, transformers_config_kwargs)
from tests.conftest import random_model  # noqa: E402

TOL = 1e-5

CONFIGS = {
    "tiny": preset("tiny"),
    "groups-4": preset("tiny").replace(hybrid_override_pattern="M*EME*", n_groups=4,
                                       chunk_size=5),
    "group-routing": preset("tiny").replace(hybrid_override_pattern="EM*E", n_group=4,
                                            topk_group=2, chunk_size=8),
    "mha-dense": preset("tiny").replace(hybrid_override_pattern="-M*M", num_key_value_heads=4,
                                        chunk_size=3),
}


def _pair(name):
    config = CONFIGS[name]
    ours = random_model(config, seed=11)
    hf_config = transformers.NemotronHConfig(**transformers_config_kwargs(config))
    theirs = transformers.NemotronHForCausalLM(hf_config).eval()
    mapped = context_tower_to_transformers(ours.state_dict(), config)
    theirs.load_state_dict(mapped, strict=True)
    return ours, theirs


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_mapping_sets_every_transformers_tensor_with_its_shape(name):
    config = CONFIGS[name]
    ours = random_model(config)
    theirs = transformers.NemotronHForCausalLM(
        transformers.NemotronHConfig(**transformers_config_kwargs(config)))
    mapped = context_tower_to_transformers(ours.state_dict(), config)
    expected = {n: tuple(t.shape) for n, t in theirs.state_dict().items()}
    assert {n: tuple(t.shape) for n, t in mapped.items()} == expected


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("length", [13, 21])
def test_full_sequence_logits_match_transformers(name, length, rng):
    ours, theirs = _pair(name)
    ids = torch.randint(4, ours.config.vocab_size, (2, length), generator=rng)
    with torch.no_grad():
        expected = theirs(ids).logits.float()
        got = ours.context_logits(ids, ours.new_cache(2))
    assert _rel(got, expected) < TOL


@pytest.mark.parametrize("name", ["tiny", "groups-4"])
def test_incremental_decoding_matches_transformers_cache(name, rng):
    ours, theirs = _pair(name)
    ids = torch.randint(4, ours.config.vocab_size, (2, 9 + 4), generator=rng)
    with torch.no_grad():
        out = theirs(ids[:, :9], use_cache=True)
        past = out.past_key_values
        cache = ours.new_cache(2)
        assert _rel(ours.context_logits(ids[:, :9], cache), out.logits.float()) < TOL
        for i in range(9, 13):
            out = theirs(ids[:, i:i + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            assert _rel(ours.context_logits(ids[:, i:i + 1], cache), out.logits.float()) < TOL


def test_greedy_tokens_match_transformers_generate(rng):
    ours, theirs = _pair("tiny")
    prompt = torch.randint(4, ours.config.vocab_size, (2, 7), generator=rng)
    with torch.no_grad():
        hf = theirs.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10,
                             pad_token_id=0, eos_token_id=None)
    result = generate(ours, prompt, GenerationSettings(mode="ar", max_new_tokens=10,
                                                       stop_at_eos=False))
    assert [row[7:] for row in hf.tolist()] == result.tokens
