"""The PyTorch reference as a tower executor over the runtime's preallocated cache.

Every row of a step runs in one batch, whatever its cache length, as the step graphs and
engines run them: the view pads each row's past to the longest and tells attention where each
row's own past ends (``TowerCache.valid``); the new entries are written back at each row's own
positions. Rows that must wait for each other's lengths to line up would make a step's cost
depend on when its requests happened to arrive. Slow by design: it is the ground truth backend.
"""

from __future__ import annotations

import torch

from .. import names
from ..reference.cache import TowerCache
from ..reference.model import TwoTowerModel
from .cache import StepCache


def _view(model: TwoTowerModel, cache: StepCache, device: torch.device) -> TowerCache:
    """All rows as one reference cache, the past padded to the longest row; ``valid`` only
    when lengths differ (equal lengths take the reference's own unmasked path)."""
    lengths = cache.lengths
    longest = int(lengths.max()) if cache.batch else 0
    ragged = bool((lengths != longest).any())
    c, t = model.config, cache.tensors
    return TowerCache(
        keys={i: t[names.past_key(i)][:, :, :longest].to(device) for i in c.attention_layers},
        values={i: t[names.past_value(i)][:, :, :longest].to(device)
                for i in c.attention_layers},
        conv={i: t[names.conv_state(i)].to(device) for i in c.mamba_layers},
        ssm={i: t[names.ssm_state(i)].to(device) for i in c.mamba_layers},
        length=longest, valid=lengths.to(device) if ragged else None)


def _write_new(pool: torch.Tensor, new: torch.Tensor, lengths: torch.Tensor,
               ragged: bool) -> None:
    """New keys or values [B, H, T, D] into each row's positions lengths[b] .. + T (one
    slice when the rows were not ragged: every length is the same)."""
    tokens = new.shape[2]
    if not ragged:
        start = int(lengths[0])
        pool[:, :, start:start + tokens] = new.to(pool.device)
        return
    rows = torch.arange(pool.shape[0], device=pool.device)[:, None]
    positions = lengths.to(pool.device)[:, None] + torch.arange(tokens, device=pool.device)
    pool[rows, :, positions] = new.to(pool.device).permute(0, 2, 1, 3)


class TorchContextExecutor:
    def __init__(self, model: TwoTowerModel) -> None:
        self.model = model
        self.device = model.context_lm_head.weight.device

    @torch.no_grad()
    def context_step(self, input_ids: torch.Tensor, cache: StepCache) -> torch.Tensor:
        tokens = input_ids.shape[1]
        cache.check_room(tokens)
        c = self.model.config
        view = _view(self.model, cache, self.device)
        ragged = view.valid is not None
        logits = self.model.context_step(input_ids.to(self.device), view)
        for i in c.attention_layers:  # the view's keys are [padded past | new]
            for name, keys in ((names.past_key(i), view.keys[i]),
                               (names.past_value(i), view.values[i])):
                _write_new(cache.tensors[name], keys[:, :, -tokens:], cache.lengths, ragged)
        for i in c.mamba_layers:
            cache.tensors[names.conv_state(i)].copy_(view.conv[i])
            cache.tensors[names.ssm_state(i)].copy_(view.ssm[i])
        cache.lengths += tokens
        return logits


class TorchDenoiserExecutor:
    def __init__(self, model: TwoTowerModel) -> None:
        self.model = model
        self.device = model.lm_head.weight.device

    @torch.no_grad()
    def denoiser_step(self, block_ids: torch.Tensor, t: torch.Tensor, cache: StepCache
                      ) -> torch.Tensor:
        view = _view(self.model, cache, self.device)
        return self.model.denoiser_step(block_ids.to(self.device), t.to(self.device), view)

    @torch.no_grad()
    def mock_ar_step(self, token_ids: torch.Tensor, cache: StepCache) -> torch.Tensor:
        view = _view(self.model, cache, self.device)
        return self.model.mock_ar_step(token_ids.to(self.device), view)
