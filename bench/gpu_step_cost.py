"""Cost of one denoiser step (S tokens) relative to one AR step, and the distinct MoE experts a
step touches, on the `nano-30b-a3b-slice` preset in bf16 with the PyTorch reference.

Run on a GPU host:  python bench/gpu_step_cost.py --out results.md
Prints a markdown table; the expectation to compare with: at batch 1 a 16-token step touches
50-69 of 128 experts per layer (about 5x an AR step), while from ~8 concurrent requests the
experts are loaded anyway.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trt_twotower.config import preset  # noqa: E402
from trt_twotower.reference import TwoTowerModel  # noqa: E402
from trt_twotower.reference.moe import Router  # noqa: E402


def build_model(name: str, device: str) -> TwoTowerModel:
    """Full-width random weights made on the GPU (initialising billions of numbers on the
    CPU would dominate the run); routers get random rows so routing is not degenerate."""
    torch.manual_seed(0)
    with torch.device(device):
        model = TwoTowerModel(preset(name))
    for module in model.modules():
        if isinstance(module, Router):
            torch.nn.init.normal_(module.weight, std=module.weight.shape[1] ** -0.5)
            torch.nn.init.normal_(module.e_score_correction_bias, std=0.05)
    for name_, p in model.named_parameters():
        if name_.endswith(("norm.weight", "norm_f.weight")):
            torch.nn.init.ones_(p)
        if name_.endswith("scale_shift_tables.0") or ".scale_shift_tables." in name_:
            torch.nn.init.normal_(p, std=0.02)
    return model.to_dtype(torch.bfloat16).eval().requires_grad_(False)


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn`` after two warm-ups, synchronising the GPU."""
    for _ in range(2):
        fn()
    samples = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


class ExpertTally:
    def __init__(self, tower: torch.nn.Module) -> None:
        self.counts: list[int] = []
        self.handles = [m.register_forward_hook(self.hook) for m in tower.modules()
                        if isinstance(m, Router)]

    def hook(self, module, inputs, output) -> None:
        self.counts.append(int(torch.unique(output[0]).numel()))

    def take(self) -> float:
        mean = sum(self.counts) / len(self.counts)
        self.counts.clear()
        return mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="nano-30b-a3b-slice")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--prefix", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = "cuda"
    # cuDNN's SDPA plans a new graph for every key length (the cache grows each AR step),
    # which costs tens of ms of host time per call; the flash/efficient kernels do not.
    torch.backends.cuda.enable_cudnn_sdp(False)
    model = build_model(args.preset, device)
    c = model.config
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        gen = torch.Generator(device=device).manual_seed(batch)
        prompt = torch.randint(4, c.vocab_size, (batch, args.prefix), device=device,
                               generator=gen)
        cache = model.new_cache(batch)
        model.context_step(prompt, cache)
        token = torch.randint(4, c.vocab_size, (batch, 1), device=device, generator=gen)
        block = torch.randint(4, c.vocab_size, (batch, args.block_size), device=device,
                              generator=gen)
        block[:, ::2] = c.mask_token_id
        t = torch.full((batch,), 0.5, device=device)
        ctx_tally, den_tally = ExpertTally(model.context_tower), ExpertTally(model.denoiser_tower)
        ar_cache = cache.clone()
        ar = timed(lambda: model.context_step(token, ar_cache), args.repeats)
        ar_experts = ctx_tally.take()
        den = timed(lambda: model.denoiser_step(block, t, cache), args.repeats)
        den_experts = den_tally.take()
        rows.append((batch, ar * 1e3, den * 1e3, den / ar, ar_experts, den_experts))
        print(f"batch {batch}: AR {ar*1e3:.2f} ms, denoiser {den*1e3:.2f} ms", flush=True)
    lines = [
        f"# Denoiser step vs AR step, `{args.preset}` bf16, PyTorch reference",
        "",
        f"Device: {torch.cuda.get_device_name()}; torch {torch.__version__}; prefix "
        f"{args.prefix} tokens; block S = {args.block_size}; median of {args.repeats} after "
        "2 warm-ups (each AR step extends its own copy of the cache by one token).",
        "",
        "| batch | AR step (ms) | denoiser step (ms) | denoiser / AR | experts per layer, AR step "
        "| experts per layer, denoiser step |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for batch, ar, den, ratio, ea, ed in rows:
        lines.append(f"| {batch} | {ar:.2f} | {den:.2f} | {ratio:.2f} | {ea:.1f} | {ed:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
