"""Per-GPU engine bytes of the full-width `nano-30b-a3b-slice` against its towers' weight bytes,
built with TensorRT-RTX on this CPU (too slow and large for CI).

Weights are random and different in every tensor (normal, std 0.02, one seed per tensor name),
made lazily as the exporter asks for them: constant weights compress in a plan and would hide
its size. Each tower is exported to one graph and built to one engine whose optimisation
profiles are its step types; the weights go in once. For comparison, the denoiser graph is also
built with a single profile: the engine one step type alone would need, which is what each of
the three denoiser engines of the earlier one-engine-per-step-type layout weighed.

    python bench/engine_memory.py --out bench/results/engine-memory-slice.md
"""

from __future__ import annotations

import argparse
import hashlib
import math
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from export_memory import peak_rss_gib  # noqa: E402

from trt_twotower import names  # noqa: E402
from trt_twotower.config import preset  # noqa: E402
from trt_twotower.engine import build as engine_build  # noqa: E402
from trt_twotower.engine.build import BuildOptions, build_engine  # noqa: E402
from trt_twotower.engine.flavor import find_flavor  # noqa: E402
from trt_twotower.export.convert import ConvertOptions, export_graph  # noqa: E402
from trt_twotower.reference.loading import TOWER_GROUPS, expected_shapes  # noqa: E402

STD = 0.02


def random_weights(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype):
    """Each tensor made on demand, normal with its own seed (from its name), in bf16."""
    def get(name: str) -> torch.Tensor:
        seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(shapes[name], generator=gen) * STD).to(dtype)
    return get


def tower_weight_bytes(shapes: dict[str, tuple[int, ...]], tower: str, itemsize: int = 2
                       ) -> int:
    """The tower's parameters at ``itemsize`` bytes each (bf16 as in the checkpoint)."""
    return sum(itemsize * math.prod(s) for n, s in shapes.items()
               if n.startswith(TOWER_GROUPS[tower]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="nano-30b-a3b-slice")
    parser.add_argument("--max-context", type=int, default=4096)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    config = preset(args.preset)
    flavor = find_flavor("tensorrt-rtx")
    shapes = expected_shapes(config)
    weights = random_weights(shapes, torch.bfloat16)
    options = BuildOptions(flavor="tensorrt-rtx", max_batch=8, block_size=16, max_prefill=512)
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="engine-memory-"))
    all_profiles = engine_build.profiles
    try:
        for graph in names.GRAPHS:
            tower = names.TOWER_OF_GRAPH[graph]
            start = time.perf_counter()
            path = export_graph(config, weights, scratch, graph,
                                ConvertOptions(dtype="bfloat16", max_context=args.max_context))
            exported = time.perf_counter() - start
            data_bytes = Path(f"{path}.data").stat().st_size
            variants = [("all step types", None)]
            if tower == "denoiser":
                variants.append(("block step only", "block"))
            for label, only in variants:
                # the build's profile list, narrowed to one step type for the comparison row
                engine_build.profiles = all_profiles if only is None else _only(all_profiles,
                                                                                 only)
                engine = scratch / f"{graph}.engine"
                report, _ = build_engine(flavor, path, graph, config, args.max_context,
                                         options, engine)
                rows.append((tower, label, report["build_seconds"], exported,
                             tower_weight_bytes(shapes, tower), data_bytes,
                             engine.stat().st_size, peak_rss_gib()))
                engine.unlink()
                print(rows[-1], flush=True)
            for f in scratch.iterdir():
                f.unlink()
    finally:
        shutil.rmtree(scratch)
    text = report_text(args, flavor, config, rows)
    print(text)
    if args.out:
        args.out.write_text(text)


def _only(profiles, name: str):
    def wrapped(*a, **k):
        return [p for p in profiles(*a, **k) if p.name == name]
    return wrapped


def report_text(args, flavor, config, rows) -> str:
    lines = [f"# Engine bytes per GPU: `{args.preset}` with random weights ({flavor.name} "
             f"{flavor.version}, bf16)", "",
             f"Command: `python bench/engine_memory.py --out ...` (max context "
             f"{args.max_context}, max batch 8, block 16, prefill chunk 512, compute "
             "capabilities SM86/SM89/SM120), 2-core CPU, no GPU. Weights: N(0, 0.02) in bf16, "
             "a different seed per tensor.", "",
             "| tower | engine profiles | export (s) | build (s) | tower weights, bf16 (GiB) "
             "| graph data (GiB) | plan (GiB) | plan / weights | peak RSS so far (GiB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for tower, label, build, exported, weights, data, plan, rss in rows:
        lines.append(f"| {tower} | {label} | {exported:.0f} | {build:.0f} | "
                     f"{weights / 2**30:.3f} | {data / 2**30:.3f} | {plan / 2**30:.3f} | "
                     f"{plan / weights:.4f} | {rss:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
