"""Checkpoint → per-tower network definitions: every step graph of both towers, the config,
the tokenizer and a manifest draft in one output directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .. import names
from ..config import TwoTowerConfig
from .attention import LOWERINGS, PLUGIN
from .graph import GraphBuilder
from .moe import ExportError
from .towers import context_step_graph, denoiser_step_graph

Weights = Callable[[str], torch.Tensor]
MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_CONTEXT = 1024


@dataclass(frozen=True)
class ConvertOptions:
    lowering: str = "native"
    dtype: str = "float32"
    max_context: int = DEFAULT_MAX_CONTEXT
    graphs: Sequence[str] = names.GRAPHS

    def __post_init__(self) -> None:
        if self.lowering not in LOWERINGS:
            raise ExportError(f"unknown lowering {self.lowering!r}; choose one of "
                              f"{', '.join(LOWERINGS)}")
        if self.dtype not in EXPORT_DTYPES:
            raise ExportError(f"unknown dtype {self.dtype!r}; choose one of "
                              f"{', '.join(EXPORT_DTYPES)}")
        if self.max_context < 2:
            raise ExportError(f"max_context must be at least 2, got {self.max_context}")
        unknown = set(self.graphs) - set(names.GRAPHS)
        if unknown:
            raise ExportError(f"unknown graph(s) {sorted(unknown)}; known: {names.GRAPHS}")


def prepare_output(out_dir: Path) -> Path:
    """Create OUT and check it is writable before any work starts."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ExportError(f"cannot write to {out_dir}: {err.strerror or err}") from err
    return out_dir


def export_graph(config: TwoTowerConfig, weights: Weights, out_dir: Path, graph: str,
                 options: ConvertOptions, on_layer: Callable[[int], None] = lambda i: None
                 ) -> Path:
    """Write ``graph``.onnx and its ``.onnx.data`` into out_dir, one layer at a time."""
    dtype = EXPORT_DTYPES[options.dtype]
    path = out_dir / f"{graph}.onnx"
    builder = GraphBuilder(graph, dtype, out_dir / f"{graph}.onnx.data")
    if graph == names.CONTEXT_STEP:
        context_step_graph(builder, config, weights, options.max_context, on_layer)
    else:
        denoiser_step_graph(builder, config, weights, options.max_context, graph,
                            options.lowering, on_layer)
    return builder.save(path)


def graph_record(config: TwoTowerConfig, graph: str, options: ConvertOptions, path: Path
                 ) -> dict:
    """What the manifest says of one graph: its file and its I/O (names, dtypes, shapes)."""
    inputs, outputs = names.graph_io(config, options.max_context, graph)

    def io(specs: list[names.TensorSpec]) -> list[dict]:
        return [{"name": s.name, "dtype": options.dtype if s.dtype == names.MODEL else s.dtype,
                 "shape": list(s.shape)} for s in specs]

    tower = "context" if graph == names.CONTEXT_STEP else "denoiser"
    return {"file": path.name, "data_file": f"{path.name}.data", "tower": tower,
            "inputs": io(inputs), "outputs": io(outputs),
            "bytes": path.stat().st_size + os.path.getsize(f"{path}.data")}


def write_manifest_draft(out_dir: Path, config: TwoTowerConfig, options: ConvertOptions,
                         graphs: dict[str, dict], source: str,
                         checkpoint_digest: Optional[str]) -> Path:
    manifest = {
        "schema": MANIFEST_SCHEMA, "stage": "graphs", "source": source,
        "checkpoint_digest": checkpoint_digest, "config": config.to_dict(),
        "lowering": options.lowering, "dtype": options.dtype,
        "max_context": options.max_context, "graphs": graphs, "engines": {},
    }
    path = out_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def convert(config: TwoTowerConfig, weights: Weights, out_dir: Path, options: ConvertOptions,
            tokenizer, source: str, checkpoint_digest: Optional[str] = None,
            progress: bool = True) -> dict:
    """Write every requested graph, config.json, tokenizer.json and the manifest draft."""
    from tqdm import tqdm

    out_dir = prepare_output(out_dir)
    records = {}
    with tqdm(total=len(options.graphs) * config.num_hidden_layers, unit="layer",
              desc="convert", disable=not progress) as bar:
        for graph in options.graphs:
            bar.set_postfix_str(graph)
            path = export_graph(config, weights, out_dir, graph, options,
                                on_layer=lambda i: bar.update(1))
            records[graph] = graph_record(config, graph, options, path)
    config.save(out_dir)
    tokenizer.save(out_dir)
    write_manifest_draft(out_dir, config, options, records, source, checkpoint_digest)
    return load_manifest(out_dir)


def load_manifest(out_dir: Path) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise ExportError(f"no {MANIFEST} in {out_dir}; run `trt-twotower convert` first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{path} is not valid JSON: {err}") from err
    if manifest.get("schema") != MANIFEST_SCHEMA:
        raise ExportError(f"{path} has schema {manifest.get('schema')!r}; this trt-twotower "
                          f"reads schema {MANIFEST_SCHEMA}: convert again")
    return manifest


def uses_plugin_ops(manifest: dict) -> bool:
    return manifest.get("lowering") == PLUGIN
