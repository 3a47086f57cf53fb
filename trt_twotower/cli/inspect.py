"""``trt-twotower inspect``: what a build directory holds, from its manifest and build logs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

from ..manifest import BuildSettings, EngineRecord, Profiles, TensorRecord


def engine_summary(build_dir: Path, engine: EngineRecord) -> Optional[dict]:
    """The engine's build-log summary (condensed again from the log if the summary is gone)."""
    from ..engine.build_log import read_summary, summarize

    summary = read_summary(build_dir / engine.build_summary)
    log = build_dir / engine.build_log
    if summary is None and log.is_file():
        summary = summarize(log.read_text(errors="replace").splitlines())
    return summary


def _summary_lines(summary: dict) -> list[str]:
    kinds = ", ".join(f"{k} ×{n}" for k, n in sorted(summary["layer_types"].items(),
                                                      key=lambda kv: -kv[1]))
    lines = [f"  engine: {summary['engine_layers']} layers ({kinds}); activation "
             f"memory {summary['activation_bytes'] / 2**20:.1f} MiB, weights memory "
             f"{summary['weights_bytes'] / 2**20:.1f} MiB (as the builder reports them)"]
    if summary["kernels"]:
        lines.append("  kernels: " + ", ".join(f"{k} ×{n}" for k, n in
                                                summary["kernels"].items()))
    lines.append("  fused attention: " + (", ".join(summary["fused_attention"]) or "none"))
    return lines


def _shape(io: TensorRecord, profiles: Profiles, build: BuildSettings) -> str:
    """The input's range over all profiles (min of mins, max of maxes), or its declared shape
    with the build's batch size and the engine's block lengths."""
    ranges = [p[io.name] for p in profiles.values() if io.name in p]
    if not ranges:
        blocks = {p["block_ids"][2][1] for p in profiles.values() if "block_ids" in p}
        sizes = {"batch": f"1..{build.max_batch}",
                 "block": "/".join(str(b) for b in sorted(blocks)) or "block"}
        return "x".join(sizes.get(str(d), str(d)) for d in io.shape)
    lo = [min(r[0][i] for r in ranges) for i in range(len(ranges[0][0]))]
    hi = [max(r[2][i] for r in ranges) for i in range(len(ranges[0][2]))]
    return "x".join(str(a) if a == b else f"{a}..{b}" for a, b in zip(lo, hi))


@click.command("inspect")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--io/--no-io", default=True, help="List every input and output.")
def inspect_command(build_dir: Path, io: bool) -> None:
    """Engines, devices, I/O and sizes of BUILD_DIR (from `trt-twotower build`)."""
    from ..engine.verify import verify_engines
    from ..manifest import Manifest, ManifestError

    try:
        manifest = Manifest.load(build_dir)
        towers = sorted({e.tower for e in manifest.engines.values()}) or ["context"]
        verify_engines(build_dir, manifest, towers)
    except ManifestError as err:
        raise click.ClickException(str(err)) from None
    config = manifest.config
    click.echo(f"{build_dir}: {config.num_hidden_layers} layers "
               f"({config.hybrid_override_pattern}), {manifest.dtype}, "
               f"{manifest.lowering} lowering, max context {manifest.max_context}, "
               f"source {manifest.source}")
    for graph, e in manifest.engines.items():
        click.echo(f"\n{graph}: {e.file} ({e.bytes / 2**20:.1f} MiB) for the {e.tower} tower "
                   f"on GPU {e.device}, {e.flavor} {e.flavor_version}, built in "
                   f"{e.build_seconds:.1f} s, {e.passes['layers']} network layers, "
                   f"profiles: {', '.join(e.profiles)}")
        summary = engine_summary(build_dir, e)
        for line in _summary_lines(summary) if summary else []:
            click.echo(line)
        if io:
            for kind, tensors in (("input", e.inputs), ("output", e.outputs)):
                for t in tensors:
                    click.echo(f"  {kind:6} {t.name:24} {t.dtype:9} "
                               f"{_shape(t, e.profiles, manifest.build)}")
    if len({e.tower for e in manifest.engines.values()}) == 2:
        from .plan import build_plan_text
        click.echo("\n" + build_plan_text(build_dir))
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        click.echo("\n(no GPU here: engines cannot be deserialised on this machine; the above "
                   "comes from the manifest and the builder's DETAILED log)")
