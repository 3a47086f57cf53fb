"""Measure what quantisation costs the built-in TwoTower: every --quantize mode and scope
against the unquantised model, through the fake-quantised reference (the very arithmetic of the
exported Q/DQ graphs, docs/quantization.md). Prints a Markdown table.

    python build_scripts/quantization_quality.py [--prompts 512]

Per row: held-out perplexity of the context tower; next-block accuracy of mask diffusion at
γ 0.8 against the held-out text and its tokens per denoiser evaluation; greedy agreement of AR
and of diffusion with the unquantised model's own greedy outputs on the same prompts. The
calibration windows are the first held-out tokens (the default of `convert`); everything is
measured on held-out text after them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from report_builtin import accuracy, ar_quality
from trt_twotower.export.quantize import calibrate
from trt_twotower.policy import GenerationSettings
from trt_twotower.reference.quantization import MODES, NONE, SCOPES, QuantRecipe
from trt_twotower.reference.quantized import fake_quantize
from trt_twotower.reference.sources import BUILTIN_CHECKPOINT, open_source
from trt_twotower.runtime.backends import open_torch
from trt_twotower.runtime.session import Request, TwoTowerSession
from trt_twotower.train.corpus import token_stream

CALIBRATION_PROMPTS, CALIBRATION_LENGTH = 32, 128   # `convert`'s defaults
GAMMA, BLOCK = 0.8, 16


def generate(source, prompts: list[list[int]], settings: GenerationSettings
             ) -> tuple[list[list[int]], int]:
    """Greedy outputs of every prompt and the denoiser evaluations they took."""
    span = len(prompts[0]) + settings.max_new_tokens
    backend = open_torch(source, span)
    session = TwoTowerSession(backend.context, backend.denoiser, source.config, span)
    results = session.generate([Request(p, settings) for p in prompts])
    return [r.tokens for r in results], sum(r.stats.denoiser_evals for r in results)


def measure(source, stream: torch.Tensor, prompts: list[list[int]], truths: list[list[int]],
            windows: int) -> dict:
    diffusion = GenerationSettings(max_new_tokens=BLOCK, block_size=BLOCK,
                                   steps_per_block=BLOCK, confidence_threshold=GAMMA,
                                   stop_at_eos=False)
    ar = GenerationSettings(mode="ar", max_new_tokens=BLOCK, stop_at_eos=False)
    _, ppl = ar_quality(source.model, stream, windows, CALIBRATION_LENGTH)
    diff_out, evals = generate(source, prompts, diffusion)
    ar_out, _ = generate(source, prompts, ar)
    return dict(ppl=ppl, acc=accuracy(diff_out, truths),
                tpe=sum(map(len, diff_out)) / evals, diff_out=diff_out, ar_out=ar_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=BUILTIN_CHECKPOINT)
    parser.add_argument("--prompts", type=int, default=512, help="held-out prompts, one block "
                        "each")
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--windows", type=int, default=64, help="perplexity windows of 128")
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    base = open_source(args.checkpoint)
    calibration_tokens = CALIBRATION_PROMPTS * CALIBRATION_LENGTH
    stream = token_stream(base.tokenizer, "heldout", max_tokens=400_000)
    windows = stream[:calibration_tokens].reshape(CALIBRATION_PROMPTS, CALIBRATION_LENGTH)
    held_out = stream[calibration_tokens:]
    span = args.prompt_length + BLOCK
    starts = torch.linspace(0, len(held_out) - span - 1, args.prompts).long().tolist()
    prompts = [held_out[s:s + args.prompt_length].tolist() for s in starts]
    truths = [held_out[s + args.prompt_length:s + span].tolist() for s in starts]
    reference = measure(base, held_out, prompts, truths, args.windows)
    state = base.model.state_dict()
    rows = [("none", "–", reference)]
    for mode in MODES[1:]:
        for scope in SCOPES:
            recipe = QuantRecipe(mode, scope)
            calibration = (calibrate(base.config, state.__getitem__, recipe, windows)
                           if recipe.needs_calibration else None)
            source = open_source(args.checkpoint)
            fake_quantize(source.model, recipe, calibration)
            rows.append((mode, scope, measure(source, held_out, prompts, truths,
                                              args.windows)))
            print(f"{mode} {scope} done at {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(format_table(rows, reference, args, time.perf_counter() - start))


def format_table(rows: list[tuple[str, str, dict]], reference: dict, args, seconds: float
                 ) -> str:
    lines = [f"Built-in model (`{args.checkpoint.name}`), {args.prompts} held-out prompts of "
             f"{args.prompt_length} tokens, one {BLOCK}-token block each, greedy; perplexity "
             f"over {args.windows} held-out windows of {CALIBRATION_LENGTH}; calibration on the "
             f"{CALIBRATION_PROMPTS} windows before them; int4 block 128. {seconds / 60:.1f} "
             "min on this CPU.", "",
             "| quantization | scope | held-out perplexity (context tower) | Δ vs none | "
             f"diffusion next-block accuracy (γ {GAMMA}) | tokens per denoiser evaluation | "
             "AR greedy agreement with none | diffusion greedy agreement with none |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for mode, scope, r in rows:
        delta = r["ppl"] / reference["ppl"] - 1
        lines.append(f"| {mode if mode != NONE else 'none (fp32)'} | {scope} | {r['ppl']:.3f} | "
                     f"{delta:+.2%} | {r['acc']:.3f} | {r['tpe']:.3f} | "
                     f"{accuracy(r['ar_out'], reference['ar_out']):.3f} | "
                     f"{accuracy(r['diff_out'], reference['diff_out']):.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
