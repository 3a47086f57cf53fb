"""The build manifest: one typed record of what a build directory holds, read and checked here.

``convert`` writes the graphs' part (stage "graphs"); ``build`` adds one engine per tower
(stage "engines"). Every consumer loads it through ``Manifest.load``, which refuses a file of
another schema, fields of the wrong type and paths that leave the build directory, so no caller
reads a key by its string or trusts a path it was handed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from .config import ConfigError, TwoTowerConfig
from .errors import TwoTowerError

MANIFEST = "manifest.json"
# Schema 2: one graph and one engine per tower (schema 1 had a graph per denoiser step type).
MANIFEST_SCHEMA = 2
# Bump when an engine record changes meaning, so older builds are refused with "rebuild".
ENGINE_RECORD_VERSION = 2
STAGES = ("graphs", "engines")


class ManifestError(TwoTowerError, RuntimeError):
    """A build directory whose manifest is missing, malformed, or does not match its files."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class TensorRecord:
    """One graph or engine input/output: name, dtype, shape (ints or symbolic axis names)."""

    name: str
    dtype: str
    shape: tuple[Any, ...]


@dataclass(frozen=True)
class GraphRecord:
    file: str
    data_file: str
    tower: str
    inputs: tuple[TensorRecord, ...]
    outputs: tuple[TensorRecord, ...]
    bytes: int
    sha256: str          # of ``file``
    data_sha256: str     # of ``data_file``: weights changed on disk are refused, not run


# profile name → input name → (min, opt, max) shapes
Profiles = dict[str, dict[str, tuple[tuple[int, ...], ...]]]


@dataclass(frozen=True)
class EngineRecord:
    """One tower's engine: every step type of the tower is one of its ``profiles``."""

    file: str
    tower: str
    device: int
    flavor: str
    flavor_version: str
    compute_capabilities: Optional[tuple[str, ...]]
    inputs: tuple[TensorRecord, ...]
    outputs: tuple[TensorRecord, ...]
    profiles: Profiles
    passes: dict[str, Any]
    plugin_library_sha256: Optional[str]
    sha256: str
    bytes: int
    build_seconds: float
    build_log: str
    build_summary: str


@dataclass(frozen=True)
class QuantizationRecord:
    """How the graphs' GEMMs are quantised (docs/quantization.md): the mode, the scope, the int4
    block size and the calibration file the reference needs to quantise itself alike (None for
    int4-rtn, which calibrates nothing), with its digest and what it was computed from."""

    mode: str
    scope: str
    block_size: int
    calibration_file: Optional[str] = None
    calibration_sha256: Optional[str] = None
    calibration_prompts: int = 0
    calibration_tokens: int = 0


@dataclass(frozen=True)
class BuildSettings:
    max_batch: int
    block_size: int
    max_prefill: int
    record_version: int = ENGINE_RECORD_VERSION


@dataclass(frozen=True)
class Manifest:
    source: str
    checkpoint_digest: Optional[str]
    config: TwoTowerConfig
    lowering: str
    dtype: str
    max_context: int
    graphs: dict[str, GraphRecord]
    engines: dict[str, EngineRecord] = field(default_factory=dict)
    build: Optional[BuildSettings] = None
    quantization: Optional[QuantizationRecord] = None   # None: unquantised graphs

    @property
    def stage(self) -> str:
        return "engines" if self.engines else "graphs"

    @property
    def uses_plugin_ops(self) -> bool:
        return self.lowering == "plugin"

    def engine_of(self, tower: str) -> EngineRecord:
        """The engine that serves ``tower``; a clear error where the build has none."""
        for record in self.engines.values():
            if record.tower == tower:
                return record
        raise ManifestError(f"this build has no engine for the {tower} tower: rebuild it with "
                            "`trt-twotower build`")

    def verify_graphs(self, build_dir: Path, graphs: Optional[list[str]] = None) -> None:
        """Each graph (all by default) and its weights are the files convert wrote: checked
        by digest before anything parses them, as engines are."""
        for name in graphs if graphs is not None else list(self.graphs):
            record = self.graphs[name]
            for file, digest in ((record.file, record.sha256),
                                 (record.data_file, record.data_sha256)):
                path = Path(build_dir) / file
                if not path.is_file():
                    raise ManifestError(f"{file} of graph {name} is missing from {build_dir}: "
                                        "convert again")
                if sha256_file(path) != digest:
                    raise ManifestError(f"{file} does not match its manifest digest (modified "
                                        "or corrupt): convert again")

    def with_engines(self, engines: dict[str, EngineRecord], build: BuildSettings
                     ) -> "Manifest":
        return Manifest(self.source, self.checkpoint_digest, self.config, self.lowering,
                        self.dtype, self.max_context, self.graphs, engines, build,
                        self.quantization)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["config"] = self.config.to_dict()
        return {"schema": MANIFEST_SCHEMA, "stage": self.stage, **out}

    def save(self, build_dir: Path) -> Path:
        path = Path(build_dir) / MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, build_dir: Path) -> "Manifest":
        path = Path(build_dir) / MANIFEST
        if not path.is_file():
            raise ManifestError(f"no {MANIFEST} in {build_dir}; run `trt-twotower convert` "
                                "(or `build`) first")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ManifestError(f"{path} is not valid JSON: {err}") from err
        return parse_manifest(raw, path)


# --- parsing: every field checked for its type, every path kept inside the directory -------

def _field(raw: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(raw, dict) or key not in raw:
        raise ManifestError(f"{where}: missing field {key!r}")
    value = raw[key]
    bad_bool = isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple)
                                                        else (kind,))
    if not isinstance(value, kind) or bad_bool:
        raise ManifestError(f"{where}: field {key!r} is {type(value).__name__}, expected "
                            f"{getattr(kind, '__name__', kind)}")
    return value


def _optional(raw: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    return None if raw.get(key) is None else _field(raw, key, kind, where)


def _file_name(raw: dict, key: str, where: str) -> str:
    """A file that must sit directly in the build directory: never a path out of it."""
    name = _field(raw, key, str, where)
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ManifestError(f"{where}: {key} {name!r} is not a file name inside the build "
                            "directory")
    return name


def _tensors(raw: Any, where: str) -> tuple[TensorRecord, ...]:
    if not isinstance(raw, list):
        raise ManifestError(f"{where}: expected a list of tensors")
    return tuple(TensorRecord(_field(t, "name", str, where), _field(t, "dtype", str, where),
                              tuple(_field(t, "shape", list, where))) for t in raw)


def _graph(raw: Any, where: str) -> GraphRecord:
    return GraphRecord(_file_name(raw, "file", where), _file_name(raw, "data_file", where),
                       _field(raw, "tower", str, where),
                       _tensors(_field(raw, "inputs", list, where), where),
                       _tensors(_field(raw, "outputs", list, where), where),
                       _field(raw, "bytes", int, where), _field(raw, "sha256", str, where),
                       _field(raw, "data_sha256", str, where))


def _shape_range(raw: Any, where: str) -> tuple[tuple[int, ...], ...]:
    if (not isinstance(raw, list) or len(raw) != 3 or
            not all(isinstance(s, list) and all(type(d) is int for d in s) for s in raw)):
        raise ManifestError(f"{where}: a profile range must be [min, opt, max] integer shapes")
    return tuple(tuple(s) for s in raw)


def _profiles(raw: Any, where: str) -> Profiles:
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: profiles must be an object")
    return {name: {tensor: _shape_range(r, f"{where} profile {name}")
                   for tensor, r in _field(raw, name, dict, where).items()} for name in raw}


def _engine(raw: Any, where: str) -> EngineRecord:
    ccs = _optional(raw, "compute_capabilities", list, where)
    return EngineRecord(
        _file_name(raw, "file", where), _field(raw, "tower", str, where),
        _field(raw, "device", int, where), _field(raw, "flavor", str, where),
        _field(raw, "flavor_version", str, where), None if ccs is None else tuple(ccs),
        _tensors(_field(raw, "inputs", list, where), where),
        _tensors(_field(raw, "outputs", list, where), where),
        _profiles(_field(raw, "profiles", dict, where), where),
        _field(raw, "passes", dict, where),
        _optional(raw, "plugin_library_sha256", str, where), _field(raw, "sha256", str, where),
        _field(raw, "bytes", int, where), float(_field(raw, "build_seconds", (int, float), where)),
        _file_name(raw, "build_log", where), _file_name(raw, "build_summary", where))


def _quantization(raw: Any, where: str) -> QuantizationRecord:
    return QuantizationRecord(
        _field(raw, "mode", str, where), _field(raw, "scope", str, where),
        _field(raw, "block_size", int, where),
        None if raw.get("calibration_file") is None else _file_name(raw, "calibration_file",
                                                                    where),
        _optional(raw, "calibration_sha256", str, where),
        _optional(raw, "calibration_prompts", int, where) or 0,
        _optional(raw, "calibration_tokens", int, where) or 0)


def parse_manifest(raw: Any, path: Path) -> Manifest:
    """A ``Manifest`` from its JSON form, or a ManifestError naming the file and the field."""
    where = str(path)
    schema = raw.get("schema") if isinstance(raw, dict) else None
    if schema != MANIFEST_SCHEMA:
        raise ManifestError(f"{path} has schema {schema!r}; this trt-twotower reads schema "
                            f"{MANIFEST_SCHEMA}: convert (or build) again")
    try:
        config = TwoTowerConfig.from_dict(_field(raw, "config", dict, where))
    except (ConfigError, TypeError, ValueError) as err:
        raise ManifestError(f"{where}: its config is invalid: {err}") from err
    graphs = {name: _graph(g, f"{where} graph {name}")
              for name, g in _field(raw, "graphs", dict, where).items()}
    engines = {name: _engine(e, f"{where} engine {name}")
               for name, e in (_optional(raw, "engines", dict, where) or {}).items()}
    build = None
    if engines:
        b = _field(raw, "build", dict, where)
        version = b.get("record_version")
        if version != ENGINE_RECORD_VERSION:
            raise ManifestError(f"{path}: engines recorded by a trt-twotower whose engine "
                                f"records are version {version!r}; this one reads "
                                f"{ENGINE_RECORD_VERSION}: rebuild with `trt-twotower build`")
        build = BuildSettings(_field(b, "max_batch", int, where),
                              _field(b, "block_size", int, where),
                              _field(b, "max_prefill", int, where), version)
    max_context = _field(raw, "max_context", int, where)
    if max_context < 2:
        raise ManifestError(f"{where}: max_context {max_context} is below 2")
    quantization = _optional(raw, "quantization", dict, where)
    return Manifest(_field(raw, "source", str, where),
                    _optional(raw, "checkpoint_digest", str, where), config,
                    _field(raw, "lowering", str, where), _field(raw, "dtype", str, where),
                    max_context, graphs, engines, build,
                    None if quantization is None else _quantization(quantization,
                                                                    f"{where} quantization"))
