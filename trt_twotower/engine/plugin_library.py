"""The compiled plugin library (``build_scripts/build_plugins.sh``): where it is and
its C ABI (``plugins/twotower_plugins.h``) as ctypes sees it.

One home for the three so that the engine build, the manifest check, the kernel harness and the
TensorRT plugins always mean the same file. The default location is absolute (the checkout's
``build/plugins``, where the build script writes), so it does not depend on the working
directory; ``TWOTOWER_PLUGIN_LIB`` overrides it. Nothing here imports torch or TensorRT.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Optional

from ..errors import TwoTowerError

PLUGIN_LIBRARY_ENV = "TWOTOWER_PLUGIN_LIB"
DEFAULT_PLUGIN_LIBRARY = (Path(__file__).resolve().parents[2] / "build" / "plugins"
                          / "libtwotower_plugins.so")

# Shapes the kernels handle (twotower_plugins.h); the build refuses others before parsing.
ATTENTION_HEAD_DIMS = (16, 32, 64, 128)
MAX_BLOCK = 1024  # the commit kernel holds one row's block positions in one CTA
MAX_UNMASK_POSITIONS = 65535  # batch x block: one grid dimension of the unmask kernels


class PluginLibraryError(TwoTowerError, RuntimeError):
    """The plugin library is not where it is looked for."""


def plugin_library_path() -> Path:
    """Where the library is looked for: TWOTOWER_PLUGIN_LIB (made absolute against the working
    directory now, so a later ``chdir`` cannot change which file it names), else the build
    script's output in this checkout."""
    configured = os.environ.get(PLUGIN_LIBRARY_ENV)
    return Path(configured).resolve() if configured else DEFAULT_PLUGIN_LIBRARY


def find_plugin_library() -> Path:
    """The library's absolute path; raises instead of letting a build record no digest or a
    launch fail later with a loader error."""
    path = plugin_library_path()
    if not path.is_file():
        raise PluginLibraryError(f"no plugin library at {path}: run "
                                 f"build_scripts/build_plugins.sh or set {PLUGIN_LIBRARY_ENV} "
                                 "to the compiled libtwotower_plugins.so")
    return path


def load_plugin_library(path: Optional[Path] = None) -> ctypes.CDLL:
    """The library opened with its prototypes declared, once per file and process (a TensorRT
    plugin enqueues on every engine run and must not reopen it each time)."""
    if path is None:
        return _open(find_plugin_library())
    path = Path(path).resolve()
    if not path.is_file():
        raise PluginLibraryError(f"no plugin library at {path}")
    return _open(path)


@functools.lru_cache(maxsize=None)
def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    _declare(lib)
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    """Argument and result types of the C ABI (plugins/twotower_plugins.h)."""
    p, i, i64, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
    lib.tt_error_string.restype = ctypes.c_char_p
    lib.tt_error_string.argtypes = [i]
    lib.tt_block_cross_attention_workspace_bytes.restype = i64
    lib.tt_block_cross_attention_workspace_bytes.argtypes = [i] * 6
    lib.tt_block_cross_attention.restype = i
    lib.tt_block_cross_attention.argtypes = [p] * 8 + [i64] + [i] * 7 + [p]
    lib.tt_confidence_unmask_workspace_bytes.restype = i64
    lib.tt_confidence_unmask_workspace_bytes.argtypes = [i, i, i]
    lib.tt_confidence_unmask.restype = i
    lib.tt_confidence_unmask.argtypes = [p] * 7 + [i64, i, i, i, i64, p, p, f, i64, i, p]
