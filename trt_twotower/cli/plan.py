"""``trt-twotower plan``: each GPU's memory at given build settings, before building anything."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import click
from click.core import ParameterSource

from ..config import ConfigError, TwoTowerConfig
from ..engine.build import BuildOptions
from ..engine.memory_plan import (DENOISER_EXPERTS_TOUCHED, GIB, GPUS, EngineActivation,
                                  MemoryPlanError, check_fits, describe_largest_context,
                                  describe_settings, format_largest, format_plan,
                                  format_traffic, plan_memory, reported_activation)
from ..export.convert import DEFAULT_MAX_CONTEXT
from ..reference.quantization import QuantRecipe
from .convert import quantize_options
from .options import ENGINE_DTYPES, Dtype, source_argument_options
from .resolve import model_config

LARGEST_CONTEXTS = (1024, 4096, 8192, 32768, 131072)
# What a BUILD_DIR fixes (parameter: flag): giving one with it is an error, not an override.
BUILD_SETTINGS = {"preset_name": "--preset", "dtype": "--dtype", "max_batch": "--max-batch",
                  "max_context": "--max-context", "block_size": "--block-size",
                  "max_prefill": "--max-prefill", "quantize": "--quantize",
                  "quantize_scope": "--quantize-scope",
                  "quantize_block_size": "--quantize-block-size"}
POSITIVE = click.IntRange(min=1)
BUILD_DEFAULTS = BuildOptions()               # the same defaults as `trt-twotower build`


def read_build(build_dir: Path) -> tuple[TwoTowerConfig, dict, dict[str, int]]:
    """(config, build settings, builder-reported activation per tower) of a ``trt-twotower
    build`` directory, from its manifest and each engine's build summary."""
    from ..engine.build_log import read_summary
    from ..manifest import Manifest, ManifestError

    try:
        manifest = Manifest.load(build_dir)
        context, denoiser = manifest.engine_of("context"), manifest.engine_of("denoiser")
    except ManifestError as err:
        raise click.ClickException(str(err)) from None
    build = manifest.build
    q = manifest.quantization
    settings = {"dtype": manifest.dtype, "max_context": manifest.max_context,
                "max_batch": build.max_batch, "block_size": build.block_size,
                "max_prefill": build.max_prefill, "context_device": context.device,
                "denoiser_device": denoiser.device,
                "quantization": None if q is None else QuantRecipe(q.mode, q.scope,
                                                                   q.block_size)}
    records = [EngineActivation(e.tower, (read_summary(build_dir / e.build_summary)
                                          or {}).get("activation_bytes"))
               for e in (context, denoiser)]
    return manifest.config, settings, reported_activation(records)


def build_plan_text(build_dir: Path, gpu_memory: Optional[float] = None) -> str:
    """The memory plan of a build (its settings, the builder's activation figures), as
    `build` prints it in its summary and `inspect` shows it."""
    config, settings, activation = read_build(build_dir)
    plan = plan_memory(config, **settings, activation_bytes=activation)
    memory = None if gpu_memory is None else int(gpu_memory * GIB)
    label = f"{gpu_memory:g} GiB GPU" if gpu_memory is not None else "GPU"
    return (f"memory plan: {describe_settings(plan)}\n\n"
            + format_plan(plan, memory, label))


def _explicit(ctx: click.Context, names: Iterable[str]) -> list[str]:
    """The parameters the user gave rather than left at their defaults."""
    return [n for n in names if ctx.get_parameter_source(n) not in (ParameterSource.DEFAULT,
                                                                   None)]


def _gpu_memory(ctx: click.Context, gpu: str, gpu_memory: Optional[float]) -> tuple[int, str]:
    if gpu_memory is None:
        return GPUS[gpu].memory_bytes, GPUS[gpu].label
    if _explicit(ctx, ("gpu",)):
        raise click.UsageError("give --gpu or --gpu-memory, not both")
    return int(gpu_memory * GIB), f"{gpu_memory:g} GiB GPU"


@click.command("plan")
@source_argument_options
@click.option("--dtype", type=Dtype(ENGINE_DTYPES), default="bfloat16",
              show_default=True)
@click.option("--max-batch", type=POSITIVE, default=BUILD_DEFAULTS.max_batch, show_default=True)
@click.option("--max-context", type=POSITIVE, default=DEFAULT_MAX_CONTEXT, show_default=True)
@click.option("--block-size", type=POSITIVE, default=BUILD_DEFAULTS.block_size,
              show_default=True)
@click.option("--max-prefill", type=POSITIVE, default=BUILD_DEFAULTS.max_prefill,
              show_default=True)
@click.option("--context-device", type=click.IntRange(min=0),
              default=BUILD_DEFAULTS.context_device, show_default=True,
              help="GPU index of the context tower.")
@click.option("--denoiser-device", type=click.IntRange(min=0),
              default=BUILD_DEFAULTS.denoiser_device, show_default=True,
              help="GPU index of the denoiser tower (the same index: one GPU holds both).")
@click.option("--gpu", type=click.Choice(sorted(GPUS)), default="h100-80gb", show_default=True,
              help="GPU model, by the memory CUDA reports for it.")
@click.option("--gpu-memory", type=click.FloatRange(min=0, min_open=True),
              help="GPU memory in GiB, instead of --gpu.")
@click.option("--reserve", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="GiB per GPU set aside for the CUDA context, kernel libraries and allocator "
                   "slack.")
@quantize_options
@click.pass_context
def plan_command(ctx: click.Context, checkpoint: Optional[Path], preset_name: Optional[str],
                 dtype: str, max_batch: int, max_context: int, block_size: int,
                 max_prefill: int, context_device: int, denoiser_device: int, gpu: str,
                 gpu_memory: Optional[float], reserve: float, quantize: str,
                 quantize_scope: str, quantize_block_size: int) -> None:
    """Each GPU's memory (weights, caches, activations, buffers, headroom) at these settings,
    and the largest batch per max context that fits; exits 1 if a GPU is overfilled.

    CHECKPOINT is a checkpoint directory (its config only: no weights are read) or a BUILD_DIR
    of `trt-twotower build`, whose manifest fixes the settings and whose build summaries give
    the engines' activation memory; without it, --preset or the built-in model.

    Then, per --quantize mode at --quantize-scope, the bytes a batch-1 AR step and a block's
    denoiser step read and the step-time floor H100 and H200 bandwidth sets.
    """
    memory, label = _gpu_memory(ctx, gpu, gpu_memory)
    settings = {"dtype": dtype, "max_batch": max_batch,
                "max_context": max_context,
                "block_size": block_size, "max_prefill": max_prefill,
                "context_device": context_device, "denoiser_device": denoiser_device,
                "quantization": QuantRecipe(quantize, quantize_scope, quantize_block_size)}
    activation: dict[str, int] = {}
    try:
        if checkpoint is not None and (checkpoint / "manifest.json").is_file():
            fixed = _explicit(ctx, BUILD_SETTINGS)
            if fixed:
                raise click.UsageError("a BUILD_DIR fixes the model and build settings; drop "
                                       + ", ".join(BUILD_SETTINGS[n] for n in fixed))
            config, built, activation = read_build(checkpoint)
            settings.update({k: v for k, v in built.items() if not _explicit(ctx, (k,))})
            name = f"build {checkpoint}"
        else:
            config, name = model_config(checkpoint, preset_name)
        plan = plan_memory(config, **settings, activation_bytes=activation,
                           reserve_bytes=int(reserve * GIB))
    except (ConfigError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"memory plan of {name}: {describe_settings(plan)}\n")
    click.echo(format_plan(plan, memory, label))
    contexts = [c for c in LARGEST_CONTEXTS if c <= config.max_position_embeddings]
    click.echo(f"\nlargest max batch that fits the {label}, per max context (activations "
               "estimated):\n")
    click.echo(format_largest(plan, memory, contexts))
    click.echo("\n" + describe_largest_context(plan, memory))
    recipe = settings["quantization"] or QuantRecipe()
    low, high = DENOISER_EXPERTS_TOUCHED
    click.echo(f"\nbandwidth floor at batch 1, scope {recipe.scope} (int4 block "
               f"{recipe.block_size}), {plan.max_context:,} cached tokens: an AR step reads "
               f"{config.num_experts_per_tok} routed experts per MoE layer, a "
               f"{plan.block_size}-token denoiser step {low}–{high} (issue 19's measurements), "
               "each with the shared expert; for a MoE kernel that reads only routed experts "
               "(the native ONNX lowering reads all of them: its floor is the weights' "
               "bytes / bandwidth):\n")
    click.echo(format_traffic(config, plan.dtype, recipe.scope, recipe.block_size,
                              plan.max_context, plan.block_size))
    try:
        check_fits(plan, memory, f"the {label}")
    except MemoryPlanError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"\nfits: {min(memory - g.total for g in plan.gpus) / GIB:,.2f} GiB headroom on "
               "the fullest GPU")
