"""The context tower as a stock NemotronH model of ``transformers``.

Written once: the independent check of our backbone (tests compare our context tower with
``NemotronHForCausalLM`` on the same weights). The names produced are transformers' in-memory
ones (``model.*``, experts fused as 3-D tensors); its ``save_pretrained`` writes the on-disk
layout (``backbone.*``, per-expert), which is how the frozen context tower becomes a stock AR
checkpoint (spec §3, "Converter facts").
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from ..config import NEWER_SPELLING, TwoTowerConfig

_EXPERT = re.compile(r"^(.*\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")


def context_tower_to_transformers(state: Mapping[str, torch.Tensor], config: TwoTowerConfig
                                  ) -> dict[str, torch.Tensor]:
    """Our ``context_tower.*`` + ``context_lm_head.weight`` → NemotronHForCausalLM names."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, tensor in state.items():
        if name == "context_lm_head.weight":
            out["lm_head.weight"] = tensor
            continue
        if not name.startswith("context_tower."):
            continue
        target = "model." + name[len("context_tower."):]
        match = _EXPERT.match(target)
        if match:
            experts.setdefault((match[1], match[3]), {})[int(match[2])] = tensor
        else:
            out[target] = tensor
    for (prefix, proj), per_expert in experts.items():
        if sorted(per_expert) != list(range(config.n_routed_experts)):
            raise ValueError(f"{prefix}: expected experts 0..{config.n_routed_experts - 1}")
        out[f"{prefix}.{proj}"] = torch.stack([per_expert[e] for e in sorted(per_expert)])
    return out


def transformers_config_kwargs(config: TwoTowerConfig) -> dict[str, Any]:
    """NemotronHConfig keyword arguments for the same backbone. ``time_step_min`` is tiny
    because transformers clamps dt below at it, while the released model's limit is
    (0, inf) (§1); it must stay positive for transformers' own initialisation."""
    c = config
    if tuple(c.time_step_limit) != (0.0, float("inf")):
        raise ValueError(f"transformers ignores time_step_limit={c.time_step_limit}; only the "
                         "released (0, inf) limit maps to a stock NemotronH")
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        layers_block_type=[NEWER_SPELLING[t] for t in c.layer_types],
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim, attention_bias=c.attention_bias,
        intermediate_size=c.intermediate_size or c.moe_intermediate_size,
        mlp_hidden_act=c.mlp_hidden_act, mlp_bias=c.mlp_bias,
        mamba_num_heads=c.mamba_num_heads, mamba_head_dim=c.mamba_head_dim,
        ssm_state_size=c.ssm_state_size, n_groups=c.n_groups, conv_kernel=c.conv_kernel,
        chunk_size=c.chunk_size, use_conv_bias=c.use_conv_bias, use_bias=c.mamba_proj_bias,
        time_step_min=1e-9, n_routed_experts=c.n_routed_experts,
        num_experts_per_tok=c.num_experts_per_tok, moe_intermediate_size=c.moe_intermediate_size,
        moe_shared_expert_intermediate_size=c.moe_shared_expert_intermediate_size,
        n_shared_experts=c.n_shared_experts, routed_scaling_factor=c.routed_scaling_factor,
        n_group=c.n_group, topk_group=c.topk_group, norm_topk_prob=c.norm_topk_prob,
        layer_norm_epsilon=c.layer_norm_epsilon, tie_word_embeddings=False,
        max_position_embeddings=c.max_position_embeddings, pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
    )
