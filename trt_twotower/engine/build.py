"""One TensorRT engine per tower graph, for the GPU that tower runs on, plus the manifest.

CPU-only machines build with TensorRT-RTX ("CPU-only AOT"): real engines, compiled for the
compute capabilities given, that run on RTX-class GPUs. GPU hosts build with TensorRT.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .. import names
from ..config import TwoTowerConfig
from ..export.convert import load_manifest, uses_plugin_ops
from .flavor import Flavor, find_flavor
from .manifest import plugin_library, sha256_file, write_manifest
from .network import NetworkError, add_profiles, prepare_network, profiles

RTX_COMPUTE_CAPABILITIES = ("SM86", "SM89", "SM120")
BUILD_LOG_SUFFIX = ".build.log"


class BuildError(RuntimeError):
    """An engine that could not be built, with the builder's own error lines."""


@dataclass(frozen=True)
class BuildOptions:
    flavor: str = "auto"
    context_device: int = 0
    denoiser_device: int = 1
    max_batch: int = 4
    block_size: int = 16
    max_prefill: int = 256
    compute_capabilities: tuple[str, ...] = RTX_COMPUTE_CAPABILITIES
    timing_cache: Optional[Path] = None
    workspace_mib: int = 4096
    allow_rtx_plugins: bool = False
    graphs: tuple[str, ...] = field(default_factory=tuple)


def capturing_logger(trt: Any) -> Any:
    """A logger that keeps every message: the DETAILED build log is how engines are inspected
    where deserialising them is impossible (no GPU)."""
    class Captured(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.lines: list[tuple[Any, str]] = []

        def log(self, severity: Any, msg: str) -> None:
            self.lines.append((severity, msg))

        def errors(self) -> list[str]:
            return [m for s, m in self.lines if s in (trt.ILogger.ERROR,
                                                      trt.ILogger.INTERNAL_ERROR)]
    return Captured()


def _timing_cache(trt: Any, flavor: Flavor, config: Any, path: Optional[Path]) -> None:
    """Load the cache file into the builder (TensorRT-RTX ignores timing caches: tactics are
    chosen on the target GPU at run time, so there it is only checked to be readable)."""
    data = b""
    if path is not None and path.exists():
        try:
            data = path.read_bytes()
        except OSError as err:
            raise BuildError(f"cannot read the timing cache {path}: {err.strerror}") from err
    if flavor.is_rtx:
        return
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise BuildError(f"the timing cache {path} is unreadable or from another TensorRT; "
                         "delete it to start a new one")


def _configure(trt: Any, flavor: Flavor, builder: Any, options: BuildOptions) -> Any:
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    if flavor.is_rtx and options.compute_capabilities:
        config.num_compute_capabilities = len(options.compute_capabilities)
        for i, cc in enumerate(options.compute_capabilities):
            config.set_compute_capability(getattr(trt.ComputeCapability, cc), i)
    _timing_cache(trt, flavor, config, options.timing_cache)
    return config


def build_engine(flavor: Flavor, onnx_path: Path, graph: str, model_config: TwoTowerConfig,
                 max_context: int, options: BuildOptions, register: Optional[Callable] = None
                 ) -> tuple[bytes, dict, list[str]]:
    """(plan, pass report, build log lines) for one graph."""
    trt = flavor.module
    logger = capturing_logger(trt)
    builder = trt.Builder(logger)
    config = _configure(trt, flavor, builder, options)
    try:
        network, _parser, report = prepare_network(trt, builder, logger, onnx_path, graph,
                                                   model_config, max_context, register)
    except NetworkError as err:
        raise BuildError(str(err)) from err
    specs = profiles(model_config, graph, max_context, options.max_batch, options.block_size,
                     options.max_prefill)
    add_profiles(builder, config, specs)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    report["build_seconds"] = round(time.perf_counter() - start, 3)
    if plan is None:
        raise BuildError(f"{graph}: TensorRT could not build the engine: "
                         + " | ".join(logger.errors()[-3:]))
    if options.timing_cache is not None and not flavor.is_rtx:
        options.timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    report["profiles"] = {s.name: {k: [list(v) for v in rng] for k, rng in s.shapes.items()}
                          for s in specs}
    return bytes(plan), report, [m for _, m in logger.lines]


def build_engines(build_dir: Path, options: BuildOptions,
                  on_graph: Callable[[str], None] = lambda g: None) -> dict:
    """Build every graph of a converted directory; write engines, build logs, manifest."""
    build_dir = Path(build_dir)
    manifest = load_manifest(build_dir)
    flavor = find_flavor(options.flavor)
    plugin = uses_plugin_ops(manifest)
    if plugin and flavor.is_rtx and not options.allow_rtx_plugins:
        raise BuildError("plugin-lowering graphs need full TensorRT: TensorRT-RTX ships no "
                         "plugin API (its hidden path can abort the process); build the "
                         "native lowering, or pass --allow-rtx-plugins to try anyway")
    register = None
    if plugin:
        from .plugins import register_plugins
        register = register_plugins
    config = TwoTowerConfig.from_dict(manifest["config"])
    library = plugin_library() if plugin else None
    engines = {}
    for graph in options.graphs or tuple(manifest["graphs"]):
        on_graph(graph)
        record = manifest["graphs"][graph]
        plan, report, log = build_engine(flavor, build_dir / record["file"], graph, config,
                                         manifest["max_context"], options, register)
        engine_file = build_dir / f"{graph}.engine"
        engine_file.write_bytes(plan)
        (build_dir / f"{graph}{BUILD_LOG_SUFFIX}").write_text("\n".join(log) + "\n")
        device = (options.context_device if graph == names.CONTEXT_STEP
                  else options.denoiser_device)
        engines[graph] = {
            "file": engine_file.name, "tower": record["tower"], "device": device,
            "flavor": flavor.name, "flavor_version": flavor.version,
            "compute_capabilities": list(options.compute_capabilities) if flavor.is_rtx else None,
            "inputs": record["inputs"], "outputs": record["outputs"],
            "profiles": report.pop("profiles"), "passes": report,
            "plugin_library_sha256": sha256_file(library) if library else None,
            "sha256": sha256_file(engine_file), "bytes": len(plan),
            "build_log": f"{graph}{BUILD_LOG_SUFFIX}",
        }
    manifest.update(stage="engines", engines=engines,
                    build={"max_batch": options.max_batch, "block_size": options.block_size,
                           "max_prefill": options.max_prefill})
    write_manifest(build_dir, manifest)
    return manifest
