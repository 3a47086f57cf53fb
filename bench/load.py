"""In-process engine under load (closed-loop clients and Poisson arrivals) on the built-in
model: diffusion, diffusion committing exactly K = 4 per step, and AR on the same engine.

    python bench/load.py --backend onnxruntime --out bench/results/load-cpu.md
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trt_twotower.cli.bench import held_out_prompts  # noqa: E402
from trt_twotower.policy import GenerationSettings  # noqa: E402
from trt_twotower.reference.sources import open_source  # noqa: E402
from trt_twotower.runtime import backends  # noqa: E402
from trt_twotower.runtime.load_benchmark import format_load, run_load  # noqa: E402
from trt_twotower.runtime.scheduler import SchedulerLimits  # noqa: E402
from trt_twotower.runtime.session import TwoTowerSession  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", choices=("torch", "onnxruntime"), default="onnxruntime")
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--rates", default="4,16")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--poisson-requests", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    source = open_source(None, None)
    max_context = 128
    with tempfile.TemporaryDirectory() as scratch:
        if args.backend == "torch":
            opened = backends.open_torch(source, max_context)
        else:
            from trt_twotower.export.convert import ConvertOptions, convert
            convert(source.config, source.model.state_dict().__getitem__, Path(scratch),
                    ConvertOptions(max_context=max_context), source.tokenizer, source.name,
                    progress=False)
            opened = backends.open_onnxruntime(Path(scratch))
        prompts = held_out_prompts(opened.tokenizer, 64, 32, opened.config.vocab_size, 0)
        n = args.max_new_tokens
        cases = [("diffusion γ 0.8", GenerationSettings(max_new_tokens=n, stop_at_eos=False)),
                 ("diffusion K=4", GenerationSettings(max_new_tokens=n, forced_commits=4,
                                                      stop_at_eos=False)),
                 ("AR", GenerationSettings(mode="ar", max_new_tokens=n, stop_at_eos=False))]

        def factory() -> TwoTowerSession:
            return TwoTowerSession(opened.context, opened.denoiser, opened.config,
                                   max_context, opened.dtype, opened.fused_unmask,
                                   SchedulerLimits(capacity=64))

        rows = run_load(factory, prompts, cases, [int(c) for c in args.clients.split(",")],
                        [float(r) for r in args.rates.split(",")], args.requests_per_client,
                        args.poisson_requests, progress=lambda row: print(row.record(),
                                                                          flush=True))
    table = format_load(rows)
    text = (f"# In-process engine under load: built-in model, {args.backend} backend, 2-core "
            f"CPU\n\nCommand: `python bench/load.py --backend {args.backend}` ({n} new tokens "
            "per request, 32-token held-out prompts, block 16, one warmed engine per row)\n\n"
            + table + "\n")
    print(text)
    if args.out:
        args.out.write_text(text)
        with open(args.out.with_suffix(".csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0].record()))
            writer.writeheader()
            writer.writerows(row.record() for row in rows)


if __name__ == "__main__":
    main()
