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


def one_source(checkpoint: Optional[Path], preset_name: Optional[str]) -> None:
    """A checkpoint and --preset name two different models: refuse both rather than silently
    use one of them."""
    if checkpoint is not None and preset_name is not None:
        raise click.UsageError(f"give a checkpoint ({checkpoint}) or --preset {preset_name}, "
                               "not both: --preset means random weights")


def open_weights(checkpoint: Optional[Path], preset_name: Optional[str]) -> WeightSource:
    """The weights to convert: a checkpoint's, read lazily by name once every tensor's shape
    is checked against its config (a wrong shape would broadcast into a wrong graph), or a
    preset's / the built-in model's."""
    from ..checkpoint import CheckpointError, CheckpointReader
    from ..reference.loading import TOWER_GROUPS, expected_shapes
    from ..reference.sources import open_source
    from ..tokenizer import load_tokenizer

    one_source(checkpoint, preset_name)
    try:
        if checkpoint is not None:
            reader = CheckpointReader(checkpoint)
            for tower, prefixes in TOWER_GROUPS.items():
                reader.check_tower(prefixes, expected_shapes(reader.config, [tower]))
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


def model_config(source: Optional[Path], preset_name: Optional[str]
                 ) -> tuple[TwoTowerConfig, str]:
    """(config, name) of a checkpoint, a preset or the built-in model; never its weights, so
    plans and checks of the released model cost nothing."""
    from ..config import preset
    from ..reference.sources import BUILTIN_PRESET, builtin_checkpoint

    one_source(source, preset_name)
    if preset_name is not None:
        return preset(preset_name), f"preset {preset_name}"
    directory = source or builtin_checkpoint()
    if directory is None:
        return preset(BUILTIN_PRESET), f"built-in preset {BUILTIN_PRESET}"
    if not (directory / "config.json").is_file():
        raise click.ClickException(f"{directory} has no config.json: it is not a checkpoint")
    return TwoTowerConfig.load(directory), str(directory)


def open_model_source(checkpoint: Optional[Path], preset_name: Optional[str],
                      dtype: Optional[str] = None, context_device: str = "cpu",
                      denoiser_device: Optional[str] = None, need_tokenizer: bool = True):
    """The reference model with clear CLI errors for bad checkpoints. A caller that brings
    its own token ids (``need_tokenizer=False``) can open a checkpoint that has no
    tokenizer.json; its ``tokenizer`` is then None."""
    from ..checkpoint import CheckpointError
    from ..reference.sources import open_source
    from ..tokenizer import TOKENIZER_FILE

    one_source(checkpoint, preset_name)
    try:
        if (not need_tokenizer and checkpoint is not None
                and not (Path(checkpoint) / TOKENIZER_FILE).is_file()):
            return _source_without_tokenizer(checkpoint, dtype, context_device,
                                             denoiser_device)
        return open_source(checkpoint, preset_name, dtype, context_device, denoiser_device)
    except (CheckpointError, ConfigError, ValueError) as err:
        raise click.ClickException(str(err)) from None


def _source_without_tokenizer(checkpoint: Path, dtype: Optional[str], context_device: str,
                              denoiser_device: Optional[str]):
    """A checkpoint's model as ``open_source`` loads it, with no tokenizer."""
    from ..reference.loading import load_model
    from ..reference.sources import DTYPES, ModelSource

    model = load_model(checkpoint, dtype=DTYPES[dtype] if dtype else None,
                       context_device=context_device, denoiser_device=denoiser_device)
    return ModelSource(model.eval().requires_grad_(False), None, str(checkpoint),
                       Path(checkpoint))
