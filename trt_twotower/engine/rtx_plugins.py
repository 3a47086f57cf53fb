"""TensorRT-RTX's private plugin path, made safe to try (tensorrt-rtx-notes §3).

The RTX ONNX parser imports a plugin node through ``dlopen("libtensorrt_rtx.so")``, a name the
pip wheel does not ship (only ``libtensorrt_rtx.so.1``); the failed lookup throws inside a
noexcept initialiser and aborts the whole process. So an opted-in plugin-lowering build on
TensorRT-RTX runs in a child process whose loader finds that name through a symlink on
``LD_LIBRARY_PATH`` (read only when a process starts): the parse works there, and were it to
abort anyway, only the child dies and the build reports it.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from ..config import TwoTowerConfig
from ..errors import TwoTowerError

LIBRARY = "libtensorrt_rtx.so"
ABORTED = -6  # SIGABRT, the exit of the parser's std::terminate


class PluginBuildError(TwoTowerError, RuntimeError):
    """The isolated plugin build failed; the message says how."""


def _library_file() -> Path:
    try:
        import tensorrt_rtx_libs
    except ImportError as err:
        raise PluginBuildError(f"cannot find TensorRT-RTX's libraries: {err}") from err
    for folder in tensorrt_rtx_libs.__path__:
        found = sorted(Path(folder).glob(f"{LIBRARY}*"))
        if found:
            return found[0]
    raise PluginBuildError(f"no {LIBRARY}* in {list(tensorrt_rtx_libs.__path__)}")


def _child(connection: Any, build: Callable[..., tuple[dict, list[str]]], *args: Any) -> None:
    try:
        report, log = build(*args)
        connection.send(("ok", report, log))
    except Exception as err:  # noqa: BLE001 - every failure goes back to the parent as text
        connection.send(("error", f"{type(err).__name__}: {err}", []))


def build_isolated(build: Callable[..., tuple[dict, list[str]]], onnx_path: Path, graph: str,
                   config: TwoTowerConfig, max_context: int, options: Any, engine_file: Path
                   ) -> tuple[dict, list[str]]:
    """Run ``build`` (a module-level function the child can import, which writes the engine
    to ``engine_file`` and returns (pass report, build log lines)) in a child process."""
    spawn = multiprocessing.get_context("spawn")
    receive, send = spawn.Pipe(duplex=False)
    with tempfile.TemporaryDirectory(prefix="rtx-plugins-") as shim:
        (Path(shim) / LIBRARY).symlink_to(_library_file())
        process = spawn.Process(target=_child, args=(send, build, onnx_path, graph, config,
                                                     max_context, options, engine_file))
        saved = os.environ.get("LD_LIBRARY_PATH")
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (shim, saved) if p)
        try:
            process.start()
        finally:
            if saved is None:
                del os.environ["LD_LIBRARY_PATH"]
            else:
                os.environ["LD_LIBRARY_PATH"] = saved
        send.close()
        try:
            status, report, log = receive.recv()
        except EOFError:
            status, report, log = "died", None, []
        process.join()
    if status == "ok":
        return report, log
    if status == "error":
        raise PluginBuildError(f"{graph}: {report}")
    how = ("aborted in the plugin path" if process.exitcode == ABORTED
           else f"exited with {process.exitcode}")
    raise PluginBuildError(f"{graph}: the TensorRT-RTX plugin build {how}; build the native "
                           "lowering, or the plugin lowering with full TensorRT on a GPU host")
