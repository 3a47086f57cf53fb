"""``trt-twotower build``: checkpoint → per-GPU TensorRT engines + manifest, in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from .. import names
from ..engine.build import RTX_COMPUTE_CAPABILITIES
from .options import source_argument_options

DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


@click.command("build")
@source_argument_options
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Build directory: graphs, engines, build logs, manifest.")
@click.option("--context-device", type=int, default=0, show_default=True,
              help="GPU index of the context tower's engine.")
@click.option("--denoiser-device", type=int, default=1, show_default=True,
              help="GPU index of the denoiser's engines.")
@click.option("--flavor", type=click.Choice(["auto", "tensorrt", "tensorrt-rtx"]),
              default="auto", show_default=True,
              help="TensorRT (GPU hosts) or TensorRT-RTX (builds without a GPU); auto prefers "
                   "TensorRT.")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="bf16", show_default=True)
@click.option("--lowering", type=click.Choice(["native", "plugin"]), default="native",
              show_default=True, help="plugin: the denoiser's custom ops, for full TensorRT with the "
                                      "plugin library (see --allow-rtx-plugins).")
@click.option("--max-batch", type=int, default=4, show_default=True)
@click.option("--max-context", type=int, default=1024, show_default=True)
@click.option("--block-size", type=int, default=16, show_default=True)
@click.option("--max-prefill", type=int, default=256, show_default=True,
              help="Longest prompt chunk the context engine takes in one step.")
@click.option("--graph", "graphs", multiple=True, type=click.Choice(names.GRAPHS),
              help="Only these graphs (repeatable). Default: all four.")
@click.option("--compute-capability", "ccs", multiple=True,
              default=RTX_COMPUTE_CAPABILITIES, show_default=True,
              help="TensorRT-RTX targets (repeatable), e.g. SM86, SM89, SM120; 'none' for "
                   "TensorRT-RTX's default.")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path),
              help="Reuse and update this timing cache file (TensorRT; a no-op in RTX).")
@click.option("--allow-rtx-plugins", is_flag=True,
              help="Build plugin-lowering graphs on TensorRT-RTX anyway, each in a child "
                   "process (its plugin path is private and aborts a process it fails in).")
def build_command(checkpoint: Optional[Path], preset_name: Optional[str], out: Path,
                  context_device: int, denoiser_device: int, flavor: str, dtype: str,
                  lowering: str, max_batch: int, max_context: int, block_size: int,
                  max_prefill: int, graphs: tuple[str, ...], ccs: tuple[str, ...],
                  timing_cache: Optional[Path], allow_rtx_plugins: bool) -> None:
    """Convert the model (CHECKPOINT, --preset, or the built-in) and build one engine per
    tower graph for its GPU, with a manifest every consumer validates."""
    from tqdm import tqdm

    from ..engine.build import BuildError, BuildOptions, build_engines
    from ..engine.flavor import FlavorError, find_flavor
    from ..export.convert import ConvertOptions, convert
    from ..export.moe import ExportError
    from .resolve import open_weights

    graphs = graphs or names.GRAPHS
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
        weights = open_weights(checkpoint, preset_name)
        click.echo(f"converting {weights.name} ({DTYPES[dtype]}, {lowering} lowering)")
        convert(weights.config, weights.get, out,
                ConvertOptions(lowering=lowering, dtype=DTYPES[dtype], max_context=max_context,
                               graphs=graphs),
                weights.tokenizer, weights.name, weights.digest)
        with tqdm(total=len(graphs), desc="build", unit="engine") as bar:
            def progress(graph: str, record: Optional[dict]) -> None:
                if record is None:
                    bar.set_postfix_str(graph)
                    return
                bar.write(f"  {graph}: {record['file']} {record['bytes'] / 2**20:.1f} MiB in "
                          f"{record['build_seconds']:.1f} s (GPU {record['device']})")
                bar.update(1)
            manifest = build_engines(out, options, progress=progress)
    except (ExportError, BuildError, FlavorError) as err:
        raise click.ClickException(str(err)) from None
    total = sum(e["bytes"] for e in manifest["engines"].values())
    click.echo(f"built {len(manifest['engines'])} engines ({total / 2**20:.1f} MiB, "
               f"{dtype}) in {out}; see `trt-twotower inspect {out}`")
