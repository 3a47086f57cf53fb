"""The Mamba-2 mixer ('M' layers), spec §2.3 and §4.4.

One set of weights and one cache layout for every use: many tokens (prefill, block
extension, the denoiser's block) go through the chunked scan, a single token through the
step recurrence; both start from the cache's states. The scan always runs in fp32 (§7.4),
its output is cast back before the gated norm.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import TwoTowerConfig
from .norms import gated_group_rms_norm
from .ssd import ssd_chunked, ssd_step


class GatedNorm(nn.Module):
    """Holds ``mixer.norm.weight``; the math is ``gated_group_rms_norm``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))


class Mamba2Mixer(nn.Module):
    def __init__(self, config: TwoTowerConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.in_proj = nn.Linear(c.hidden_size, c.in_proj_dim, bias=c.mamba_proj_bias)
        self.conv1d = nn.Conv1d(c.conv_dim, c.conv_dim, c.conv_kernel, groups=c.conv_dim,
                                bias=c.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(c.mamba_num_heads))
        self.A_log = nn.Parameter(torch.zeros(c.mamba_num_heads))
        self.D = nn.Parameter(torch.ones(c.mamba_num_heads))
        self.norm = GatedNorm(c.d_inner)
        self.out_proj = nn.Linear(c.d_inner, c.hidden_size, bias=c.mamba_proj_bias)

    def forward(self, hidden: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [b, L, hidden] → (out [b, L, hidden], new conv state, new SSM state)."""
        c = self.config
        b, length, _ = hidden.shape
        z, xbc, dt = torch.split(self.in_proj(hidden), [c.d_inner, c.conv_dim, c.mamba_num_heads],
                                 dim=-1)
        history = torch.cat([conv_state.to(xbc.dtype), xbc.transpose(1, 2)], dim=-1)
        new_conv_state = history[:, :, -(c.conv_kernel - 1):]
        xbc = nn.functional.silu(causal_conv(history, self.conv1d.weight, self.conv1d.bias))
        x, B, C = torch.split(xbc, [c.d_inner, c.n_groups * c.ssm_state_size,
                                    c.n_groups * c.ssm_state_size], dim=-1)
        x = x.reshape(b, length, c.mamba_num_heads, c.mamba_head_dim).float()
        B = B.reshape(b, length, c.n_groups, c.ssm_state_size).float()
        C = C.reshape(b, length, c.n_groups, c.ssm_state_size).float()
        dt = discretise(dt.float(), self.dt_bias.float(), c.time_step_limit)
        A = -torch.exp(self.A_log.float())
        D = self.D.float()
        if length == 1:
            y, new_ssm = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, ssm_state.float())
            y = y[:, None]
        else:
            y, new_ssm = ssd_chunked(x, dt, A, B, C, D, ssm_state.float(), c.chunk_size)
        y = y.reshape(b, length, c.d_inner).to(hidden.dtype)
        y = gated_group_rms_norm(y, z, self.norm.weight, c.n_groups, c.layer_norm_epsilon)
        return self.out_proj(y), new_conv_state, new_ssm


def discretise(dt_raw: torch.Tensor, dt_bias: torch.Tensor,
               limit: tuple[float, float]) -> torch.Tensor:
    """dt = clamp(softplus(dt_raw + dt_bias), limit) (the default limit is a no-op)."""
    dt = nn.functional.softplus(dt_raw + dt_bias)
    return dt.clamp(min=limit[0], max=limit[1])


def causal_conv(history: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
    """Depthwise causal conv over ``history`` [b, C, K−1+L] (seed columns first): out[t] =
    Σ_k w[k]·x[t−K+1+k] + b, so w[K−1] multiplies the current token. Returns [b, L, C]."""
    out = nn.functional.conv1d(history, weight, bias, groups=history.shape[1])
    return out.transpose(1, 2)
