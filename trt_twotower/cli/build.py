"""``trt-twotower build``: checkpoint → per-GPU TensorRT engines + manifest, in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click
from click.core import ParameterSource

from .. import names
from ..engine.build import FP8_COMPUTE_CAPABILITIES, RTX_COMPUTE_CAPABILITIES
from .convert import calibration_options, quantize_options
from .options import ENGINE_DTYPES, Dtype, source_argument_options


@click.command("build")
@source_argument_options
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Build directory: graphs, engines, build logs, manifest.")
@click.option("--context-device", type=click.IntRange(min=0), default=0, show_default=True,
              help="GPU index of the context tower's engine.")
@click.option("--denoiser-device", type=click.IntRange(min=0), default=1, show_default=True,
              help="GPU index of the denoiser's engines.")
@click.option("--flavor", type=click.Choice(["auto", "tensorrt", "tensorrt-rtx"]),
              default="auto", show_default=True,
              help="TensorRT (GPU hosts) or TensorRT-RTX (builds without a GPU); auto prefers "
                   "TensorRT.")
@click.option("--dtype", type=Dtype(ENGINE_DTYPES), default="bfloat16",
              show_default=True)
@click.option("--lowering", type=click.Choice(["native", "plugin"]), default="native",
              show_default=True, help="plugin: the denoiser's custom ops, for full TensorRT with the "
                                      "plugin library (see --allow-rtx-plugins).")
@click.option("--max-batch", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--max-context", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--block-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--max-prefill", type=click.IntRange(min=1), default=256, show_default=True,
              help="Longest prompt chunk the context engine takes in one step.")
@click.option("--graph", "graphs", multiple=True, type=click.Choice(names.GRAPHS),
              help="Only these towers' graphs (repeatable). Default: both.")
@click.option("--compute-capability", "ccs", multiple=True,
              default=RTX_COMPUTE_CAPABILITIES, show_default=True,
              help="TensorRT-RTX targets (repeatable), e.g. SM86, SM89, SM120; 'none' for "
                   "TensorRT-RTX's default. --quantize fp8 defaults to "
                   f"{', '.join(FP8_COMPUTE_CAPABILITIES)} (fp8 kernels).")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path),
              help="Reuse and update this timing cache file (TensorRT; a no-op in RTX).")
@click.option("--allow-rtx-plugins", is_flag=True,
              help="Build plugin-lowering graphs on TensorRT-RTX anyway, each in a child "
                   "process (its plugin path is private and aborts a process it fails in).")
@click.option("--gpu-memory", type=click.FloatRange(min=0, min_open=True),
              help="GiB of memory of each target GPU: refuse, before converting anything, "
                   "settings whose memory plan (`trt-twotower plan`) does not fit.")
@quantize_options
@calibration_options
@click.pass_context
def build_command(ctx: click.Context, checkpoint: Optional[Path], preset_name: Optional[str],
                  out: Path, context_device: int, denoiser_device: int, flavor: str, dtype: str,
                  lowering: str, max_batch: int, max_context: int, block_size: int,
                  max_prefill: int, graphs: tuple[str, ...], ccs: tuple[str, ...],
                  timing_cache: Optional[Path], allow_rtx_plugins: bool,
                  gpu_memory: Optional[float], quantize: str, quantize_scope: str,
                  quantize_block_size: int, calibration_text: Optional[Path],
                  calibration_prompts: int) -> None:
    """Convert the model (CHECKPOINT, --preset, or the built-in) and build one engine per
    tower on its GPU (each engine holds its tower's weights once and serves all of the
    tower's step types), with a manifest every consumer validates."""
    from tqdm import tqdm

    from ..config import ConfigError
    from ..engine.build import BuildError, BuildOptions, build_engines
    from ..engine.flavor import FlavorError, find_flavor
    from ..engine.memory_plan import GIB, MemoryPlanError, check_fits, plan_memory
    from ..export.convert import ConvertOptions, convert
    from ..export.moe import ExportError
    from ..manifest import EngineRecord, ManifestError
    from ..reference.quantization import FP8, QuantRecipe
    from .convert import calibration_windows
    from .plan import build_plan_text
    from .resolve import model_config, open_weights

    graphs = graphs or names.GRAPHS
    recipe = QuantRecipe(quantize, quantize_scope, quantize_block_size)
    if recipe.mode == FP8 and ctx.get_parameter_source("ccs") == ParameterSource.DEFAULT:
        ccs = FP8_COMPUTE_CAPABILITIES
    try:
        found = find_flavor(flavor)
        click.echo(f"TensorRT flavour: {found.name} {found.version}"
                   + (" (CPU-only build)" if found.is_rtx else ""))
        options = BuildOptions(flavor=found.name, context_device=context_device,
                               denoiser_device=denoiser_device, max_batch=max_batch,
                               block_size=block_size, max_prefill=max_prefill,
                               compute_capabilities=tuple(c for c in ccs if c.lower() != "none"),
                               timing_cache=timing_cache, allow_rtx_plugins=allow_rtx_plugins,
                               graphs=tuple(graphs))
        if gpu_memory is not None:
            config, _ = model_config(checkpoint, preset_name)
            check_fits(plan_memory(config, dtype, max_batch, max_context,
                                   block_size, max_prefill, context_device, denoiser_device,
                                   quantization=recipe),
                       int(gpu_memory * GIB), f"a {gpu_memory:g} GiB GPU")
        weights = open_weights(checkpoint, preset_name)
        click.echo(f"converting {weights.name} ({dtype}, {lowering} lowering)")
        convert(weights.config, weights.get, out,
                ConvertOptions(lowering=lowering, dtype=dtype,
                               max_context=max_context, graphs=graphs, quantization=recipe),
                weights.tokenizer, weights.name, weights.digest,
                calibration_windows=calibration_windows(recipe, weights.tokenizer,
                                                        calibration_text, calibration_prompts))
        with tqdm(total=len(graphs), desc="build", unit="engine") as bar:
            def progress(graph: str, record: Optional[EngineRecord]) -> None:
                if record is None:
                    bar.set_postfix_str(graph)
                    return
                bar.write(f"  {graph}: {record.file} {record.bytes / 2**20:.1f} MiB in "
                          f"{record.build_seconds:.1f} s ({record.tower} tower, GPU "
                          f"{record.device}, profiles {', '.join(record.profiles)})")
                bar.update(1)
            manifest = build_engines(out, options, progress=progress)
    except (ConfigError, ExportError, BuildError, FlavorError, ManifestError,
            MemoryPlanError) as err:
        raise click.ClickException(str(err)) from None
    total = sum(e.bytes for e in manifest.engines.values())
    if len(manifest.engines) == len(names.GRAPHS):
        click.echo("\n" + build_plan_text(out, gpu_memory))
    click.echo(f"built {len(manifest.engines)} engines ({total / 2**20:.1f} MiB, "
               f"{dtype}) in {out}; see `trt-twotower inspect {out}`")
