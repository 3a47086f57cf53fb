"""What a consumer checks before it trusts engines: each engine of the towers it will load is
the file the build wrote (its sha256, read once), built by this host's TensorRT, against the
plugin library it will call, for the config beside it.

Only the asked-for towers' engines are read: a tower process on its own GPU never hashes the
other tower's ~59 GiB engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from ..config import ConfigError, TwoTowerConfig
from ..manifest import EngineRecord, Manifest, ManifestError, sha256_file
from .plugin_library import PluginLibraryError, find_plugin_library

TOWERS = ("context", "denoiser")


def engines_of(manifest: Manifest, towers: Iterable[str]) -> dict[str, EngineRecord]:
    """The engine of each tower in ``towers`` (one per tower), or a ManifestError."""
    if not manifest.engines:
        raise ManifestError("this directory holds graphs but no engines: run "
                            "`trt-twotower build` on it")
    return {tower: manifest.engine_of(tower) for tower in towers}


def verify_engines(build_dir: Path, manifest: Manifest, towers: Iterable[str] = TOWERS,
                   flavor_name: Optional[str] = None, flavor_version: Optional[str] = None
                   ) -> dict[str, EngineRecord]:
    """The engines of ``towers`` after checking every promise the manifest makes of them."""
    build_dir = Path(build_dir)
    _check_config(build_dir, manifest.config)
    chosen = engines_of(manifest, towers)
    plugin: Optional[str] = None
    for record in chosen.values():
        _check_flavor(record, flavor_name, flavor_version)
        path = build_dir / record.file
        if not path.is_file():
            raise ManifestError(f"engine {record.file} of the {record.tower} tower is missing "
                                f"from {build_dir}")
        if sha256_file(path) != record.sha256:
            raise ManifestError(f"engine {record.file} does not match its manifest digest "
                                "(modified or corrupt): rebuild it")
        if record.plugin_library_sha256 is not None:
            plugin = plugin or _plugin_digest(record)
            if plugin != record.plugin_library_sha256:
                raise ManifestError(f"{record.file} was built against the plugin library with "
                                    f"sha256 {record.plugin_library_sha256[:12]}…; the one "
                                    f"found has {plugin[:12]}…: rebuild the engines or point "
                                    "TWOTOWER_PLUGIN_LIB at the library they were built with")
    return chosen


def _check_config(build_dir: Path, config: TwoTowerConfig) -> None:
    config_file = build_dir / "config.json"
    if not config_file.is_file():
        return
    try:
        found = TwoTowerConfig.load(config_file)
    except ConfigError as err:
        raise ManifestError(f"{config_file} cannot be read: {err}") from err
    if found != config:
        raise ManifestError(f"{config_file} differs from the config the engines were built "
                            "for: rebuild")


def _check_flavor(record: EngineRecord, name: Optional[str], version: Optional[str]) -> None:
    if name is not None and record.flavor != name:
        raise ManifestError(f"{record.file} was built with {record.flavor} but this host runs "
                            f"{name}: rebuild with --flavor {name}")
    if version is not None and record.flavor_version != version:
        raise ManifestError(f"{record.file} was built with {record.flavor} "
                            f"{record.flavor_version}, this host has {version}: engines only "
                            "load in the version that built them")


def _plugin_digest(record: EngineRecord) -> str:
    try:
        return sha256_file(find_plugin_library())
    except PluginLibraryError as err:
        raise ManifestError(f"{record.file} needs the plugin library it was built with: {err}"
                            ) from err
