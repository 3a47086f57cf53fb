"""``trt-twotower generate``: text from a prompt in any of the three modes."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

import click

from ..policy import MODES, GenerationError, GenerationSettings
from ..runtime.backends import BACKENDS
from .options import dtype_option, model_source_options
from .resolve import open_model_source, open_weights

DEFAULT_PROMPT = "def fibonacci(n):\n"


def parse_prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter("expected comma-separated integers such as 1,2,3",
                                 param_hint="--prompt-ids") from None
    if not ids:
        raise click.BadParameter("needs at least one token id", param_hint="--prompt-ids")
    return ids


@click.command("generate")
@model_source_options
@click.option("--backend", type=click.Choice(BACKENDS), default="torch", show_default=True,
              help="torch: the PyTorch reference; onnxruntime: the converted graphs (CPU); "
                   "tensorrt: built engines (GPU).")
@click.option("--build-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Output of `convert` (onnxruntime) or `build` (tensorrt). Without it the "
                   "onnxruntime backend converts the model into a temporary directory.")
@click.option("--mode", type=click.Choice(MODES), default="diffusion", show_default=True,
              help="diffusion: the denoiser fills blocks of masked tokens, several per step; "
                   "mock-ar: the denoiser predicts one token at a time; ar: the context tower "
                   "alone (the autoregressive baseline).")
@click.option("--prompt", default=None, help=f"Prompt text [default: {DEFAULT_PROMPT!r}].")
@click.option("--prompt-ids", default=None, help="The prompt as token ids, e.g. 1,2,3.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True,
              help="Tokens to generate; a multiple of --block-size in diffusion mode.")
@click.option("--block-size", type=int, default=16, show_default=True,
              help="Tokens per diffusion block (the released denoiser was trained on 16).")
@click.option("--steps-per-block", type=int, default=16, show_default=True,
              help="Most denoiser evaluations per block.")
@click.option("--confidence-threshold", type=float,
              default=GenerationSettings.confidence_threshold, show_default=True,
              help="γ: every masked position more confident than this commits in a step.")
@click.option("--temperature", type=float, default=0.0, show_default=True,
              help="0 is greedy; otherwise samples (diffusion: Gumbel-max).")
@click.option("--top-k", type=int, default=None, help="AR and mock-AR sampling only.")
@click.option("--top-p", type=float, default=None, help="AR and mock-AR sampling only.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Samples are a function of the seed and the step only.")
@click.option("--device", default=None,
              help="Both towers' device (cpu, cuda, cuda:1, ...) [default: cpu].")
@click.option("--context-device", default=None, help="The context tower's device.")
@click.option("--denoiser-device", default=None, help="The denoiser's device.")
@dtype_option()
@click.option("--stream", is_flag=True, help="Print text as each block commits.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (ids, text and stats) instead of text.")
def generate_command(checkpoint: Optional[Path], preset_name: Optional[str], backend: str,
                     build_dir: Optional[Path], mode: str, prompt: Optional[str],
                     prompt_ids: Optional[str], max_new_tokens: int, block_size: int,
                     steps_per_block: int, confidence_threshold: float, temperature: float,
                     top_k: Optional[int], top_p: Optional[float], seed: int,
                     device: Optional[str], context_device: Optional[str],
                     denoiser_device: Optional[str], dtype: str, stream: bool,
                     as_json: bool) -> None:
    """Generate text with both towers: mask diffusion, mock-AR or AR."""
    from ..runtime.executor import BackendUnavailable
    from ..runtime.session import Request, TwoTowerSession
    from ..runtime.streaming import TextDeltas

    if prompt is not None and prompt_ids is not None:
        raise click.UsageError("give --prompt or --prompt-ids, not both")
    try:
        settings = GenerationSettings(
            mode=mode, max_new_tokens=max_new_tokens, block_size=block_size,
            steps_per_block=steps_per_block, confidence_threshold=confidence_threshold,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    except GenerationError as err:
        raise click.UsageError(str(err)) from None
    context_device = context_device or device or "cpu"
    denoiser_device = denoiser_device or device or context_device
    with tempfile.TemporaryDirectory(prefix="trt-twotower-") as scratch:
        try:
            opened = open_backend(backend, checkpoint, preset_name, build_dir, dtype,
                                  context_device, denoiser_device, Path(scratch))
        except BackendUnavailable as err:
            raise click.ClickException(str(err)) from None
        tokenizer = opened.tokenizer
        ids = (parse_prompt_ids(prompt_ids) if prompt_ids is not None
               else tokenizer.encode(DEFAULT_PROMPT if prompt is None else prompt))
        if not ids:
            raise click.UsageError("the prompt encodes to no tokens")
        max_context = opened.max_context or len(ids) + max_new_tokens
        session = TwoTowerSession(opened.context, opened.denoiser, opened.config, max_context,
                                  opened.dtype, fused_unmask=opened.fused_unmask)
        deltas = TextDeltas(tokenizer)
        on_delta = None
        if stream and not as_json:
            click.echo(tokenizer.decode(ids), nl=False)
            on_delta = lambda new: click.echo(deltas.push(new), nl=False)  # noqa: E731
        try:
            result = session.generate([Request(ids, settings, on_delta)])[0]
        except (GenerationError, RuntimeError) as err:
            raise click.ClickException(str(err)) from None
    text = tokenizer.decode(result.tokens)
    stats = {
        "mode": mode, "backend": backend, "new_tokens": len(result.tokens),
        "denoiser_evaluations": result.stats.denoiser_evals,
        "tokens_per_evaluation": (round(result.tokens_per_eval, 3)
                                  if result.stats.denoiser_evals else None),
        "context_steps": result.stats.context_steps, "handoff_bytes": result.stats.handoff_bytes,
        "seconds": round(result.stats.seconds, 4),
        "prefill_seconds": round(result.stats.prefill_seconds, 4),
        "denoise_seconds": round(result.stats.denoise_seconds, 4),
        "commit_seconds": round(result.stats.commit_seconds, 4),
    }
    if as_json:
        click.echo(json.dumps({"prompt_ids": ids, "generated_ids": result.tokens, "text": text,
                               "stats": stats}))
        return
    if stream:
        click.echo(deltas.flush())
    else:
        click.echo(tokenizer.decode(ids) + text)
    per_eval = (f", {stats['tokens_per_evaluation']} tokens/evaluation"
                if stats["denoiser_evaluations"] else "")
    click.echo(f"\n[{mode} on {backend}: {len(result.tokens)} tokens, "
               f"{result.stats.denoiser_evals} denoiser evaluations{per_eval}, "
               f"{result.stats.seconds:.2f} s]", err=True)


def open_backend(backend: str, checkpoint: Optional[Path], preset_name: Optional[str],
                 build_dir: Optional[Path], dtype: str, context_device: str,
                 denoiser_device: str, scratch: Path):
    """The executors for ``backend``; onnxruntime without --build-dir converts first."""
    from ..runtime import backends

    if backend == "torch":
        if build_dir is not None:
            raise click.UsageError("--build-dir is for the onnxruntime and tensorrt backends")
        source = open_model_source(checkpoint, preset_name, dtype, context_device,
                                   denoiser_device)
        return backends.open_torch(source, 0)
    if backend == "onnxruntime":
        if build_dir is None:
            from ..export.convert import ConvertOptions, convert
            weights = open_weights(checkpoint, preset_name)
            convert(weights.config, weights.get, scratch, ConvertOptions(), weights.tokenizer,
                    weights.name, weights.digest, progress=False)
            build_dir = scratch
        return backends.open_onnxruntime(build_dir)
    if build_dir is None:
        raise click.UsageError("the tensorrt backend runs engines: pass --build-dir from "
                               "`trt-twotower build`")
    return backends.open_tensorrt(build_dir, context_device, denoiser_device)
