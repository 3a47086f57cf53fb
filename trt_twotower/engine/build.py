"""One TensorRT engine per tower, built on and for the GPU that tower runs on, plus the manifest.

Each tower's graph serves all of its step types through optimisation profiles and inputs, so
its engine holds the tower's weights once: one weight copy per GPU.

CPU-only machines build with TensorRT-RTX ("CPU-only AOT"): real engines, compiled for the
compute capabilities given, that run on RTX-class GPUs. GPU hosts build with TensorRT.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .. import names
from ..config import TwoTowerConfig
from ..errors import TwoTowerError
from ..manifest import BuildSettings, EngineRecord, Manifest, sha256_file
from .build_log import SUMMARY_SUFFIX, write_summary
from .flavor import Flavor, find_flavor
from .network import NetworkError, add_profiles, prepare_network, profiles
from .plugin_library import PluginLibraryError, find_plugin_library

RTX_COMPUTE_CAPABILITIES = ("SM86", "SM89", "SM120")
# fp8 kernels: Ada (SM89) and RTX Blackwell (SM120); TensorRT-RTX has no Hopper target and
# refuses fp8 for SM86 ("the model contains HW-specific datatypes: fp8_e4m3").
FP8_COMPUTE_CAPABILITIES = ("SM89", "SM120")
BUILD_LOG_SUFFIX = ".build.log"
TIMING_CACHE_FAILURE = "Failed to deserialize timing cache"


class BuildError(TwoTowerError, RuntimeError):
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


@contextlib.contextmanager
def on_device(flavor: Flavor, device: int) -> Iterator[None]:
    """Full TensorRT builds for the GPU that is current when it builds: make that the target
    GPU, so an engine "for GPU 1" is tuned on GPU 1. TensorRT-RTX builds for the compute
    capabilities it is given, on any machine, and needs no device."""
    if flavor.is_rtx:
        yield
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not 0 <= device < count:
        raise BuildError(f"{flavor.name} builds on the engine's own GPU, and GPU {device} is "
                         f"not on this host (it has {count}); pass --context-device/"
                         "--denoiser-device indices of this host's GPUs")
    with torch.cuda.device(device):
        yield


def build_engine(flavor: Flavor, onnx_path: Path, graph: str, model_config: TwoTowerConfig,
                 max_context: int, options: BuildOptions, engine_file: Path,
                 register: Optional[Callable] = None, device: int = 0
                 ) -> tuple[dict, list[str]]:
    """Build one graph on GPU ``device`` and write its engine to ``engine_file``; returns
    (pass report, build log lines)."""
    trt = flavor.module
    logger = capturing_logger(trt)
    with on_device(flavor, device):
        builder = trt.Builder(logger)
        config = _configure(trt, flavor, builder, logger, options)
        try:
            network, _parser, report = prepare_network(trt, builder, logger, onnx_path, graph,
                                                       model_config, max_context, register)
        except NetworkError as err:
            raise BuildError(str(err)) from err
        specs = profiles(model_config, graph, max_context, options.max_batch,
                         options.block_size, options.max_prefill)
        add_profiles(builder, config, specs)
        start = time.perf_counter()
        built = build_to_file(trt, builder, network, config, engine_file)
        report["build_seconds"] = round(time.perf_counter() - start, 3)
    if not built:
        raise BuildError(f"{graph}: TensorRT could not build the engine: "
                         + " | ".join(logger.errors()[-3:]))
    _save_timing_cache(flavor, config, options.timing_cache)
    report["profiles"] = {s.name: {k: [list(v) for v in rng] for k, rng in s.shapes.items()}
                          for s in specs}
    return report, [m for _, m in logger.lines]


def build_to_file(trt: Any, builder: Any, network: Any, config: Any, engine_file: Path) -> bool:
    """Build and write the serialised engine. At full scale a plan is as large as its tower's
    weights (~59 GiB), so it streams to the file as the builder serialises it where the
    builder can (TensorRT 10.8+, TensorRT-RTX), and is otherwise written from TensorRT's own
    buffer, never copied into Python bytes."""
    built = False
    try:
        with open(engine_file, "wb") as f:
            if hasattr(builder, "build_serialized_network_to_stream"):
                class FileWriter(trt.IStreamWriter):
                    def __init__(self) -> None:
                        trt.IStreamWriter.__init__(self)

                    def write(self, data: bytes) -> int:
                        return f.write(data)

                built = bool(builder.build_serialized_network_to_stream(network, config,
                                                                         FileWriter()))
            else:
                plan = builder.build_serialized_network(network, config)
                built = plan is not None
                if built:
                    f.write(memoryview(plan).cast("B"))
    finally:
        if not built:  # never leave a half-written engine behind
            engine_file.unlink(missing_ok=True)
    return built


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
        return build_isolated(build_plugin_graph_in_child, onnx_path, graph, config,
                              max_context, options, engine_file)
    except PluginBuildError as err:
        raise BuildError(str(err)) from err


def build_plugin_graph_in_child(onnx_path: Path, graph: str, config: TwoTowerConfig,
                                max_context: int, options: BuildOptions, engine_file: Path
                                ) -> tuple[dict, list[str]]:
    """What the isolated child runs: a TensorRT-RTX build with the plugin creators."""
    from .plugins import register_plugins

    return build_engine(find_flavor("tensorrt-rtx"), onnx_path, graph, config, max_context,
                        options, engine_file, register_plugins)


def _plugin_digest(manifest: Manifest) -> Optional[str]:
    """The digest of the plugin library a plugin-lowering engine is built against: required,
    because an engine with plugin nodes cannot run without the very library it was built with."""
    if not manifest.uses_plugin_ops:
        return None
    try:
        return sha256_file(find_plugin_library())
    except PluginLibraryError as err:
        raise BuildError(f"plugin-lowering engines record the plugin library they need: {err}"
                         ) from err


def _check_plugin_shapes(config: TwoTowerConfig, options: BuildOptions) -> None:
    """Shapes the kernels cannot run, refused before a long parse and build (TensorRT would
    only report a non-zero return code from the plugin's configure step)."""
    from .plugins import PluginShapeError, check_plugin_shapes

    try:
        check_plugin_shapes(config, options.block_size, options.max_batch)
    except PluginShapeError as err:
        raise BuildError(str(err)) from err


def _check_fp8_targets(manifest: Manifest, flavor: Flavor, options: BuildOptions) -> None:
    """fp8 graphs build for fp8-capable targets only: refuse others before a long build."""
    quantization = manifest.quantization
    if quantization is None or quantization.mode != "fp8" or not flavor.is_rtx:
        return
    other = [c for c in options.compute_capabilities if c not in FP8_COMPUTE_CAPABILITIES]
    if other or not options.compute_capabilities:
        raise BuildError(f"fp8 engines need fp8 kernels, which TensorRT-RTX has for "
                         f"{' and '.join(FP8_COMPUTE_CAPABILITIES)} only; the build asked for "
                         f"{', '.join(options.compute_capabilities) or 'its default targets'}: "
                         "pass --compute-capability SM89 and/or SM120")


def _device_of(graph: str, options: BuildOptions) -> int:
    return (options.context_device if names.TOWER_OF_GRAPH[graph] == "context"
            else options.denoiser_device)


def build_engines(build_dir: Path, options: BuildOptions,
                  progress: Callable[[str, Optional[EngineRecord]], None] = lambda g, e: None
                  ) -> Manifest:
    """Build one engine per tower graph of a converted directory, each on its tower's GPU;
    write engines, build logs and their summaries, and the manifest. ``progress(graph, None)``
    is called as a graph starts and ``progress(graph, record)`` when its engine is written."""
    build_dir = Path(build_dir)
    manifest = Manifest.load(build_dir)
    flavor = find_flavor(options.flavor)
    plugin = manifest.uses_plugin_ops
    if plugin and flavor.is_rtx and not options.allow_rtx_plugins:
        raise BuildError("plugin-lowering graphs need full TensorRT: TensorRT-RTX ships no "
                         "plugin API (its private path aborts the process unless isolated); "
                         "build the native lowering, or pass --allow-rtx-plugins to build "
                         "each graph in a child process anyway")
    _check_fp8_targets(manifest, flavor, options)
    register = _plugin_registration() if plugin and not flavor.is_rtx else None
    library_digest = _plugin_digest(manifest)
    if plugin:
        _check_plugin_shapes(manifest.config, options)
    graphs = options.graphs or tuple(manifest.graphs)
    missing = [g for g in graphs if g not in manifest.graphs]
    if missing:
        raise BuildError(f"{build_dir} has no graph(s) {missing}; it holds "
                         f"{', '.join(manifest.graphs)}: convert them first")
    manifest.verify_graphs(build_dir, list(graphs))
    engines = {}
    for graph in graphs:
        progress(graph, None)
        record = manifest.graphs[graph]
        engine_file = build_dir / f"{graph}.engine"
        device = _device_of(graph, options)
        if plugin and flavor.is_rtx:
            report, log = _build_rtx_plugin_graph(build_dir / record.file, graph,
                                                  manifest.config, manifest.max_context,
                                                  options, engine_file)
        else:
            report, log = build_engine(flavor, build_dir / record.file, graph,
                                       manifest.config, manifest.max_context, options,
                                       engine_file, register, device)
        (build_dir / f"{graph}{BUILD_LOG_SUFFIX}").write_text("\n".join(log) + "\n")
        write_summary(build_dir / f"{graph}{SUMMARY_SUFFIX}", log)
        profiles_done = {name: {k: tuple(tuple(s) for s in rng) for k, rng in shapes.items()}
                         for name, shapes in report.pop("profiles").items()}
        engines[graph] = EngineRecord(
            file=engine_file.name, tower=record.tower, device=device, flavor=flavor.name,
            flavor_version=flavor.version,
            compute_capabilities=(tuple(options.compute_capabilities) if flavor.is_rtx
                                  else None),
            inputs=record.inputs, outputs=record.outputs, profiles=profiles_done,
            passes=report, plugin_library_sha256=library_digest,
            sha256=sha256_file(engine_file), bytes=engine_file.stat().st_size,
            build_seconds=report["build_seconds"], build_log=f"{graph}{BUILD_LOG_SUFFIX}",
            build_summary=f"{graph}{SUMMARY_SUFFIX}")
        progress(graph, engines[graph])
    built = manifest.with_engines(engines, BuildSettings(options.max_batch, options.block_size,
                                                         options.max_prefill))
    built.save(build_dir)
    return built
