"""Build both towers of the full-width `nano-30b-a3b-slice` preset with TensorRT-RTX on a CPU
and record build time, plan size and peak memory (too slow and large for CI).

    python bench/build_slice.py --out bench/results/slice-build.md
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from export_memory import lazy_weights  # noqa: E402
from trt_twotower import names  # noqa: E402
from trt_twotower.config import preset  # noqa: E402
from trt_twotower.engine.build import BuildOptions, build_engine  # noqa: E402
from trt_twotower.engine.flavor import find_flavor  # noqa: E402
from trt_twotower.export.convert import ConvertOptions, export_graph  # noqa: E402
from trt_twotower.reference.loading import expected_shapes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="nano-30b-a3b-slice")
    parser.add_argument("--max-context", type=int, default=4096)
    parser.add_argument("--graphs", default="context_step,denoiser_step")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    config = preset(args.preset)
    flavor = find_flavor("tensorrt-rtx")
    weights = lazy_weights(expected_shapes(config), torch.bfloat16)
    options = BuildOptions(flavor="tensorrt-rtx", max_batch=8, block_size=16, max_prefill=512)
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="slice-build-"))
    try:
        for graph in args.graphs.split(","):
            start = time.perf_counter()
            path = export_graph(config, weights, scratch,
                                graph, ConvertOptions(dtype="bfloat16", max_context=args.max_context))
            exported = time.perf_counter() - start
            plan, report, _ = build_engine(flavor, path, graph, config, args.max_context, options)
            rows.append((graph, exported, report["build_seconds"], len(plan) / 2**30,
                         resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))
            del plan
            for f in scratch.iterdir():
                f.unlink()
            print(rows[-1], flush=True)
    finally:
        shutil.rmtree(scratch)
    lines = [f"# TensorRT-RTX CPU build of `{args.preset}` (bf16, {flavor.name} {flavor.version})",
             "", f"Command: `python bench/build_slice.py` (max context {args.max_context}, max "
             "batch 8, block 16, prefill chunk 512, compute capabilities SM86/SM89/SM120), "
             "2-core CPU, no GPU.", "",
             "| graph | export (s) | build (s) | plan (GiB) | peak RSS so far (GiB) |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {g} | {e:.0f} | {b:.0f} | {p:.2f} | {r:.1f} |" for g, e, b, p, r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
