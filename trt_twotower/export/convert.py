"""Checkpoint → per-tower network definitions: every step graph of both towers, the config,
the tokenizer and a manifest draft in one output directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .. import names
from ..config import TwoTowerConfig
from ..manifest import GraphRecord, Manifest, QuantizationRecord, TensorRecord, sha256_file
from ..reference.quantization import Calibration, QuantizationError, QuantRecipe
from .attention import LOWERINGS
from .graph import GraphBuilder
from .moe import ExportError
from .quantize import QUANTIZATION_FILE, GraphQuantizer, calibrate
from .towers import context_step_graph, denoiser_step_graph

Weights = Callable[[str], torch.Tensor]
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_CONTEXT = 1024


@dataclass(frozen=True)
class ConvertOptions:
    lowering: str = "native"
    dtype: str = "float32"
    max_context: int = DEFAULT_MAX_CONTEXT
    graphs: Sequence[str] = names.GRAPHS
    quantization: QuantRecipe = QuantRecipe()

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
                 options: ConvertOptions, on_layer: Callable[[int], None] = lambda i: None,
                 calibration: Optional[Calibration] = None) -> Path:
    """Write ``graph``.onnx and its ``.onnx.data`` into out_dir, one layer at a time (the
    in-scope GEMMs through Q/DQ when ``options.quantization`` asks for it)."""
    dtype = EXPORT_DTYPES[options.dtype]
    path = out_dir / f"{graph}.onnx"
    builder = GraphBuilder(graph, dtype, out_dir / f"{graph}.onnx.data")
    if options.quantization.enabled:
        builder.quantizer = GraphQuantizer(config, options.quantization, calibration)
    if graph == names.CONTEXT_STEP:
        context_step_graph(builder, config, weights, options.max_context, on_layer)
    else:
        denoiser_step_graph(builder, config, weights, options.max_context, options.lowering,
                            on_layer)
    return builder.save(path)


def graph_record(config: TwoTowerConfig, graph: str, options: ConvertOptions, path: Path
                 ) -> GraphRecord:
    """What the manifest says of one graph: its file and its I/O (names, dtypes, shapes)."""
    inputs, outputs = names.graph_io(config, options.max_context, graph)

    def io(specs: list[names.TensorSpec]) -> tuple[TensorRecord, ...]:
        return tuple(TensorRecord(s.name, options.dtype if s.dtype == names.MODEL else s.dtype,
                                  tuple(s.shape)) for s in specs)

    data = Path(f"{path}.data")
    return GraphRecord(path.name, data.name, names.TOWER_OF_GRAPH[graph], io(inputs),
                       io(outputs), path.stat().st_size + data.stat().st_size,
                       sha256_file(path), sha256_file(data))


def calibrate_into(config: TwoTowerConfig, weights: Weights, out_dir: Path,
                   recipe: QuantRecipe, windows: Optional[torch.Tensor]
                   ) -> tuple[Optional[Calibration], Optional[QuantizationRecord]]:
    """Calibrate where the recipe needs it, save the statistics beside the graphs (the
    quantised reference reads them) and say so in a manifest record."""
    (out_dir / QUANTIZATION_FILE).unlink(missing_ok=True)   # never a stale one beside graphs
    if not recipe.enabled:
        return None, None
    if not recipe.needs_calibration:
        return None, QuantizationRecord(recipe.mode, recipe.scope, recipe.block_size)
    if windows is None:
        raise ExportError(f"--quantize {recipe.mode} calibrates on prompts and none were given")
    try:
        calibration = calibrate(config, weights, recipe, windows)
    except QuantizationError as err:
        raise ExportError(str(err)) from err
    path = calibration.save(out_dir / QUANTIZATION_FILE)
    return calibration, QuantizationRecord(recipe.mode, recipe.scope, recipe.block_size,
                                           path.name, sha256_file(path), calibration.prompts,
                                           calibration.tokens)


def convert(config: TwoTowerConfig, weights: Weights, out_dir: Path, options: ConvertOptions,
            tokenizer, source: str, checkpoint_digest: Optional[str] = None,
            progress: bool = True, calibration_windows: Optional[torch.Tensor] = None
            ) -> Manifest:
    """Write every requested graph, config.json, tokenizer.json and the manifest draft; a
    quantised conversion first calibrates on ``calibration_windows`` [prompts, length]."""
    from tqdm import tqdm

    out_dir = prepare_output(out_dir)
    calibration, quantization = calibrate_into(config, weights, out_dir, options.quantization,
                                               calibration_windows)
    records = {}
    with tqdm(total=len(options.graphs) * config.num_hidden_layers, unit="layer",
              desc="convert", disable=not progress) as bar:
        for graph in options.graphs:
            bar.set_postfix_str(graph)
            try:
                path = export_graph(config, weights, out_dir, graph, options,
                                    on_layer=lambda i: bar.update(1), calibration=calibration)
            except QuantizationError as err:
                raise ExportError(str(err)) from err
            records[graph] = graph_record(config, graph, options, path)
    config.save(out_dir)
    tokenizer.save(out_dir)
    manifest = Manifest(source, checkpoint_digest, config, options.lowering, options.dtype,
                        options.max_context, records, quantization=quantization)
    manifest.save(out_dir)
    return manifest
