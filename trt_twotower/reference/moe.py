"""The routed mixture of experts ('E' layers), spec §2.5.

The router computes its logits in float64 (the post-fix reference), selects experts with the
fp32 correction bias added, weights them by the *unbiased* sigmoid scores, normalises and scales
them, and accumulates the expert outputs in fp32. The shared expert always runs, unweighted.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import TwoTowerConfig
from .mlp import MLP


class Router(nn.Module):
    """``mixer.gate``: weight [E, hidden] and the selection bias, both kept in fp32."""

    def __init__(self, config: TwoTowerConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros(config.n_routed_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] → (expert indices [T, k], fp32 weights [T, k])."""
        logits = x.double() @ self.weight.double().t()
        return route(torch.sigmoid(logits), self.e_score_correction_bias.float(), self.config)


def route(scores: torch.Tensor, bias: torch.Tensor, c: TwoTowerConfig
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited top-k on biased scores (DeepSeek-V3 style, a no-op with one group): the
    dropped groups' scores are zeroed as the released code does (spec §2.5), then normalised
    unbiased weights × routed_scaling_factor, returned in fp32."""
    tokens = scores.shape[0]
    biased = scores + bias.to(scores.dtype)
    if c.n_group > 1:
        grouped = biased.reshape(tokens, c.n_group, -1)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, top_indices(group_scores, c.topk_group), True)
        biased = grouped.masked_fill(~keep[..., None], 0.0).reshape(tokens, -1)
    indices = top_indices(biased, c.num_experts_per_tok)
    weights = scores.gather(1, indices)
    if c.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return indices, (weights * c.routed_scaling_factor).float()


def top_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest along the last axis, ties going to the lower index, so that every
    executor selects the same experts (the original leaves tie order unspecified)."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices[..., :k]


class MoE(nn.Module):
    def __init__(self, config: TwoTowerConfig) -> None:
        super().__init__()
        self.gate = Router(config)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size, config.mlp_bias)
            for _ in range(config.n_routed_experts))
        self.shared_experts = (MLP(config.hidden_size, config.moe_shared_expert_intermediate_size,
                                   config.mlp_bias) if config.n_shared_experts else None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        indices, weights = self.gate(x)
        routed = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in torch.unique(indices).tolist():
            token, slot = torch.nonzero(indices == e, as_tuple=True)
            out = self.experts[e](x[token]).float() * weights[token, slot, None]
            routed.index_add_(0, token, out)
        out = routed.to(hidden.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.reshape(shape)

    def experts_touched(self, hidden: torch.Tensor) -> int:
        """How many distinct experts these tokens route to (the cost of a batched step)."""
        indices, _ = self.gate(hidden.reshape(-1, hidden.shape[-1]))
        return int(torch.unique(indices).numel())
