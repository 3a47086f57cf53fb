"""NoPE grouped-query attention ('*' layers), spec §2.4 and §4.3.

The context tower attends causally over its cache followed by the new tokens and appends the
new keys and values; the denoiser attends without a mask over the context tower's cache for the
same layer followed by its block's own keys and values, and writes nothing.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..config import TwoTowerConfig


class Attention(nn.Module):
    def __init__(self, config: TwoTowerConfig) -> None:
        super().__init__()
        c = config
        self.heads, self.kv_heads, self.head_dim = (c.num_attention_heads, c.num_key_value_heads,
                                                    c.head_dim)
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim,
                                bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim,
                                bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim,
                                bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size,
                                bias=c.attention_bias)

    def project(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [b, Hq, L, D], k and v [b, Hkv, L, D]."""
        b, length, _ = hidden.shape

        def heads(t: torch.Tensor, n: int) -> torch.Tensor:
            return t.reshape(b, length, n, self.head_dim).transpose(1, 2)

        return (heads(self.q_proj(hidden), self.heads), heads(self.k_proj(hidden), self.kv_heads),
                heads(self.v_proj(hidden), self.kv_heads))

    def forward(self, hidden: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                causal: bool, past_valid: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attend over [past | new]; causal among the new tokens if asked; with
        ``past_valid`` [B], row b sees only its first past_valid[b] past positions. Returns
        the output and the new tokens' keys and values (the caller decides whether to keep
        them)."""
        q, k, v = self.project(hidden)
        keys = torch.cat([past_k.to(k.dtype), k], dim=2)
        values = torch.cat([past_v.to(v.dtype), v], dim=2)
        out = grouped_attention(q, keys, values, causal_new=q.shape[2] if causal else 0,
                                past_valid=past_valid)
        b, _, length, _ = q.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1)), k, v


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                      causal_new: int, past_valid: Optional[torch.Tensor] = None
                      ) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(D), each KV head serving Hq/Hkv consecutive query
    heads. With ``causal_new`` = L the last L keys are the queries' own tokens and query i sees
    the prefix plus new tokens 0..i (a bottom-right aligned causal mask); 0 means no mask.

    ``past_valid`` [B] batches rows whose caches hold different lengths: the past is padded to
    the longest, and row b's queries skip past positions from past_valid[b] on (the padding),
    so each row attends exactly as it would alone."""
    groups = q.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, dim=1)
    values = values.repeat_interleave(groups, dim=1)
    n_q, n_k = q.shape[2], keys.shape[2]
    mask = None
    if causal_new:
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(diagonal=n_k - n_q)
    if past_valid is not None:
        # the queries' own keys are the last n_q; before them, the (padded) past
        position = torch.arange(n_k, device=q.device)
        seen = (position < past_valid.to(q.device)[:, None]) | (position >= n_k - n_q)
        seen = seen[:, None, None, :]                                    # [B, 1, 1, n_k]
        mask = seen if mask is None else seen & mask
    return nn.functional.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, scale=1.0 / math.sqrt(q.shape[-1]))
