"""The denoiser's block forward (spec §4.2–§4.5, post-fix semantics).

Every block token sees every other block token and, layer by layer, what the context tower
left in its cache: attention layer i reads the context tower's layer-i keys and values ahead of
the block's own (no mask), Mamba layer i starts its forward scan from the context tower's
layer-i states. The context cache is only read. adaLN-single modulates each block: modulate
then norm for Mamba and attention, norm then modulate for MoE and MLP, and the raw gate scales
the mixer output before the residual add.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ATTENTION, MAMBA
from .cache import TowerCache
from .timestep import layer_modulation, modulate
from .tower import Tower


def denoise(tower: Tower, block_ids: torch.Tensor, t_emb: torch.Tensor | None,
            tables: nn.ParameterList, context: TowerCache) -> torch.Tensor:
    """block_ids [B, S] → norm_f(hidden) [B, S, hidden]. ``t_emb`` None runs unmodulated."""
    hidden = tower.embeddings(block_ids)
    for i, block in enumerate(tower.layers):
        residual = hidden
        mixer_first = block.layer_type in (MAMBA, ATTENTION)
        if t_emb is None:
            h, gate = block.norm(hidden), None
        else:
            shift, scale, gate = layer_modulation(t_emb, tables[i])
            h = (block.norm(modulate(hidden, shift, scale)) if mixer_first
                 else modulate(block.norm(hidden), shift, scale))
        if block.layer_type == MAMBA:
            h, _, _ = block.mixer(h, context.conv[i], context.ssm[i])
        elif block.layer_type == ATTENTION:
            h, _, _ = block.mixer(h, context.keys[i], context.values[i], causal=False,
                                      past_valid=context.valid)
        else:
            h = block.mixer(h)
        hidden = residual + (h if gate is None else gate * h)
    return tower.norm_f(hidden)
