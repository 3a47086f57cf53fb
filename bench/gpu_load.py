"""Continuous batching on a GPU: the in-process engine (step scheduler, slot pools on the GPU,
PyTorch reference executors) under closed-loop clients and Poisson arrivals, on the
`nano-30b-a3b-slice` preset in bf16, AR against diffusion with forced commits K (a fixed number
of tokens per denoiser evaluation, so the comparison does not depend on the random weights).

Run on a GPU host:  python3 bench/gpu_load.py --out results-dir
Prints the load table and each load's diffusion / AR tokens/s; writes load.md and load.csv.
Both towers share the one GPU (in turn, as the engine runs towers on one device); on two GPUs
they run a round's calls at the same time.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpu_step_cost import build_model  # noqa: E402  (this folder)
from trt_twotower.policy import GenerationSettings  # noqa: E402
from trt_twotower.runtime.load_benchmark import (SessionTarget, format_load,  # noqa: E402
                                                 run_load)
from trt_twotower.runtime.scheduler import SchedulerLimits  # noqa: E402
from trt_twotower.runtime.session import TwoTowerSession  # noqa: E402
from trt_twotower.runtime.torch_executor import (TorchContextExecutor,  # noqa: E402
                                                 TorchDenoiserExecutor)


def counts(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


class LogitsToHost:
    """An executor whose logits are copied to the host, the policy then running there: what
    the reference executors did before 2026-11-30, kept for that change's before/after."""

    def __init__(self, inner) -> None:
        self.inner, self.device = inner, inner.device

    def __getattr__(self, name: str):
        step = getattr(self.inner, name)
        return lambda *args: step(*args).cpu()


def speedups(rows) -> list[str]:
    """Diffusion over AR tokens/s for each load both ran."""
    ar = {r.load: r.tokens_per_second for r in rows if r.label == "AR"}
    lines = ["| load | diffusion / AR output tok/s |", "|---|---:|"]
    for r in rows:
        if r.label != "AR" and r.load in ar:
            lines.append(f"| {r.load} | {r.tokens_per_second / ar[r.load]:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="nano-30b-a3b-slice")
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--rates", default="16")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--forced-commits", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script")
    parser.add_argument("--logits-to-host", action="store_true",
                        help="the executors' logits copied to the host (before 2026-11-30)")
    parser.add_argument("--out", type=Path, default=Path("gpu-load"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # cuDNN's SDPA plans a new graph for every key length (see gpu_step_cost.py)
    torch.backends.cuda.enable_cudnn_sdp(False)
    on_gpu = args.device != "cpu"
    started = time.perf_counter()
    model = build_model(args.preset, args.device)
    config = model.config
    print(f"model built in {time.perf_counter() - started:.1f} s", flush=True)
    clients = counts(args.clients)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, config.vocab_size, (max(clients), args.prompt_length),
                            generator=gen).tolist()
    max_context = args.prompt_length + args.max_tokens
    common = dict(max_new_tokens=args.max_tokens, stop_at_eos=False)
    cases = [(f"diffusion K={args.forced_commits}",
              GenerationSettings(forced_commits=args.forced_commits, **common)),
             ("AR", GenerationSettings(mode="ar", **common))]

    @contextlib.contextmanager
    def engine():
        context, denoiser = TorchContextExecutor(model), TorchDenoiserExecutor(model)
        if args.logits_to_host:
            context, denoiser = LogitsToHost(context), LogitsToHost(denoiser)
        with TwoTowerSession(context, denoiser, config, max_context, torch.bfloat16,
                             limits=SchedulerLimits(capacity=max(clients))) as session:
            yield SessionTarget(session)

    log = open(args.out / "progress.log", "w")

    def progress(row) -> None:
        line = f"{row.label}, {row.load}: {row.tokens_per_second:.1f} tok/s " \
               f"({time.perf_counter() - started:.0f} s)"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    rows = run_load([engine], prompts, cases, clients, [float(r) for r in args.rates.split(",") if r],
                    requests_per_client=args.requests_per_client,
                    poisson_requests=2 * max(clients), repeats=args.repeats, progress=progress)
    memory = (f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
              if on_gpu else "")
    header = [f"Device: {torch.cuda.get_device_name() if on_gpu else 'CPU'}; torch "
              f"{torch.__version__}; preset `{args.preset}` bf16 (random weights); prompt "
              f"{args.prompt_length} tokens, {args.max_tokens} new; block 16{memory}.", ""]
    text = "\n".join(header + [format_load(rows), ""] + speedups(rows)) + "\n"
    print(text)
    (args.out / "load.md").write_text(text)
    with open(args.out / "load.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].record()))
        writer.writeheader()
        writer.writerows(row.record() for row in rows)


if __name__ == "__main__":
    main()
