"""Start and stop a real ``tritonserver`` (the binary shipped in nvidia-pytriton) for a rendered
model repository, bound to 127.0.0.1 by default."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import TwoTowerError

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent


class ServerError(TwoTowerError, RuntimeError):
    """The server binary is missing, failed to start, or never became ready."""


def triton_home() -> Path:
    try:
        import pytriton
    except ImportError as err:
        raise ServerError("tritonserver comes with nvidia-pytriton: pip install nvidia-pytriton") \
            from err
    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def prepare_backends(work_dir: Path) -> Path:
    """A backend directory: the Python backend plus the stub for this interpreter's version."""
    home = triton_home()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = home / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    target = Path(work_dir) / "backends" / "python"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(home / "backends" / "python", target)
    shutil.copy2(stub, target / "triton_python_backend_stub")
    return target.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TritonServer:
    repository: Path
    work_dir: Path
    address: str = "127.0.0.1"
    grpc_port: int = 0
    http_port: int = 0
    metrics_port: int = 0
    process: Optional[subprocess.Popen] = None

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    def start(self, timeout: float = 180.0) -> "TritonServer":
        home = triton_home()
        binary = home / "bin" / "tritonserver"
        self.grpc_port = self.grpc_port or free_port()
        self.http_port = self.http_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        backends = prepare_backends(self.work_dir)
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = os.pathsep.join(
            [str(PROJECT_ROOT), sysconfig.get_paths()["purelib"], env.get("PYTHONPATH", "")])
        # The stub and server link against the CUDA runtime bundled in nvidia_pytriton.libs.
        env["LD_LIBRARY_PATH"] = os.pathsep.join([str(home.parent.parent / "nvidia_pytriton.libs"),
                                                  env.get("LD_LIBRARY_PATH", "")])
        log = open(Path(self.work_dir) / "tritonserver.log", "w")
        self.process = subprocess.Popen(
            [str(binary), f"--model-repository={self.repository}",
             f"--backend-directory={backends}", f"--grpc-address={self.address}",
             f"--grpc-port={self.grpc_port}", f"--http-address={self.address}",
             f"--http-port={self.http_port}", f"--metrics-port={self.metrics_port}",
             "--allow-metrics=false", "--log-verbose=0", "--exit-on-error=true"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout
        client = grpcclient.InferenceServerClient(self.grpc_url)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode}; "
                                  f"see {Path(self.work_dir) / 'tritonserver.log'}")
            try:
                if client.is_server_ready():
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"tritonserver was not ready after {timeout:.0f} s; see "
                          f"{Path(self.work_dir) / 'tritonserver.log'}")

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        """SIGTERM, wait, then kill; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
