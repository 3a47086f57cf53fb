"""``trt-twotower generate``: text from a prompt in any of the three modes."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

import click

from ..policy import MODES, GenerationError, GenerationSettings
from ..runtime.backends import BACKENDS
from ..tokenizer import TokenizerError
from .options import (SEED, Device, dtype_option, model_source_options, token_budget_option,
                      utf8_text)
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


def check_vocabulary(ids: list[int], vocab_size: int) -> None:
    """Token ids outside the embedding table would fail inside the first layer."""
    outside = [i for i in ids if not 0 <= i < vocab_size]
    if outside:
        raise click.BadParameter(f"token id {outside[0]} is outside the model's vocabulary "
                                 f"0..{vocab_size - 1}", param_hint="--prompt-ids")


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
@click.option("--prompt", default=None, callback=utf8_text,
              help=f"Prompt text [default: {DEFAULT_PROMPT!r}].")
@click.option("--prompt-ids", default=None, help="The prompt as token ids, e.g. 1,2,3.")
@token_budget_option(64, "Tokens to generate; a multiple of --block-size in diffusion mode.")
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
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Samples are a function of the seed and the step only.")
@click.option("--device", type=Device(), default=None,
              help="Both towers' device (cpu, cuda, cuda:1, ...) [default: cpu].")
@click.option("--context-device", type=Device(), default=None,
              help="The context tower's device.")
@click.option("--denoiser-device", type=Device(), default=None, help="The denoiser's device.")
@dtype_option()
@click.option("--stream", is_flag=True, help="Print text as each block commits.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (ids, text and stats) instead of text.")
@click.option("--input", "input_file", type=click.Path(exists=True, dir_okay=False,
                                                        path_type=Path),
              help="Offline batch: a JSONL file of prompts ({\"prompt\": TEXT} or "
                   "{\"prompt_ids\": [...]}, optional \"id\" and per-line settings); needs "
                   "--output.")
@click.option("--output", "output_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Offline batch: the JSONL file of answers, one per input line as each "
                   "finishes, with its stats; rerun to resume (answered lines are skipped).")
@click.option("--max-batch", type=click.IntRange(min=1), default=64, show_default=True,
              help="Offline batch: requests decoded together (cache rows).")
def generate_command(checkpoint: Optional[Path], preset_name: Optional[str], backend: str,
                     build_dir: Optional[Path], mode: str, prompt: Optional[str],
                     prompt_ids: Optional[str], max_new_tokens: int, block_size: int,
                     steps_per_block: int, confidence_threshold: float, temperature: float,
                     top_k: Optional[int], top_p: Optional[float], seed: int,
                     device: Optional[str], context_device: Optional[str],
                     denoiser_device: Optional[str], dtype: str, stream: bool,
                     as_json: bool, input_file: Optional[Path], output_file: Optional[Path],
                     max_batch: int) -> None:
    """Generate text with both towers: mask diffusion, mock-AR or AR; one prompt, or a JSONL
    file of them (--input/--output) decoded together by the step loop."""
    from ..runtime.executor import BackendUnavailable
    from ..runtime.heap import keep_freed_memory
    from ..runtime.offline_batch import result_stats
    from ..runtime.scheduler import SchedulerLimits
    from ..runtime.session import Request, TwoTowerSession
    from ..runtime.streaming import TextDeltas

    if prompt is not None and prompt_ids is not None:
        raise click.UsageError("give --prompt or --prompt-ids, not both")
    _check_batch_options(input_file, output_file, prompt, prompt_ids, stream, as_json)
    given_ids = parse_prompt_ids(prompt_ids) if prompt_ids is not None else None
    try:
        settings = GenerationSettings(
            mode=mode, max_new_tokens=max_new_tokens, block_size=block_size,
            steps_per_block=steps_per_block, confidence_threshold=confidence_threshold,
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    except GenerationError as err:
        raise click.UsageError(str(err)) from None
    keep_freed_memory()  # this process decodes until it exits: steps reuse their memory
    context_device = context_device or device or "cpu"
    denoiser_device = denoiser_device or device or context_device
    # Token ids in (or a file that may hold them): a checkpoint without a tokenizer will do.
    need_tokenizer = given_ids is None and input_file is None
    with tempfile.TemporaryDirectory(prefix="trt-twotower-") as scratch:
        try:
            opened = open_backend(backend, checkpoint, preset_name, build_dir, dtype,
                                  context_device, denoiser_device, Path(scratch),
                                  need_tokenizer)
        except (BackendUnavailable, TokenizerError) as err:
            raise click.ClickException(str(err)) from None
        if input_file is not None:
            _generate_file(opened, settings, input_file, output_file, max_batch, backend)
            return
        tokenizer = opened.tokenizer
        ids = (given_ids if given_ids is not None
               else tokenizer.encode(DEFAULT_PROMPT if prompt is None else prompt))
        check_vocabulary(ids, opened.config.vocab_size)
        if not ids:
            raise click.UsageError("the prompt encodes to no tokens")
        check_length(len(ids), max_new_tokens, opened.max_context
                     or opened.config.max_position_embeddings)
        max_context = opened.max_context or len(ids) + max_new_tokens
        deltas = TextDeltas(tokenizer) if tokenizer is not None else IdDeltas()
        on_delta = None
        if stream and not as_json:
            click.echo(deltas.prompt(ids) if tokenizer is None else tokenizer.decode(ids),
                       nl=False)
            on_delta = lambda new: click.echo(deltas.push(new), nl=False)  # noqa: E731
        with TwoTowerSession(opened.context, opened.denoiser, opened.config, max_context,
                             opened.dtype, fused_unmask=opened.fused_unmask,
                             limits=SchedulerLimits(capacity=1)) as session:
            try:
                result = session.generate([Request(ids, settings, on_delta)])[0]
            except (GenerationError, RuntimeError) as err:
                raise click.ClickException(str(err)) from None
    text = tokenizer.decode(result.tokens) if tokenizer is not None else None
    stats = {"mode": mode, "backend": backend, **result_stats(result)}
    if as_json:
        click.echo(json.dumps({"prompt_ids": ids, "generated_ids": result.tokens, "text": text,
                               "stats": stats}))
        return
    if stream:
        click.echo(deltas.flush())
    elif tokenizer is None:
        click.echo(",".join(map(str, ids + result.tokens)))
    else:
        click.echo(tokenizer.decode(ids) + text)
    per_eval = (f", {stats['tokens_per_evaluation']} tokens/evaluation"
                if stats["denoiser_evaluations"] else "")
    click.echo(f"\n[{mode} on {backend}: {len(result.tokens)} tokens, "
               f"{result.stats.denoiser_evals} denoiser evaluations{per_eval}, "
               f"{result.stats.seconds:.2f} s]", err=True)


def _check_batch_options(input_file: Optional[Path], output_file: Optional[Path],
                         prompt: Optional[str], prompt_ids: Optional[str], stream: bool,
                         as_json: bool) -> None:
    if (input_file is None) != (output_file is None):
        raise click.UsageError("offline batch needs both --input and --output")
    if input_file is not None and (prompt is not None or prompt_ids is not None or stream
                                   or as_json):
        raise click.UsageError("--input takes its prompts from the file: drop --prompt, "
                               "--prompt-ids, --stream and --json")
    if input_file is not None and output_file.resolve() == input_file.resolve():
        raise click.UsageError("--output must not be the --input file")


def _generate_file(opened, settings: GenerationSettings, input_file: Path,
                   output_file: Path, max_batch: int, backend: str) -> None:
    """Every line of ``input_file`` through one session, answers appended to
    ``output_file`` as they finish; lines answered by an earlier run are skipped."""
    from tqdm import tqdm

    from ..runtime.offline_batch import done_indices, read_lines, run_batch
    from ..runtime.scheduler import SchedulerLimits
    from ..runtime.session import TwoTowerSession

    tokenizer = opened.tokenizer
    lines = read_lines(input_file, settings,
                       tokenizer.encode if tokenizer is not None else _no_tokenizer)
    done = done_indices(output_file)
    todo = [line for line in lines if line.index not in done]
    longest = opened.max_context or opened.config.max_position_embeddings
    needed = max((len(l.request.prompt_ids) + l.request.settings.max_new_tokens
                  for l in todo if l.request is not None), default=2)
    max_context = opened.max_context or min(needed, longest)
    try:
        output = open(output_file, "a")
    except OSError as err:
        raise click.ClickException(f"cannot write {output_file}: {err.strerror}") from None
    with output, TwoTowerSession(opened.context, opened.denoiser, opened.config,
                                 max_context, opened.dtype, opened.fused_unmask,
                                 SchedulerLimits(capacity=max_batch)) as session, \
            tqdm(total=len(todo), unit="prompt", desc=f"generate ({backend})") as bar:
        errors = run_batch(session, todo, output,
                           tokenizer.decode if tokenizer is not None else lambda ids: None,
                           2 * max_batch,
                           on_answer=lambda record: bar.update(1))
    click.echo(f"answered {len(todo)} line(s) to {output_file} ({len(done)} already there)",
               err=True)
    if errors:
        raise click.ClickException(f"{errors} line(s) could not run: see their \"error\" in "
                                   f"{output_file}")


class IdDeltas:
    """What --stream prints when the model has no tokenizer: the ids, comma-separated as
    --prompt-ids takes them, as they commit."""

    def prompt(self, ids: list[int]) -> str:
        return ",".join(map(str, ids))

    def push(self, ids: list[int]) -> str:
        return "".join(f",{i}" for i in ids)

    def flush(self) -> str:
        return ""


def _no_tokenizer(text: str) -> list[int]:
    raise ValueError("a text prompt needs the checkpoint's tokenizer.json, which it lacks: "
                     "give prompt_ids instead")


def check_length(prompt_tokens: int, max_new_tokens: int, longest: int) -> None:
    """Refuse a request longer than the graphs' cache or the model's positions before any
    cache is allocated for it: a huge --max-new-tokens would otherwise exhaust memory."""
    if prompt_tokens + max_new_tokens > longest:
        raise click.UsageError(f"{prompt_tokens} prompt tokens + --max-new-tokens "
                               f"{max_new_tokens} exceed the {longest} positions this model "
                               "serves; ask for fewer tokens")


def open_backend(backend: str, checkpoint: Optional[Path], preset_name: Optional[str],
                 build_dir: Optional[Path], dtype: str, context_device: str,
                 denoiser_device: str, scratch: Path, need_tokenizer: bool = True):
    """The executors for ``backend``; onnxruntime without --build-dir converts first. Without
    ``need_tokenizer`` the torch backend opens a checkpoint that has no tokenizer.json
    (the others still read one from the build)."""
    from ..runtime import backends

    if backend == "torch":
        if build_dir is not None:
            raise click.UsageError("--build-dir is for the onnxruntime and tensorrt backends")
        source = open_model_source(checkpoint, preset_name, dtype, context_device,
                                   denoiser_device, need_tokenizer)
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
