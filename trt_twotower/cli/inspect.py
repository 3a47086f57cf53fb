"""``trt-twotower inspect``: what a build directory holds, from its manifest and build logs."""

from __future__ import annotations

import re
from pathlib import Path

import click

KERNEL = re.compile(r"TacticName: ([\w:]+)")


def kernel_summary(log_path: Path, top: int = 5) -> list[tuple[str, int]]:
    """The most frequent kernels in a DETAILED build log."""
    if not log_path.is_file():
        return []
    counts: dict[str, int] = {}
    for name in KERNEL.findall(log_path.read_text(errors="replace")):
        counts[name] = counts.get(name, 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])[:top]


def _shape(io: dict, profiles: dict) -> str:
    """The input's range over all profiles (min of mins, max of maxes), or its declared shape."""
    ranges = [p[io["name"]] for p in profiles.values() if io["name"] in p]
    if not ranges:
        return "x".join(str(d) for d in io["shape"])
    lo = [min(r[0][i] for r in ranges) for i in range(len(ranges[0][0]))]
    hi = [max(r[2][i] for r in ranges) for i in range(len(ranges[0][2]))]
    return "x".join(str(a) if a == b else f"{a}..{b}" for a, b in zip(lo, hi))


@click.command("inspect")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--io/--no-io", default=True, help="List every input and output.")
def inspect_command(build_dir: Path, io: bool) -> None:
    """Engines, devices, I/O and sizes of BUILD_DIR (from `trt-twotower build`)."""
    from ..engine.manifest import ManifestError, validate_engines
    from ..export.moe import ExportError

    try:
        manifest = validate_engines(build_dir)
    except (ManifestError, ExportError) as err:
        raise click.ClickException(str(err)) from None
    config = manifest["config"]
    click.echo(f"{build_dir}: {config['num_hidden_layers']} layers "
               f"({config['hybrid_override_pattern']}), {manifest['dtype']}, "
               f"{manifest['lowering']} lowering, max context {manifest['max_context']}, "
               f"source {manifest['source']}")
    for graph, e in manifest["engines"].items():
        click.echo(f"\n{graph}: {e['file']} ({e['bytes'] / 2**20:.1f} MiB) on GPU {e['device']}, "
                   f"{e['flavor']} {e['flavor_version']}, built in "
                   f"{e['passes']['build_seconds']:.1f} s, {e['passes']['layers']} layers, "
                   f"profiles: {', '.join(e['profiles'])}")
        kernels = kernel_summary(build_dir / e["build_log"])
        if kernels:
            click.echo("  kernels: " + ", ".join(f"{k} ×{n}" for k, n in kernels))
        if io:
            for kind in ("inputs", "outputs"):
                for t in e[kind]:
                    click.echo(f"  {kind[:-1]:6} {t['name']:24} {t['dtype']:9} "
                               f"{_shape(t, e['profiles'])}")
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        click.echo("\n(no GPU here: engines cannot be deserialised on this machine; the above "
                   "comes from the manifest and the builder's DETAILED log)")
