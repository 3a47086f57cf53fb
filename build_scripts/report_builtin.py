"""Measure the built-in TwoTower and write bench/results/builtin-model.md (+ .png).

Held-out AR quality of the context tower, then mask diffusion at several confidence thresholds
against AR greedy decoding on the same held-out prompts: tokens per denoiser evaluation,
agreement with the AR continuation, and two quality proxies relative to AR — accuracy against
the true held-out continuation, and the likelihood of the generated text under the AR tower.

    python build_scripts/report_builtin.py
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from trt_twotower.policy import GenerationSettings
from trt_twotower.reference.sources import BUILTIN_CHECKPOINT, open_source
from trt_twotower.runtime.backends import open_torch
from trt_twotower.runtime.session import Request, TwoTowerSession
from trt_twotower.train.corpus import token_stream

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)


@torch.no_grad()
def ar_quality(model, stream: torch.Tensor, windows: int, length: int) -> tuple[float, float]:
    """Next-token accuracy and perplexity of the context tower on held-out windows."""
    starts = torch.linspace(0, len(stream) - length - 1, windows).long().tolist()
    x = torch.stack([stream[s:s + length + 1] for s in starts])
    logits = model.context_logits(x[:, :-1], model.new_cache(len(starts)))
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                            x[:, 1:].reshape(-1))
    acc = (logits.argmax(-1) == x[:, 1:]).float().mean()
    return float(acc), math.exp(float(nll))


@torch.no_grad()
def likelihood_under_ar(model, prompts: list[list[int]], outputs: list[list[int]]) -> float:
    """Mean per-token log-likelihood of each generated continuation under the AR tower."""
    total, count = 0.0, 0
    for prompt, out in zip(prompts, outputs):
        ids = torch.tensor([prompt + out])
        logp = torch.log_softmax(model.context_logits(ids[:, :-1], model.new_cache(1)), -1)
        picked = logp[0, len(prompt) - 1:].gather(-1, ids[0, len(prompt):, None])
        total, count = total + float(picked.sum()), count + len(out)
    return total / count


def accuracy(outputs: list[list[int]], truths: list[list[int]]) -> float:
    pairs = [(a, b) for out, truth in zip(outputs, truths) for a, b in zip(out, truth)]
    return sum(a == b for a, b in pairs) / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=BUILTIN_CHECKPOINT)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS / "builtin-model.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    source = open_source(args.checkpoint)
    model = source.model
    stream = token_stream(source.tokenizer, "heldout", max_tokens=400_000)
    acc, ppl = ar_quality(model, stream, 64, 128)
    span = args.prompt_length + args.new_tokens
    starts = torch.linspace(0, len(stream) - span - 1, args.prompts).long().tolist()
    prompts = [stream[s:s + args.prompt_length].tolist() for s in starts]
    truths = [stream[s + args.prompt_length:s + span].tolist() for s in starts]
    backend = open_torch(source, span)
    session = TwoTowerSession(backend.context, backend.denoiser, model.config, span)

    def run(settings: GenerationSettings) -> tuple[list[list[int]], int, float]:
        start = time.perf_counter()
        results = session.generate([Request(p, settings) for p in prompts])
        return ([r.tokens for r in results], sum(r.stats.denoiser_evals for r in results),
                time.perf_counter() - start)

    ar_out, _, ar_seconds = run(GenerationSettings(mode="ar", max_new_tokens=args.new_tokens,
                                                   stop_at_eos=False))
    ar_acc, ar_ll = accuracy(ar_out, truths), likelihood_under_ar(model, prompts, ar_out)
    rows = []
    for gamma in THRESHOLDS:
        out, evals, seconds = run(GenerationSettings(
            max_new_tokens=args.new_tokens, block_size=16, steps_per_block=16,
            confidence_threshold=gamma, stop_at_eos=False))
        tokens = sum(len(o) for o in out)
        diff_acc, diff_ll = accuracy(out, truths), likelihood_under_ar(model, prompts, out)
        rows.append(dict(gamma=gamma, tpe=tokens / evals, agree=accuracy(out, ar_out),
                         acc=diff_acc, acc_ratio=diff_acc / ar_acc, ll=diff_ll,
                         ppl_ratio=math.exp(diff_ll - ar_ll), speed=ar_seconds / seconds))
    write_report(args, acc, ppl, ar_acc, ar_ll, rows)


def write_report(args, acc, ppl, ar_acc, ar_ll, rows) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        "# The built-in TwoTower: quality and parallelism", "",
        f"Produced by `python build_scripts/report_builtin.py` (checkpoint `{args.checkpoint.name}`,"
        f" {args.prompts} held-out prompts of {args.prompt_length} tokens, {args.new_tokens} new "
        "tokens, block 16, 16 steps per block, greedy, CPU).", "",
        f"Held-out AR quality of the context tower: next-token accuracy **{acc:.3f}**, "
        f"perplexity **{ppl:.2f}** (64 windows of 128 tokens of held-out standard-library files).",
        "", f"AR greedy baseline on the same prompts: accuracy against the true continuation "
        f"{ar_acc:.3f}, mean log-likelihood under the AR tower {ar_ll:.3f} per token.", "",
        "| γ | tokens per denoiser evaluation | agreement with AR | accuracy vs truth | "
        "accuracy ÷ AR | likelihood under AR ÷ AR's (per token, exp Δ) | wall-clock speed vs AR |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['gamma']} | {r['tpe']:.2f} | {r['agree']:.3f} | {r['acc']:.3f} | "
                     f"{r['acc_ratio']:.3f} | {r['ppl_ratio']:.3f} | {r['speed']:.2f}× |")
    lines += ["", "Quality proxies relative to AR: *accuracy ÷ AR* is the fraction of generated "
              "positions equal to the held-out text, over the same fraction for AR greedy "
              "decoding; *likelihood ÷ AR's* is exp(mean log p_AR(diffusion output) − mean "
              "log p_AR(AR output)), the per-token probability the AR tower gives the "
              "diffusion output relative to its own greedy output (1.0 = as likely). Wall-clock "
              "speed compares the same session on this CPU (eager PyTorch reference).",
              "", "![tokens per evaluation and quality vs γ](builtin-model.png)", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    fig, ax = plt.subplots(figsize=(6, 4))
    g = [r["gamma"] for r in rows]
    ax.plot(g, [r["tpe"] for r in rows], marker="o", label="tokens / denoiser evaluation")
    ax.set_xlabel("confidence threshold γ")
    ax.set_ylabel("tokens per evaluation")
    ax2 = ax.twinx()
    ax2.plot(g, [r["acc_ratio"] for r in rows], marker="s", color="tab:green",
             label="accuracy ÷ AR")
    ax2.plot(g, [r["ppl_ratio"] for r in rows], marker="^", color="tab:red",
             label="likelihood ÷ AR")
    ax2.axhline(0.95, color="grey", lw=0.8, ls="--")
    ax2.set_ylabel("quality relative to AR")
    fig.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
