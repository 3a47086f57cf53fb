"""``trt-twotower convert``: checkpoint → per-tower ONNX network definitions."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import click
import torch

from .. import names
from ..export.attention import LOWERINGS
from ..export.convert import DEFAULT_MAX_CONTEXT, EXPORT_DTYPES
from ..reference.quantization import DEFAULT_BLOCK_SIZE, MODES, SCOPES, QuantRecipe
from .options import Dtype, source_argument_options

F = Callable[..., Any]
CALIBRATION_LENGTH = 128   # tokens per calibration window: a prompt, then a 16-token block


def quantize_options(func: F) -> F:
    """--quantize, --quantize-scope, --quantize-block-size (`convert`, `build`, `plan`)."""
    func = click.option("--quantize-block-size", type=click.IntRange(min=1),
                        default=DEFAULT_BLOCK_SIZE, show_default=True,
                        help="int4: input channels per scale (a GEMM whose width it does not "
                             "divide uses the largest divisor below it).")(func)
    func = click.option("--quantize-scope", type=click.Choice(SCOPES), default=SCOPES[0],
                        show_default=True,
                        help="experts: routed and shared experts; experts+mamba: also Mamba "
                             "in/out projections; all-gemms: also attention projections and "
                             "dense MLPs. Router, norms, SSM scan, attention, heads never.")(func)
    return click.option("--quantize", type=click.Choice(MODES), default="none",
                        show_default=True,
                        help="GEMM weight quantisation: fp8 (E4M3 weights and activations), "
                             "int4-awq or int4-rtn (weight-only). docs/quantization.md")(func)


def calibration_options(func: F) -> F:
    """Where fp8 and int4-awq calibrate (`convert`, `build`)."""
    func = click.option("--calibration-prompts", type=click.IntRange(min=1), default=32,
                        show_default=True,
                        help=f"Calibration windows of {CALIBRATION_LENGTH} tokens.")(func)
    return click.option("--calibration-text", type=click.Path(exists=True, dir_okay=False,
                                                              path_type=Path),
                        help="Plain text to calibrate on. Default: held-out text of the "
                             "built-in corpus (trt_twotower/train/corpus.py).")(func)


def calibration_windows(recipe: QuantRecipe, tokenizer: Any, text: Optional[Path],
                        prompts: int, length: int = CALIBRATION_LENGTH
                        ) -> Optional[torch.Tensor]:
    """[prompts, length] token ids to calibrate on, or None where the recipe calibrates
    nothing: consecutive windows of the given text, else of the held-out corpus."""
    if not recipe.needs_calibration:
        return None
    if text is not None:
        ids = torch.tensor(tokenizer.encode(text.read_text(encoding="utf-8", errors="replace")),
                           dtype=torch.long)
    else:
        from ..train.corpus import token_stream

        ids = token_stream(tokenizer, "heldout", max_tokens=prompts * length)
    count = min(prompts, len(ids) // length)
    if count == 0:
        raise click.ClickException(f"the calibration text has {len(ids)} tokens; it needs at "
                                   f"least {length}")
    return ids[:count * length].reshape(count, length)


@click.command("convert")
@source_argument_options
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output directory for the graphs, config, tokenizer and manifest.")
@click.option("--lowering", type=click.Choice(LOWERINGS), default="native", show_default=True,
              help="native: standard ONNX ops only (ONNX Runtime, TensorRT-RTX); plugin: the "
                   "denoiser's cross-attention and unmask as trt_twotower custom ops.")
@click.option("--dtype", type=Dtype(tuple(EXPORT_DTYPES)), default="float32",
              show_default=True, help="float32 for CPU parity; bfloat16/float16 for engines.")
@click.option("--max-context", type=int, default=DEFAULT_MAX_CONTEXT, show_default=True,
              help="Positions preallocated in every KV cache (prompt + generated tokens).")
@click.option("--graph", "graphs", multiple=True, type=click.Choice(names.GRAPHS),
              help="Only these graphs (repeatable). Default: all.")
@quantize_options
@calibration_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
def convert_command(checkpoint: Optional[Path], preset_name: Optional[str], out: Path,
                    lowering: str, dtype: str, max_context: int, graphs: tuple[str, ...],
                    quantize: str, quantize_scope: str, quantize_block_size: int,
                    calibration_text: Optional[Path], calibration_prompts: int,
                    quiet: bool) -> None:
    """Write one step graph per tower (the context step: prefill, block commit, decode; the
    denoiser step: block step, fused unmask, mock-AR) with its weights as external data, plus
    config.json, tokenizer.json and a manifest draft, to OUT.

    CHECKPOINT is a TwoTower checkpoint directory; without it, --preset or the built-in model.
    """
    from ..export.convert import ConvertOptions, convert
    from ..export.moe import ExportError
    from .resolve import open_weights

    try:
        recipe = QuantRecipe(quantize, quantize_scope, quantize_block_size)
        options = ConvertOptions(lowering=lowering, dtype=dtype, max_context=max_context,
                                 graphs=graphs or names.GRAPHS, quantization=recipe)
        weights = open_weights(checkpoint, preset_name)
        windows = calibration_windows(recipe, weights.tokenizer, calibration_text,
                                      calibration_prompts)
        manifest = convert(weights.config, weights.get, out, options, weights.tokenizer,
                           weights.name, weights.digest, progress=not quiet,
                           calibration_windows=windows)
    except ExportError as err:
        raise click.ClickException(str(err)) from None
    total = sum(g.bytes for g in manifest.graphs.values())
    quantized = "" if quantize == "none" else f", {quantize} ({quantize_scope})"
    click.echo(f"wrote {len(manifest.graphs)} graphs ({total / 2**20:.1f} MiB, "
               f"{lowering}, {dtype}{quantized}, max context {max_context}) to {out}")
