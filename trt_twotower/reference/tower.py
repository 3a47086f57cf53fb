"""One NemotronH backbone (both towers share this code), spec §2.2.

embeddings → blocks (out = x + mixer(norm(x)), one mixer per block) → norm_f. ``Tower.forward``
is the context tower's step: it consumes tokens after what its cache holds and updates the
cache in place. The denoiser's forward reads the same modules another way (``denoiser.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ATTENTION, MAMBA, MLP as MLP_TYPE, MOE, TwoTowerConfig
from .attention import Attention
from .cache import TowerCache
from .mamba2 import Mamba2Mixer
from .mlp import MLP
from .moe import MoE
from .norms import RMSNorm


def make_mixer(config: TwoTowerConfig, layer_type: str) -> nn.Module:
    if layer_type == MAMBA:
        return Mamba2Mixer(config)
    if layer_type == ATTENTION:
        return Attention(config)
    if layer_type == MOE:
        return MoE(config)
    if layer_type == MLP_TYPE:
        return MLP(config.hidden_size, config.intermediate_size, config.mlp_bias)
    raise ValueError(f"unknown layer type {layer_type!r}")


class Block(nn.Module):
    def __init__(self, config: TwoTowerConfig, layer_type: str) -> None:
        super().__init__()
        self.layer_type = layer_type
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = make_mixer(config, layer_type)


class Tower(nn.Module):
    def __init__(self, config: TwoTowerConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, t) for t in config.layer_types)
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, cache: TowerCache) -> torch.Tensor:
        """Consume ``input_ids`` [B, T] after the cache's tokens: causal attention, seeded
        Mamba scans; appends KV, replaces Mamba states. Returns norm_f(hidden) [B, T, hidden]."""
        hidden = self.embeddings(input_ids)
        for i, block in enumerate(self.layers):
            h = block.norm(hidden)
            if block.layer_type == MAMBA:
                h, cache.conv[i], cache.ssm[i] = block.mixer(h, cache.conv[i], cache.ssm[i])
            elif block.layer_type == ATTENTION:
                h, k, v = block.mixer(h, cache.keys[i], cache.values[i], causal=True,
                                      past_valid=cache.valid)
                cache.keys[i] = torch.cat([cache.keys[i].to(k.dtype), k], dim=2)
                cache.values[i] = torch.cat([cache.values[i].to(v.dtype), v], dim=2)
            else:
                h = block.mixer(h)
            hidden = hidden + h
        cache.length += input_ids.shape[1]
        return self.norm_f(hidden)
