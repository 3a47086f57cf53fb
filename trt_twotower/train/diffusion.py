"""Stage (b): the denoiser, trained with the masked-diffusion objective while the context
tower stays frozen (spec §4, §6.2).

A sample is a clean prefix (its cache built by the frozen context tower) followed by a block of
S tokens; each block position is masked with probability t ~ U(0, 1] (at least one), the
denoiser sees the masked block with t = the block's masked fraction through adaLN, and the loss
is cross-entropy on the masked positions. A window is walked block by block: the frozen
context tower extends its cache by each clean block (as generation does, spec §4.6), and the
denoiser learns every block of the window against the cache of what precedes it, so one pass
of the context tower supervises all of the window's blocks. The weight 1/t of the MDLM bound
is dropped, as the paper reports doing "for stability" (spec §6.2), so the loss is the plain
mean over masked tokens. Predictions are position-aligned: block position j predicts the
token at prefix + j.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..reference.cache import TowerCache
from ..reference.loading import TOWER_GROUPS
from ..reference.model import TwoTowerModel
from .ar import sample_windows
from .schedule import Trainer


@torch.no_grad()
def initialise_denoiser_from_backbone(model: TwoTowerModel) -> None:
    """Copy the AR backbone into the denoiser and start the modulation at identity
    (shift 0, scale 0, gate 1), so training begins from the AR model's features."""
    model.denoiser_tower.load_state_dict(model.context_tower.state_dict())
    model.lm_head.weight.copy_(model.context_lm_head.weight)
    final = model.t_block[1]
    final.weight.zero_()
    final.bias.zero_()
    for table in model.scale_shift_tables:
        table.zero_()
        table[2].fill_(1.0)


def mask_block(block: torch.Tensor, mask_id: int, gen: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked block, mask): t ~ U(0, 1] per row, each position masked with probability t,
    at least one per row."""
    rows, width = block.shape
    t = 1.0 - torch.rand(rows, 1, generator=gen)
    mask = torch.rand(rows, width, generator=gen) < t
    forced = torch.randint(0, width, (rows,), generator=gen)
    mask[torch.arange(rows), forced] = True
    return torch.where(mask, torch.full_like(block, mask_id), block), mask


def diffusion_loss(model: TwoTowerModel, windows: torch.Tensor, prefix: int, block: int,
                   gen: torch.Generator) -> torch.Tensor:
    """Mean cross-entropy over the masked positions of every whole block after ``prefix``."""
    blocks = (windows.shape[1] - prefix) // block
    if prefix < 1 or blocks < 1:
        raise ValueError(f"a window of {windows.shape[1]} tokens has no block of {block} after "
                         f"a prefix of {prefix}")
    with torch.no_grad():
        cache = model.new_cache(windows.shape[0])
        model.context_step(windows[:, :prefix], cache)
    total, masked = windows.new_zeros((), dtype=torch.float32), 0
    for k in range(blocks):
        target = windows[:, prefix + k * block:prefix + (k + 1) * block]
        noisy, mask = mask_block(target, model.config.mask_token_id, gen)
        logits = model.denoiser_step(noisy, mask.float().mean(-1), _read_only_view(cache))
        total = total + torch.nn.functional.cross_entropy(logits[mask], target[mask],
                                                          reduction="sum")
        masked += int(mask.sum())
        if k + 1 < blocks:
            with torch.no_grad():
                model.context_step(target, cache)
    return total / masked


def _read_only_view(cache: TowerCache) -> TowerCache:
    """The cache as it is now: extending the original replaces its tensors (never writes into
    them), so new dicts over the same tensors stay valid for the backward pass."""
    return TowerCache(keys=dict(cache.keys), values=dict(cache.values), conv=dict(cache.conv),
                      ssm=dict(cache.ssm), length=cache.length)


def train_denoiser(model: TwoTowerModel, stream: torch.Tensor, steps: int, batch: int,
                   window: int, block: int, lr: float, seed: int, progress: bool = True,
                   on_step: Callable[[int, float], None] = lambda s, l: None) -> list[float]:
    """Trains the denoiser side in place; the context tower is frozen. Each step draws a
    prefix length in [1, block] (so block boundaries fall anywhere in the text) and learns the
    whole blocks of ``window`` tokens after it."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(TOWER_GROUPS["denoiser"]))
    params = [p for p in model.parameters() if p.requires_grad]
    trainer = Trainer(params, lr, steps, desc="denoiser", progress=progress)
    for step in range(steps):
        prefix = int(torch.randint(1, block + 1, (1,), generator=gen))
        blocks = (window - prefix) // block
        windows = sample_windows(stream, batch, prefix + blocks * block, gen)
        on_step(step, trainer.step(diffusion_loss(model, windows, prefix, block, gen)))
    return trainer.losses
