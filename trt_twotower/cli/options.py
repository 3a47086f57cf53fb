"""Options that several commands share, written once so they read the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from ..config import PRESETS

F = Callable[..., Any]


def model_source_options(func: F) -> F:
    """--checkpoint / --preset: where the model comes from (default: the built-in model)."""
    func = click.option("--preset", "preset_name", type=click.Choice(sorted(PRESETS)),
                        help="Random weights of a named configuration instead of a checkpoint.")(func)
    return click.option("--checkpoint", type=click.Path(exists=True, file_okay=False,
                                                         path_type=Path),
                        help="A TwoTower checkpoint directory (config.json, safetensors, "
                             "tokenizer.json). Default: the built-in model.")(func)


def dtype_option(default: str = "float32") -> Callable[[F], F]:
    return click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
                        default=default, show_default=True,
                        help="Precision the model computes in.")


def source_argument_options(func: F) -> F:
    """[CHECKPOINT] / --preset: the model to convert or build (default: the built-in)."""
    func = click.option("--preset", "preset_name", type=click.Choice(sorted(PRESETS)),
                        help="Random weights of a named configuration instead of a checkpoint.")(func)
    return click.argument("checkpoint", required=False,
                          type=click.Path(exists=True, file_okay=False, path_type=Path))(func)
