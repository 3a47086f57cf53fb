"""Stage (a): an autoregressive backbone of the TwoTower architecture, next-token loss,
trained through the reference model's own context tower (spec §6.2: the released towers start
from a pretrained NemotronH)."""

from __future__ import annotations

from typing import Callable

import torch

from ..reference.loading import TOWER_GROUPS
from ..reference.model import TwoTowerModel
from .schedule import Trainer


def sample_windows(stream: torch.Tensor, batch: int, length: int, gen: torch.Generator
                   ) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - length, (batch,), generator=gen)
    return torch.stack([stream[s:s + length] for s in starts.tolist()])


def ar_loss(model: TwoTowerModel, windows: torch.Tensor) -> torch.Tensor:
    logits = model.context_logits(windows[:, :-1], model.new_cache(windows.shape[0]))
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             windows[:, 1:].reshape(-1))


def train_ar(model: TwoTowerModel, stream: torch.Tensor, steps: int, batch: int, length: int,
             lr: float, seed: int, progress: bool = True,
             on_step: Callable[[int, float], None] = lambda s, l: None) -> list[float]:
    """Trains the context tower and its head in place; returns the loss per step."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for n, p in model.named_parameters() if n.startswith(TOWER_GROUPS["context"])]
    trainer = Trainer(params, lr, steps, desc="AR backbone", progress=progress)
    for step in range(steps):
        loss = trainer.step(ar_loss(model, sample_windows(stream, batch, length + 1, gen)))
        on_step(step, loss)
    return trainer.losses
