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
from .build_log import SUMMARY_SUFFIX, write_summary
from .manifest import ENGINE_RECORD_VERSION, plugin_library, sha256_file, write_manifest
from .network import NetworkError, add_profiles, prepare_network, profiles

RTX_COMPUTE_CAPABILITIES = ("SM86", "SM89", "SM120")
BUILD_LOG_SUFFIX = ".build.log"
TIMING_CACHE_FAILURE = "Failed to deserialize timing cache"


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


def _timing_cache(trt: Any, flavor: Flavor, config: Any, logger: Any,
                  path: Optional[Path]) -> None:
    """Load the cache file into the builder, refusing one that cannot be read or that TensorRT
    cannot deserialise. TensorRT-RTX chooses tactics on the target GPU at run time and its
    timing cache is a no-op (deprecated since RTX 1.2; deserialising one needs CUDA), so there
    the file is only checked to be readable."""
    data = b""
    if path is not None and path.exists():
        try:
            data = path.read_bytes()
        except OSError as err:
            raise BuildError(f"cannot read the timing cache {path}: {err.strerror}") from err
    if flavor.is_rtx:
        return
    seen = len(logger.lines)
    cache = config.create_timing_cache(data)
    failed = any(TIMING_CACHE_FAILURE in m for _, m in logger.lines[seen:])
    if cache is None or failed or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise BuildError(f"the timing cache {path} is corrupt or from another TensorRT or "
                         "GPU; delete it (a new one is written by the next build)")


def _save_timing_cache(flavor: Flavor, config: Any, path: Optional[Path]) -> None:
    if path is None or flavor.is_rtx:
        return
    try:
        path.write_bytes(bytes(config.get_timing_cache().serialize()))
    except OSError as err:
        raise BuildError(f"cannot write the timing cache {path}: {err.strerror}") from err


def _configure(trt: Any, flavor: Flavor, builder: Any, logger: Any, options: BuildOptions
               ) -> Any:
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    if flavor.is_rtx and options.compute_capabilities:
        known = [c for c in dir(trt.ComputeCapability) if c.startswith("SM")]
        unknown = [c for c in options.compute_capabilities if c not in known]
        if unknown:
            raise BuildError(f"unknown compute capabilities {unknown} for {flavor.name} "
                             f"{flavor.version}; it knows {', '.join(sorted(known))}")
        config.num_compute_capabilities = len(options.compute_capabilities)
        for i, cc in enumerate(options.compute_capabilities):
            config.set_compute_capability(getattr(trt.ComputeCapability, cc), i)
    _timing_cache(trt, flavor, config, logger, options.timing_cache)
    return config


def build_engine(flavor: Flavor, onnx_path: Path, graph: str, model_config: TwoTowerConfig,
                 max_context: int, options: BuildOptions, register: Optional[Callable] = None
                 ) -> tuple[bytes, dict, list[str]]:
    """(plan, pass report, build log lines) for one graph."""
    trt = flavor.module
    logger = capturing_logger(trt)
    builder = trt.Builder(logger)
    config = _configure(trt, flavor, builder, logger, options)
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
    _save_timing_cache(flavor, config, options.timing_cache)
    report["profiles"] = {s.name: {k: [list(v) for v in rng] for k, rng in s.shapes.items()}
                          for s in specs}
    return bytes(plan), report, [m for _, m in logger.lines]


def _plugin_registration() -> Callable:
    """The plugin creators' registration, run before parsing (the parser looks them up)."""
    try:
        from .plugins import register_plugins
    except ImportError as err:
        raise BuildError(f"plugin-lowering graphs need trt_twotower.engine.plugins: {err}") \
            from err
    return register_plugins


def _build_rtx_plugin_graph(onnx_path: Path, graph: str, config: TwoTowerConfig,
                            max_context: int, options: BuildOptions, engine_file: Path
                            ) -> tuple[dict, list[str]]:
    """TensorRT-RTX parses plugin nodes only through a private path that aborts the process
    unless its library name resolves: build in a child that can (``rtx_plugins``)."""
    from .rtx_plugins import PluginBuildError, build_isolated

    try:
        return build_isolated(onnx_path, graph, config, max_context, options, engine_file)
    except PluginBuildError as err:
        raise BuildError(str(err)) from err


def build_engines(build_dir: Path, options: BuildOptions,
                  progress: Callable[[str, Optional[dict]], None] = lambda g, e: None) -> dict:
    """Build every graph of a converted directory; write engines, build logs and their
    summaries, and the manifest. ``progress(graph, None)`` is called as a graph starts and
    ``progress(graph, record)`` when its engine is written."""
    build_dir = Path(build_dir)
    manifest = load_manifest(build_dir)
    flavor = find_flavor(options.flavor)
    plugin = uses_plugin_ops(manifest)
    if plugin and flavor.is_rtx and not options.allow_rtx_plugins:
        raise BuildError("plugin-lowering graphs need full TensorRT: TensorRT-RTX ships no "
                         "plugin API (its private path aborts the process unless isolated); "
                         "build the native lowering, or pass --allow-rtx-plugins to build "
                         "each graph in a child process anyway")
    register = _plugin_registration() if plugin and not flavor.is_rtx else None
    config = TwoTowerConfig.from_dict(manifest["config"])
    library = plugin_library() if plugin else None
    graphs = options.graphs or tuple(manifest["graphs"])
    missing = [g for g in graphs if g not in manifest["graphs"]]
    if missing:
        raise BuildError(f"{build_dir} has no graph(s) {missing}; it holds "
                         f"{', '.join(manifest['graphs'])}: convert them first")
    engines = {}
    for graph in graphs:
        progress(graph, None)
        record = manifest["graphs"][graph]
        engine_file = build_dir / f"{graph}.engine"
        if plugin and flavor.is_rtx:
            report, log = _build_rtx_plugin_graph(build_dir / record["file"], graph, config,
                                                  manifest["max_context"], options, engine_file)
        else:
            plan, report, log = build_engine(flavor, build_dir / record["file"], graph, config,
                                             manifest["max_context"], options, register)
            engine_file.write_bytes(plan)
            del plan
        (build_dir / f"{graph}{BUILD_LOG_SUFFIX}").write_text("\n".join(log) + "\n")
        write_summary(build_dir / f"{graph}{SUMMARY_SUFFIX}", log)
        device = (options.context_device if graph == names.CONTEXT_STEP
                  else options.denoiser_device)
        engines[graph] = {
            "file": engine_file.name, "tower": record["tower"], "device": device,
            "flavor": flavor.name, "flavor_version": flavor.version,
            "compute_capabilities": (list(options.compute_capabilities) if flavor.is_rtx
                                     else None),
            "inputs": record["inputs"], "outputs": record["outputs"],
            "profiles": report.pop("profiles"), "passes": report,
            "plugin_library_sha256": sha256_file(library) if library else None,
            "sha256": sha256_file(engine_file), "bytes": engine_file.stat().st_size,
            "build_seconds": report["build_seconds"],
            "build_log": f"{graph}{BUILD_LOG_SUFFIX}",
            "build_summary": f"{graph}{SUMMARY_SUFFIX}",
        }
        progress(graph, engines[graph])
    manifest.update(stage="engines", engines=engines,
                    build={"record_version": ENGINE_RECORD_VERSION,
                           "max_batch": options.max_batch, "block_size": options.block_size,
                           "max_prefill": options.max_prefill})
    write_manifest(build_dir, manifest)
    return manifest
