"""Checkpoint ⇄ reference model, one tower group at a time (see ``checkpoint.py``).

The model is built on the meta device (no memory), then each group's tensors are read,
cast and placed on that group's device before the next group is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from ..checkpoint import CheckpointError, CheckpointReader, write_checkpoint
from ..config import TwoTowerConfig
from .init import initialise
from .model import FP32_PARAMETERS, TwoTowerModel

TOWER_GROUPS = {
    "context": ("context_tower.", "context_lm_head."),
    "denoiser": ("denoiser_tower.", "lm_head.", "t_embedder.", "t_block.",
                 "scale_shift_tables."),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def expected_shapes(config: TwoTowerConfig, towers: Sequence[str] = ("context", "denoiser")
                    ) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor of these tower groups with its shape (computed on meta)."""
    with torch.device("meta"):
        model = TwoTowerModel(config)
    prefixes = tuple(p for t in towers for p in TOWER_GROUPS[t])
    return {name: tuple(t.shape) for name, t in model.state_dict().items()
            if name.startswith(prefixes)}


def load_model(directory: str | Path, dtype: Optional[torch.dtype] = None,
               context_device: str | torch.device = "cpu",
               denoiser_device: Optional[str | torch.device] = None,
               towers: Sequence[str] = ("context", "denoiser")) -> TwoTowerModel:
    """Load the checkpoint one tower group at a time onto its device. A Triton tower model asks
    for its own tower only; the other group's parameters then stay on ``meta`` (no memory)."""
    unknown = set(towers) - set(TOWER_GROUPS)
    if unknown or not towers:
        raise ValueError(f"towers must be drawn from {', '.join(TOWER_GROUPS)}, got {towers!r}")
    reader = CheckpointReader(directory)
    config = reader.config
    dtype = dtype or DTYPES.get(config.torch_dtype, torch.float32)
    with torch.device("meta"):
        model = TwoTowerModel(config)
    devices = {"context": context_device, "denoiser": denoiser_device or context_device}
    for group in towers:
        prefixes = TOWER_GROUPS[group]
        tensors = reader.read_tower(prefixes, expected_shapes(config, [group]))
        placed = {name: t.to(device=devices[group],
                             dtype=torch.float32 if name.endswith(FP32_PARAMETERS) else dtype)
                  for name, t in tensors.items()}
        model.load_state_dict(placed, strict=False, assign=True)
        del tensors, placed
    wanted = tuple(p for group in towers for p in TOWER_GROUPS[group])
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_meta and n.startswith(wanted)]
    if left:
        raise CheckpointError(f"{directory}: no weights for {', '.join(left[:5])}")
    return model.eval().requires_grad_(False)


def save_model(model: TwoTowerModel, directory: str | Path,
               max_shard_bytes: Optional[int] = None) -> Path:
    return write_checkpoint(directory, model.config, model.state_dict(), max_shard_bytes)


def make_random_checkpoint(config: TwoTowerConfig, directory: str | Path, seed: int = 0,
                           max_shard_bytes: Optional[int] = None) -> Path:
    model = initialise(TwoTowerModel(config), seed)
    return save_model(model.to_dtype(DTYPES.get(config.torch_dtype, torch.float32)), directory,
                      max_shard_bytes)
