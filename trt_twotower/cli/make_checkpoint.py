"""``trt-twotower make-checkpoint``: a random checkpoint with the real names and layout."""

from __future__ import annotations

from pathlib import Path

import click

from ..config import PRESETS, preset
from .options import SEED, PositiveNumber


@click.command("make-checkpoint")
@click.option("--preset", "preset_name", type=click.Choice(sorted(PRESETS)), default="tiny",
              show_default=True, help="Configuration of the random model.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Weights are a function "
              "of the seed.")
@click.option("--max-shard-mb", type=PositiveNumber(), default=None,
              help="Split the weights into shards of at most this size, with an index file, "
                   "like the released checkpoint.")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
def make_checkpoint_command(preset_name: str, seed: int, max_shard_mb: float | None,
                            out: Path) -> None:
    """Write a random TwoTower checkpoint (config.json, safetensors, tokenizer) to OUT.

    The tensor names, shapes and layout are those of the released checkpoint, so everything
    that reads a real checkpoint can be tried on this one.
    """
    from ..reference.loading import make_random_checkpoint
    from ..tokenizer import builtin_tokenizer

    max_bytes = int(max_shard_mb * 2**20) if max_shard_mb is not None else None
    make_random_checkpoint(preset(preset_name), out, seed=seed, max_shard_bytes=max_bytes)
    builtin_tokenizer().save(out)
    click.echo(f"wrote a random {preset_name} checkpoint (seed {seed}) to {out}")
