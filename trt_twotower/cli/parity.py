"""``trt-twotower parity``: converted graphs or built engines against the PyTorch reference."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import click
import torch

from ..config import TwoTowerConfig
from ..policy import GenerationSettings
from ..runtime.parity import (DEFAULT_TOLERANCE, REDUCED_BATCH, Backend, compare_generation,
                              compare_generation_reduced, compare_steps, compare_steps_fp8,
                              compare_steps_reduced, format_reduced_table, format_table)
from .options import SEED, Device, PositiveNumber, token_budget_option


def _reference_source(build_dir: Path) -> tuple[str, int, Optional[str]]:
    """Where the build's weights came from (a checkpoint directory or ``preset:NAME``), the
    most rows its engines take per step, and its quantisation mode (None if unquantised):
    the one place this command reads the manifest."""
    from ..manifest import Manifest

    manifest = Manifest.load(build_dir)
    max_batch = manifest.build.max_batch if manifest.build else REDUCED_BATCH
    quantization = manifest.quantization.mode if manifest.quantization else None
    return manifest.source, max_batch, quantization


def _open_reference(source: str, dtype: str, context_device: str = "cpu",
                    denoiser_device: str | None = None):
    """The reference model the build was made from, in ``dtype`` on these devices."""
    from .resolve import open_model_source

    preset_name = source.split(":", 1)[1] if source.startswith("preset:") else None
    return open_model_source(None if preset_name else Path(source), preset_name, dtype,
                             context_device, denoiser_device)


def _dtype_name(dtype: torch.dtype) -> str:
    from ..reference.sources import DTYPES

    return {v: k for k, v in DTYPES.items()}[dtype]


def _judge_fp32(ref: Backend, cand: Backend, config: TwoTowerConfig, max_context: int,
                block_size: int, seed: int, prompts: list[list[int]],
                settings: list[GenerationSettings], fused_unmask: bool, tolerance: float,
                fp8_model: Any = None) -> tuple[str, list[str], str]:
    """fp32 graphs: every step within ``tolerance`` relative (fp8 graphs: or within the fp8
    reference's own rounding-flip drift, ``compare_steps_fp8``), every mode token for token.
    Returns (table, what failed, what passed)."""
    steps = (compare_steps(ref, cand, config, max_context, block_size, tolerance=tolerance,
                           seed=seed) if fp8_model is None else
             compare_steps_fp8(ref, cand, fp8_model, config, max_context, block_size,
                               tolerance=tolerance, seed=seed))
    generations = compare_generation(ref, cand, config, max_context, prompts, settings,
                                     fused_unmask=fused_unmask)
    failed = [s.step for s in steps if not s.passed] + [g.mode for g in generations
                                                         if not g.passed]
    bound = (f"{tolerance:g}" if fp8_model is None else
             f"{tolerance:g} or twice the fp8 reference's own rounding-flip drift")
    return (format_table(steps, generations), failed,
            f"{len(steps)} step types within {bound}, {len(generations)} modes token for "
            "token")


def _judge_reduced(same_dtype: Backend, ref: Backend, cand: Backend, config: TwoTowerConfig,
                   max_context: int, block_size: int, seed: int, prompts: list[list[int]],
                   settings: list[GenerationSettings], fused_unmask: bool, batch: int
                   ) -> tuple[str, list[str], str]:
    """bf16/fp16 engines: the drift criterion on every step (``batch`` rows, at most what the
    engines take); generations reported. Returns (table, what failed, what passed)."""
    report = compare_steps_reduced(same_dtype, ref, cand, config, max_context, block_size,
                                   seed=seed, batch=batch)
    generations = compare_generation_reduced(same_dtype, ref, cand, config, max_context,
                                             prompts, settings, fused_unmask=fused_unmask)
    return (format_reduced_table(report, generations), report.failures(),
            f"{len(report.steps)} step types within {report.criterion.multiple:g}x the "
            f"reference's own {_dtype_name(cand.dtype)} drift")


@click.command("parity")
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
              show_default=True, help="What runs the graphs: ONNX Runtime (CPU) or the TensorRT "
                                      "engines of `trt-twotower build` (GPU).")
@click.option("--tolerance", type=PositiveNumber(), default=DEFAULT_TOLERANCE, show_default=True,
              help="fp32 builds: largest allowed max|a-b|/max|b| of a step's logits. bf16/fp16 "
                   "builds are held to the reference's own drift instead "
                   "(docs/parity-criterion.md).")
@click.option("--block-size", type=click.IntRange(1, 2**31 - 1), default=16, show_default=True)
@token_budget_option(32, "Tokens per generation compared in each mode.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--context-device", type=Device(),
              help="tensorrt backend: the context engine's GPU (and, for bf16/fp16 engines, the "
                   "reference's context tower in that dtype) [default: cuda:0].")
@click.option("--denoiser-device", type=Device(),
              help="tensorrt backend: the denoiser engine's GPU (and, for bf16/fp16 engines, "
                   "the reference's denoiser in that dtype) [default: cuda:1].")
def parity_command(build_dir: Path, backend: str, tolerance: float, block_size: int,
                   max_new_tokens: int, seed: int, context_device: Optional[str],
                   denoiser_device: Optional[str]) -> None:
    """Run the reference and BUILD_DIR's graphs side by side: every step type (prefill,
    decode, block commit, denoiser at several timesteps and prefix lengths, mock-AR, fused
    unmask) and greedy generation in all three modes. Prints a table; exits 1 on failure.

    fp32 graphs must match the fp32 reference within --tolerance and generate the same tokens.
    bf16/fp16 engines run beside the reference in their dtype on their devices and the fp32
    reference on the CPU: each step must stay within a measured multiple of the references'
    own drift; generations are reported.
    """
    from ..manifest import ManifestError
    from ..reference.quantization import QuantizationError
    from ..runtime import backends
    from ..runtime.executor import BackendUnavailable

    if backend == "onnxruntime" and (context_device or denoiser_device):
        raise click.UsageError("--context-device and --denoiser-device place TensorRT "
                               "engines: give them with --backend tensorrt")
    context_device, denoiser_device = context_device or "cuda:0", denoiser_device or "cuda:1"
    try:
        source, max_batch, quantization = _reference_source(build_dir)
        candidate = (backends.open_onnxruntime(build_dir) if backend == "onnxruntime" else
                     backends.open_tensorrt(build_dir, context_device, denoiser_device))
    except (ManifestError, BackendUnavailable) as err:
        raise click.ClickException(str(err)) from None
    def like_the_build(reference):
        """The reference fake-quantised as the build's graphs are (itself if unquantised)."""
        if quantization is None:
            return reference
        try:
            return backends.quantized_like(reference, build_dir)
        except (ManifestError, QuantizationError) as err:
            raise click.ClickException(str(err)) from None

    reference_source = like_the_build(_open_reference(source, "float32"))
    if reference_source.config != candidate.config:
        raise click.ClickException(f"the reference at {source} has another config than "
                                   f"{build_dir}: convert again")
    reference = backends.open_torch(reference_source, candidate.max_context)
    ref = Backend(reference.context, reference.denoiser, reference.dtype)
    cand = Backend(candidate.context, candidate.denoiser, candidate.dtype)
    config, max_context = candidate.config, candidate.max_context
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(4, config.vocab_size, (n,), generator=gen).tolist()
               for n in (1, 6, 11)]
    settings = [GenerationSettings(mode=m, max_new_tokens=max_new_tokens, block_size=block_size,
                                   steps_per_block=block_size, stop_at_eos=False)
                for m in ("diffusion", "mock-ar", "ar")]
    if candidate.dtype == torch.float32:
        table, failed, passed = _judge_fp32(
            ref, cand, config, max_context, block_size, seed, prompts, settings,
            candidate.fused_unmask, tolerance,
            reference_source.model if quantization == "fp8" else None)
    else:
        same = backends.open_torch(like_the_build(
            _open_reference(source, _dtype_name(candidate.dtype), context_device,
                            denoiser_device)), max_context)
        same_dtype = Backend(same.context, same.denoiser, same.dtype)
        table, failed, passed = _judge_reduced(same_dtype, ref, cand, config, max_context,
                                               block_size, seed, prompts, settings,
                                               candidate.fused_unmask,
                                               min(REDUCED_BATCH, max_batch))
    click.echo(table)
    if failed:
        click.echo(f"\nparity FAILED: {', '.join(failed)}", err=True)
        sys.exit(1)
    click.echo(f"\nparity ok: {passed}")
