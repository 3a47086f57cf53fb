"""Deterministic random weights with the released model's structure, for the built-in random
model, tests and shape work. Scales keep activations O(1) through many layers, and the Mamba
parameters follow the released config's ranges (dt in [time_step_min, time_step_max])."""

from __future__ import annotations

import math

import torch
from torch import nn

from .mamba2 import Mamba2Mixer
from .model import TwoTowerModel
from .moe import Router

TIME_STEP_MIN, TIME_STEP_MAX = 1e-3, 1e-1  # spec §1; they only matter for initialisation


@torch.no_grad()
def initialise(model: TwoTowerModel, seed: int, std: float = 0.02) -> TwoTowerModel:
    """Fill every parameter from ``seed``; the same seed always gives the same weights."""
    gen = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, scale: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen) * scale)

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            normal(module.weight, std if isinstance(module, nn.Embedding) else
                   1.0 / math.sqrt(module.weight.shape[1]))
            if getattr(module, "bias", None) is not None:
                normal(module.bias, std)
        elif isinstance(module, nn.Conv1d):
            normal(module.weight, 1.0 / math.sqrt(module.weight.shape[-1]))
            if module.bias is not None:
                normal(module.bias, std)
        elif isinstance(module, Router):
            normal(module.weight, 1.0 / math.sqrt(module.weight.shape[1]))
            normal(module.e_score_correction_bias, 0.1)
        if isinstance(module, Mamba2Mixer):
            heads = module.A_log.shape[0]
            module.A_log.copy_(torch.log(1 + 15 * torch.rand(heads, generator=gen)))
            dt = torch.exp(torch.rand(heads, generator=gen)
                           * (math.log(TIME_STEP_MAX) - math.log(TIME_STEP_MIN))
                           + math.log(TIME_STEP_MIN))
            module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            module.D.copy_(1 + 0.1 * torch.randn(heads, generator=gen))
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen))
    for table in model.scale_shift_tables:
        normal(table, 0.1)
    return model
