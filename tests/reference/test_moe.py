"""The MoE layer equals an explicit per-token loop over its selected experts (spec §2.5)."""

import pytest
import torch

from trt_twotower.config import preset
from trt_twotower.reference.moe import MoE
from tests.conftest import random_model


def explicit_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, in plain Python: fp64 sigmoid scores, group-limited selection on the
    biased scores (ties to the lower index), unbiased weights normalised and scaled."""
    c = moe.gate.config
    per_group = c.n_routed_experts // c.n_group
    out = []
    for token in x:
        scores = torch.sigmoid(token.double() @ moe.gate.weight.double().t()).tolist()
        bias = moe.gate.e_score_correction_bias.float().double().tolist()
        biased = [s + b for s, b in zip(scores, bias)]
        groups = list(range(c.n_group))
        group_score = {g: sum(sorted(biased[g * per_group:(g + 1) * per_group])[-2:])
                       for g in groups}
        kept = sorted(groups, key=lambda g: (-group_score[g], g))[:c.topk_group]
        candidates = [e if e // per_group in kept else None for e in range(c.n_routed_experts)]
        ranked = sorted(range(c.n_routed_experts),
                        key=lambda e: (-(biased[e] if candidates[e] is not None else 0.0), e))
        chosen = ranked[:c.num_experts_per_tok]
        total = sum(scores[e] for e in chosen) + 1e-20
        acc = torch.zeros(x.shape[-1], dtype=torch.float32)
        for e in chosen:
            weight = float(torch.tensor(scores[e] / total * c.routed_scaling_factor,
                                        dtype=torch.float32))
            acc += moe.experts[e](token[None])[0].float() * weight
        out.append(acc.to(x.dtype) + moe.shared_experts(token[None])[0])
    return torch.stack(out)


def _moe(config, seed=0) -> MoE:
    model = random_model(config, seed)
    return model.context_tower.layers[config.hybrid_override_pattern.index("E")].mixer


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2)])
def test_moe_matches_explicit_per_token_loop(rng, n_group, topk_group):
    config = preset("tiny").replace(n_group=n_group, topk_group=topk_group)
    moe = _moe(config)
    x = torch.randn(2, 7, config.hidden_size, generator=rng)
    assert torch.allclose(moe(x), explicit_moe(moe, x.reshape(-1, x.shape[-1])).reshape(x.shape),
                          atol=1e-5, rtol=1e-5)


def test_moe_ties_are_broken_by_lower_expert_index(rng):
    """Two experts with identical router rows and bias tie exactly; the lower index wins."""
    config = preset("tiny").replace(num_experts_per_tok=1)
    moe = _moe(config)
    x = torch.randn(5, config.hidden_size, generator=rng)
    scores = torch.sigmoid(x.double() @ moe.gate.weight.double().t())
    best = int((scores + moe.gate.e_score_correction_bias.double()).argmax(-1)[0])
    twin = (best + 3) % config.n_routed_experts
    moe.gate.weight.data[twin] = moe.gate.weight.data[best]
    moe.gate.e_score_correction_bias[twin] = moe.gate.e_score_correction_bias[best]
    indices, _ = moe.gate(x[:1])
    assert int(indices[0, 0]) == min(best, twin)
    assert torch.allclose(moe(x), explicit_moe(moe, x), atol=1e-5, rtol=1e-5)


def test_router_weights_use_unbiased_scores(rng):
    """The correction bias changes which experts are chosen, never their weights."""
    config = preset("tiny")
    moe = _moe(config)
    x = torch.randn(4, config.hidden_size, generator=rng)
    indices, weights = moe.gate(x)
    scores = torch.sigmoid(x.double() @ moe.gate.weight.double().t()).gather(1, indices)
    expected = scores / scores.sum(-1, keepdim=True) * config.routed_scaling_factor
    assert weights.dtype == torch.float32
    assert torch.allclose(weights.double(), expected, atol=1e-6)


def test_dropped_groups_are_zeroed_not_excluded():
    """Spec §2.5 and the released router zero the dropped groups' scores: an expert of a
    dropped group beats a kept expert whose biased score is negative."""
    from trt_twotower.reference.moe import route
    config = preset("tiny").replace(n_routed_experts=4, n_group=2, topk_group=1,
                                    num_experts_per_tok=2)
    scores = torch.tensor([[0.95, 0.45, 0.30, 0.30]], dtype=torch.float64)
    bias = torch.tensor([0.0, -0.5, 0.0, 0.0])
    indices, _ = route(scores, bias, config)
    assert sorted(indices[0].tolist()) == [0, 2]
