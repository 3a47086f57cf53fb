"""RMS normalisations, always reduced in fp32 and cast back (spec §2.2, §2.3 step 6, §8)."""

from __future__ import annotations

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight ⊙ x / sqrt(mean(x²) + eps) in fp32, returned in x's dtype (plain weight, no 1+w)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * xf).to(x.dtype)


def gated_group_rms_norm(y: torch.Tensor, z: torch.Tensor, weight: torch.Tensor,
                         groups: int, eps: float) -> torch.Tensor:
    """Mamba-2's gated norm: gate *before* the norm (u = y ⊙ silu(z)), RMS over each group of
    channels, then the weight; all in fp32 (mamba_ssm's rmsnorm_fn), cast back to y's dtype."""
    u = y.float() * nn.functional.silu(z.float())
    shape = u.shape
    u = u.reshape(*shape[:-1], groups, shape[-1] // groups)
    u = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * u.reshape(shape)).to(y.dtype)


class RMSNorm(nn.Module):
    """A block's pre-norm or the final norm_f; the parameter is named like the checkpoint's."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
