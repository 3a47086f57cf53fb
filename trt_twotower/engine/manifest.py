"""The build manifest: what every consumer of a build directory checks before trusting it.

``convert`` writes the graphs' part (stage "graphs"); ``build`` adds the engines (stage
"engines"): per engine its file, device, TensorRT flavour and version, I/O with profile ranges,
plugin library digest and the engine's own sha256. Loading an engine build validates all of it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from ..config import TwoTowerConfig
from ..export.convert import MANIFEST, load_manifest

# The engines part extends manifest schema 1 (export.convert): bump this when an engine
# record changes meaning, so older builds are refused with "rebuild" instead of misread.
ENGINE_RECORD_VERSION = 1
PLUGIN_LIBRARY_ENV = "TWOTOWER_PLUGIN_LIB"
DEFAULT_PLUGIN_LIBRARY = Path("build/plugins/libtwotower_plugins.so")


class ManifestError(RuntimeError):
    """A build directory whose contents do not match what its manifest promises."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def plugin_library() -> Optional[Path]:
    path = Path(os.environ.get(PLUGIN_LIBRARY_ENV, DEFAULT_PLUGIN_LIBRARY))
    return path if path.is_file() else None


def write_manifest(build_dir: Path, manifest: dict) -> Path:
    path = Path(build_dir) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def validate_engines(build_dir: Path, flavor_name: Optional[str] = None,
                     flavor_version: Optional[str] = None) -> dict:
    """The manifest of an engine build, after checking every promise it makes."""
    build_dir = Path(build_dir)
    manifest = load_manifest(build_dir)
    if manifest.get("stage") != "engines" or not manifest.get("engines"):
        raise ManifestError(f"{build_dir} holds graphs but no engines: run "
                            "`trt-twotower build` on it")
    version = manifest.get("build", {}).get("record_version")
    if version != ENGINE_RECORD_VERSION:
        raise ManifestError(f"{build_dir} was built by a trt-twotower whose engine records are "
                            f"version {version!r}; this one reads {ENGINE_RECORD_VERSION}: "
                            "rebuild with `trt-twotower build`")
    config_file = build_dir / "config.json"
    if config_file.is_file() and \
            TwoTowerConfig.load(config_file) != TwoTowerConfig.from_dict(manifest["config"]):
        raise ManifestError(f"{config_file} differs from the config the engines were built "
                            "for: rebuild")
    for graph, record in manifest["engines"].items():
        path = build_dir / record["file"]
        if not path.is_file():
            raise ManifestError(f"engine {record['file']} of {graph} is missing from "
                                f"{build_dir}")
        if sha256_file(path) != record["sha256"]:
            raise ManifestError(f"engine {record['file']} does not match its manifest digest "
                                "(modified or corrupt): rebuild it")
        if flavor_name is not None and record["flavor"] != flavor_name:
            raise ManifestError(f"{record['file']} was built with {record['flavor']} but this "
                                f"host runs {flavor_name}: rebuild with --flavor {flavor_name}")
        if flavor_version is not None and record["flavor_version"] != flavor_version:
            raise ManifestError(f"{record['file']} was built with {record['flavor']} "
                                f"{record['flavor_version']}, this host has {flavor_version}: "
                                "engines only load in the version that built them")
        library = record.get("plugin_library_sha256")
        if library is not None:
            found = plugin_library()
            if found is None or sha256_file(found) != library:
                raise ManifestError(f"{record['file']} needs the plugin library it was built "
                                    f"with (sha256 {library[:12]}…); set {PLUGIN_LIBRARY_ENV}")
    return manifest
