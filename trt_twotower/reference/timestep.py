"""adaLN-single time conditioning of the denoiser (spec §4.1).

t (the masked fraction of the block) → sinusoid → t_embedder MLP → t_block, one embedding per
forward shared by all layers; each layer adds its own (shift, scale, gate) table.
"""

from __future__ import annotations

import math

import torch
from torch import nn

FREQUENCY_DIM = 256
MAX_PERIOD = 1000.0


def sinusoid(t: torch.Tensor, dim: int = FREQUENCY_DIM) -> torch.Tensor:
    """[cos, sin] features of t·1000: the product in t's dtype (bf16 in the released model,
    so 15/16 becomes 936), the arguments in fp32, the result back in t's dtype."""
    scaled = t * MAX_PERIOD
    args = scaled.float()[:, None] * sinusoid_frequencies(dim, t.device)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)


def sinusoid_frequencies(dim: int = FREQUENCY_DIM, device: torch.device | str = "cpu"
                         ) -> torch.Tensor:
    """exp(−ln(10000)·i/half) for i < half, in fp32: every executor uses these exact values."""
    half = dim // 2
    return torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32,
                                                       device=device) / half)


class TimestepEmbedder(nn.Module):
    """``t_embedder.mlp.{0,2}``: Linear(256 → hidden) → SiLU → Linear(hidden → hidden)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_DIM, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoid(t.to(self.mlp[0].weight.dtype)))


def layer_modulation(t_emb: torch.Tensor, table: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shift, scale, gate), each [B, 1, hidden]: t_emb reshaped to (B, 3, hidden) + table."""
    mod = t_emb.reshape(t_emb.shape[0], 3, -1) + table[None].to(t_emb.dtype)
    shift, scale, gate = mod.unbind(dim=1)
    return shift[:, None], scale[:, None], gate[:, None]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift
