"""One tower's cache: per attention layer its keys and values, per Mamba layer its conv and SSM
states. One layout serves prefill, block extension, single-token decode and the denoiser's
read-only view (spec §2.3 cache layout, §4.6, §4.7).

The conv state keeps the last ``conv_kernel − 1`` raw (pre-conv) xBC inputs, newest last:
exactly what seeding a causal conv needs. A fresh cache holds zero states, which is the same as
starting the recurrence from nothing, so there is no special "empty" path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..config import TwoTowerConfig


@dataclass
class TowerCache:
    """The state a tower carries between steps; ``length`` tokens have been consumed."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)     # [B, Hkv, L, D]
    values: dict[int, torch.Tensor] = field(default_factory=dict)   # [B, Hkv, L, D]
    conv: dict[int, torch.Tensor] = field(default_factory=dict)     # [B, conv_dim, K−1]
    ssm: dict[int, torch.Tensor] = field(default_factory=dict)      # [B, H, P, N], fp32
    length: int = 0
    # rows of different lengths in one batch: row b holds valid[b] of the ``length`` cached
    # positions, the rest is padding its attention skips (None: every row holds ``length``)
    valid: Optional[torch.Tensor] = None

    @classmethod
    def empty(cls, config: TwoTowerConfig, batch: int, dtype: torch.dtype,
              device: torch.device | str = "cpu") -> "TowerCache":
        cache = cls()
        for i in config.attention_layers:
            shape = (batch, config.num_key_value_heads, 0, config.head_dim)
            cache.keys[i] = torch.zeros(shape, dtype=dtype, device=device)
            cache.values[i] = torch.zeros(shape, dtype=dtype, device=device)
        for i in config.mamba_layers:
            cache.conv[i] = torch.zeros(batch, config.conv_dim, config.conv_kernel - 1,
                                        dtype=dtype, device=device)
            cache.ssm[i] = torch.zeros(batch, config.mamba_num_heads, config.mamba_head_dim,
                                       config.ssm_state_size, dtype=torch.float32, device=device)
        return cache

    def clone(self) -> "TowerCache":
        return TowerCache(
            keys={i: t.clone() for i, t in self.keys.items()},
            values={i: t.clone() for i, t in self.values.items()},
            conv={i: t.clone() for i, t in self.conv.items()},
            ssm={i: t.clone() for i, t in self.ssm.items()},
            length=self.length,
        )

    def mamba_states(self) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """A copy of the Mamba states only: the "S−2" snapshot that mock-AR needs."""
        return ({i: t.clone() for i, t in self.conv.items()},
                {i: t.clone() for i, t in self.ssm.items()})

    def one_token_back(self, conv: dict[int, torch.Tensor], ssm: dict[int, torch.Tensor]
                       ) -> "TowerCache":
        """Mock-AR's denoiser view (spec §4.7): the given S−2 Mamba states and KV[:−1]."""
        if self.length < 1:
            raise ValueError("one_token_back needs a cache that has consumed a token")
        return TowerCache(
            keys={i: t[:, :, :-1].clone() for i, t in self.keys.items()},
            values={i: t[:, :, :-1].clone() for i, t in self.values.items()},
            conv={i: t.clone() for i, t in conv.items()},
            ssm={i: t.clone() for i, t in ssm.items()},
            length=self.length - 1,
        )

    def select_rows(self, rows: torch.Tensor | list[int]) -> "TowerCache":
        """The cache of a subset of the batch rows (a request leaving or joining a batch)."""
        index = torch.as_tensor(rows, dtype=torch.long)
        pick = {name: {i: t.index_select(0, index.to(t.device)) for i, t in part.items()}
                for name, part in (("keys", self.keys), ("values", self.values),
                                   ("conv", self.conv), ("ssm", self.ssm))}
        return TowerCache(**pick, length=self.length)
