"""Both towers, both LM heads and the time conditioning, named as in the checkpoint (spec §3).

``TwoTowerModel`` exposes the step functions every executor implements: a context step (prefill,
block extension, AR decode), a diffusion denoiser step and mock-AR's one-token denoiser step.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import TwoTowerConfig
from .cache import TowerCache
from .denoiser import denoise
from .timestep import TimestepEmbedder
from .tower import Tower

# Parameters declared fp32 in the released model: they keep fp32 whatever the model dtype.
FP32_PARAMETERS = ("mixer.gate.weight", "mixer.gate.e_score_correction_bias")


class TwoTowerModel(nn.Module):
    def __init__(self, config: TwoTowerConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.context_tower = Tower(config)
        self.context_lm_head = nn.Linear(h, config.vocab_size, bias=False)
        self.denoiser_tower = Tower(config)
        self.lm_head = nn.Linear(h, config.vocab_size, bias=False)
        self.t_embedder = TimestepEmbedder(h)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(h, 3 * h))
        self.scale_shift_tables = nn.ParameterList(
            nn.Parameter(torch.zeros(3, h)) for _ in range(config.num_hidden_layers))

    @property
    def dtype(self) -> torch.dtype:
        return self.context_lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.context_lm_head.weight.device

    def to_dtype(self, dtype: torch.dtype) -> "TwoTowerModel":
        """Cast to ``dtype`` except the parameters the spec keeps in fp32 (router)."""
        for name, tensor in [*self.named_parameters(), *self.named_buffers()]:
            keep = name.endswith(FP32_PARAMETERS)
            tensor.data = tensor.data.to(torch.float32 if keep else dtype)
        return self

    def new_cache(self, batch: int) -> TowerCache:
        return TowerCache.empty(self.config, batch, self.dtype, self.device)

    # --- context tower ---------------------------------------------------------------------
    def context_logits(self, input_ids: torch.Tensor, cache: TowerCache) -> torch.Tensor:
        """fp32 logits [B, T, V] for every new position; the cache is extended in place."""
        return self.context_lm_head(self.context_tower(input_ids, cache)).float()

    def context_step(self, input_ids: torch.Tensor, cache: TowerCache) -> torch.Tensor:
        """Consume tokens, return the last position's fp32 logits [B, V]."""
        hidden = self.context_tower(input_ids, cache)
        return self.context_lm_head(hidden[:, -1]).float()

    # --- denoiser --------------------------------------------------------------------------
    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] (masked fraction) → the shared modulation embedding [B, 3·hidden]."""
        return self.t_block(self.t_embedder(t))

    def denoiser_step(self, block_ids: torch.Tensor, t: torch.Tensor, context: TowerCache
                      ) -> torch.Tensor:
        """fp32 logits [B, S, V] for a block, conditioned on t [B] and the context cache
        (read only); position j predicts the token at context length + j."""
        hidden = denoise(self.denoiser_tower, block_ids, self.time_embedding(t),
                         self.scale_shift_tables, context)
        return self.lm_head(hidden).float()

    def mock_ar_step(self, token_ids: torch.Tensor, view: TowerCache) -> torch.Tensor:
        """Mock-AR (spec §5.2): the denoiser, unmodulated, consumes the latest token through a
        throwaway view of the context cache one token back (``TowerCache.one_token_back``) and
        predicts the next token: fp32 logits [B, V]."""
        hidden = self.denoiser_tower(token_ids, view)
        return self.lm_head(hidden[:, -1]).float()
