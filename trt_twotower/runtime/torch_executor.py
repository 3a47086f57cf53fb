"""The PyTorch reference as a tower executor over the runtime's preallocated cache.

Rows of equal length run together; each group reads a ``TowerCache`` view of its valid prefix
and the new entries are written back. Slow by design: it is the ground truth backend.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .. import names
from ..reference.cache import TowerCache
from ..reference.model import TwoTowerModel
from .cache import StepCache


def _groups(cache: StepCache) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for row, length in enumerate(cache.lengths.tolist()):
        groups[length].append(row)
    return groups


def _view(model: TwoTowerModel, cache: StepCache, rows: list[int], length: int,
          device: torch.device) -> TowerCache:
    index = torch.tensor(rows, device=cache.device)
    c, t = model.config, cache.tensors
    pick = lambda name: t[name].index_select(0, index).to(device)  # noqa: E731
    return TowerCache(
        keys={i: pick(names.past_key(i))[:, :, :length] for i in c.attention_layers},
        values={i: pick(names.past_value(i))[:, :, :length] for i in c.attention_layers},
        conv={i: pick(names.conv_state(i)) for i in c.mamba_layers},
        ssm={i: pick(names.ssm_state(i)) for i in c.mamba_layers},
        length=length)


class TorchContextExecutor:
    def __init__(self, model: TwoTowerModel) -> None:
        self.model = model
        self.device = model.context_lm_head.weight.device

    @torch.no_grad()
    def context_step(self, input_ids: torch.Tensor, cache: StepCache) -> torch.Tensor:
        tokens = input_ids.shape[1]
        cache.check_room(tokens)
        logits = torch.empty(cache.batch, self.model.config.vocab_size)
        c = self.model.config
        for length, rows in _groups(cache).items():
            view = _view(self.model, cache, rows, length, self.device)
            index = torch.tensor(rows, device=cache.device)
            out = self.model.context_step(input_ids[rows].to(self.device), view)
            logits[rows] = out.cpu()
            for i in c.attention_layers:
                for name, new in ((names.past_key(i), view.keys[i]),
                                  (names.past_value(i), view.values[i])):
                    cache.tensors[name][index, :, length:length + tokens] = \
                        new[:, :, length:].to(cache.device)
            for i in c.mamba_layers:
                cache.tensors[names.conv_state(i)][index] = view.conv[i].to(cache.device)
                cache.tensors[names.ssm_state(i)][index] = view.ssm[i].to(cache.device)
        cache.lengths += tokens
        return logits


class TorchDenoiserExecutor:
    def __init__(self, model: TwoTowerModel) -> None:
        self.model = model
        self.device = model.lm_head.weight.device

    @torch.no_grad()
    def denoiser_step(self, block_ids: torch.Tensor, t: torch.Tensor, cache: StepCache
                      ) -> torch.Tensor:
        shape = (*block_ids.shape, self.model.config.vocab_size)
        logits = torch.empty(shape)
        for length, rows in _groups(cache).items():
            view = _view(self.model, cache, rows, length, self.device)
            logits[rows] = self.model.denoiser_step(block_ids[rows].to(self.device),
                                                    t[rows].to(self.device), view).cpu()
        return logits

    @torch.no_grad()
    def mock_ar_step(self, token_ids: torch.Tensor, cache: StepCache) -> torch.Tensor:
        logits = torch.empty(cache.batch, self.model.config.vocab_size)
        for length, rows in _groups(cache).items():
            view = _view(self.model, cache, rows, length, self.device)
            logits[rows] = self.model.mock_ar_step(token_ids[rows].to(self.device), view).cpu()
        return logits
