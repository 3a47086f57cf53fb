"""``trt-twotower parity``: converted graphs or built engines against the PyTorch reference."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import torch

from ..policy import GenerationSettings
from ..runtime.parity import DEFAULT_TOLERANCE


@click.command("parity")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
              show_default=True, help="What runs the graphs: ONNX Runtime (CPU) or the TensorRT "
                                      "engines of `trt-twotower build` (GPU).")
@click.option("--tolerance", type=float, default=DEFAULT_TOLERANCE, show_default=True,
              help="Largest allowed max|a-b|/max|b| of a step's logits.")
@click.option("--block-size", type=int, default=16, show_default=True)
@click.option("--max-new-tokens", type=int, default=32, show_default=True,
              help="Tokens per generation compared in each mode.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--context-device", default="cuda:0", show_default=True,
              help="tensorrt backend: the context engine's GPU.")
@click.option("--denoiser-device", default="cuda:1", show_default=True,
              help="tensorrt backend: the denoiser engine's GPU.")
def parity_command(build_dir: Path, backend: str, tolerance: float, block_size: int,
                   max_new_tokens: int, seed: int, context_device: str,
                   denoiser_device: str) -> None:
    """Run the reference and BUILD_DIR's graphs side by side: every step type (prefill,
    decode, block commit, denoiser at several timesteps and prefix lengths, mock-AR, fused
    unmask) and greedy generation in all three modes. Prints a table; exits 1 past tolerance.
    """
    from ..export.convert import load_manifest
    from ..export.moe import ExportError
    from ..runtime import backends
    from ..runtime.executor import BackendUnavailable
    from ..runtime.parity import Backend, compare_generation, compare_steps, format_table
    from .resolve import open_model_source

    try:
        manifest = load_manifest(build_dir)
        candidate = (backends.open_onnxruntime(build_dir) if backend == "onnxruntime" else
                     backends.open_tensorrt(build_dir, context_device, denoiser_device))
    except (ExportError, BackendUnavailable) as err:
        raise click.ClickException(str(err)) from None
    source = manifest["source"]
    reference_source = (open_model_source(None, source.split(":", 1)[1])
                        if source.startswith("preset:") else
                        open_model_source(Path(source), None))
    if reference_source.config != candidate.config:
        raise click.ClickException(f"the reference at {source} has another config than "
                                   f"{build_dir}: convert again")
    reference = backends.open_torch(reference_source, candidate.max_context)
    ref = Backend(reference.context, reference.denoiser, reference.dtype)
    cand = Backend(candidate.context, candidate.denoiser, candidate.dtype)
    config = candidate.config
    steps = compare_steps(ref, cand, config, candidate.max_context, block_size,
                          tolerance=tolerance, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(4, config.vocab_size, (n,), generator=gen).tolist()
               for n in (1, 6, 11)]
    settings = [GenerationSettings(mode=m, max_new_tokens=max_new_tokens, block_size=block_size,
                                   steps_per_block=block_size, stop_at_eos=False)
                for m in ("diffusion", "mock-ar", "ar")]
    generations = compare_generation(ref, cand, config, candidate.max_context, prompts,
                                     settings, fused_unmask=candidate.fused_unmask)
    click.echo(format_table(steps, generations))
    failed = [s.step for s in steps if not s.passed] + [g.mode for g in generations
                                                         if not g.passed]
    if failed:
        click.echo(f"\nparity FAILED: {', '.join(failed)}", err=True)
        sys.exit(1)
    click.echo(f"\nparity ok: {len(steps)} step types within {tolerance:g}, "
               f"{len(generations)} modes token for token")
