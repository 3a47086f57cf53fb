"""Resolve a command's model source once: a checkpoint, a preset or the built-in model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import click
import torch

from ..config import ConfigError, TwoTowerConfig


@dataclass
class WeightSource:
    """Weights by checkpoint name, read lazily where they come from a checkpoint."""

    config: TwoTowerConfig
    get: Callable[[str], torch.Tensor]
    tokenizer: Any
    name: str
    digest: Optional[str]


def open_weights(checkpoint: Optional[Path], preset_name: Optional[str]) -> WeightSource:
    from ..checkpoint import CheckpointError, CheckpointReader
    from ..reference.sources import open_source
    from ..tokenizer import load_tokenizer

    try:
        if checkpoint is not None:
            reader = CheckpointReader(checkpoint)
            return WeightSource(reader.config, reader.read, load_tokenizer(checkpoint),
                                str(Path(checkpoint).resolve()), reader.digest())
        source = open_source(None, preset_name)
    except (CheckpointError, ConfigError) as err:
        raise click.ClickException(str(err)) from None
    state = source.model.state_dict()
    digest = None
    if source.checkpoint_dir is not None:
        digest = CheckpointReader(source.checkpoint_dir).digest()
    return WeightSource(source.config, state.__getitem__, source.tokenizer,
                        source.name if source.checkpoint_dir is None
                        else str(source.checkpoint_dir), digest)


def open_model_source(checkpoint: Optional[Path], preset_name: Optional[str],
                      dtype: Optional[str] = None, context_device: str = "cpu",
                      denoiser_device: Optional[str] = None):
    """The reference model with clear CLI errors for bad checkpoints."""
    from ..checkpoint import CheckpointError
    from ..reference.sources import open_source

    try:
        return open_source(checkpoint, preset_name, dtype, context_device, denoiser_device)
    except (CheckpointError, ConfigError, ValueError) as err:
        raise click.ClickException(str(err)) from None
