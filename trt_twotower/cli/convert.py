"""``trt-twotower convert``: checkpoint → per-tower ONNX network definitions."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from .. import names
from ..export.attention import LOWERINGS
from ..export.convert import DEFAULT_MAX_CONTEXT, EXPORT_DTYPES
from .options import source_argument_options


@click.command("convert")
@source_argument_options
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output directory for the graphs, config, tokenizer and manifest.")
@click.option("--lowering", type=click.Choice(LOWERINGS), default="native", show_default=True,
              help="native: standard ONNX ops only (ONNX Runtime, TensorRT-RTX); plugin: the "
                   "denoiser's cross-attention and unmask as trt_twotower custom ops.")
@click.option("--dtype", type=click.Choice(sorted(EXPORT_DTYPES)), default="float32",
              show_default=True, help="float32 for CPU parity; bfloat16/float16 for engines.")
@click.option("--max-context", type=int, default=DEFAULT_MAX_CONTEXT, show_default=True,
              help="Positions preallocated in every KV cache (prompt + generated tokens).")
@click.option("--graph", "graphs", multiple=True, type=click.Choice(names.GRAPHS),
              help="Only these graphs (repeatable). Default: all.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def convert_command(checkpoint: Optional[Path], preset_name: Optional[str], out: Path,
                    lowering: str, dtype: str, max_context: int, graphs: tuple[str, ...],
                    quiet: bool) -> None:
    """Write the step graphs of both towers (context step, denoiser step, fused-unmask
    denoiser step, mock-AR step) with their weights as external data, plus config.json,
    tokenizer.json and a manifest draft, to OUT.

    CHECKPOINT is a TwoTower checkpoint directory; without it, --preset or the built-in model.
    """
    from ..export.convert import ConvertOptions, convert
    from ..export.moe import ExportError
    from .resolve import open_weights

    try:
        options = ConvertOptions(lowering=lowering, dtype=dtype, max_context=max_context,
                                 graphs=graphs or names.GRAPHS)
        weights = open_weights(checkpoint, preset_name)
        manifest = convert(weights.config, weights.get, out, options, weights.tokenizer,
                           weights.name, weights.digest, progress=not quiet)
    except ExportError as err:
        raise click.ClickException(str(err)) from None
    total = sum(g["bytes"] for g in manifest["graphs"].values())
    click.echo(f"wrote {len(manifest['graphs'])} graphs ({total / 2**20:.1f} MiB, "
               f"{lowering}, {dtype}, max context {max_context}) to {out}")
