"""Start and stop a real ``tritonserver`` (the binary shipped in nvidia-pytriton) for a rendered
model repository, bound to 127.0.0.1 by default.

The server runs in a process group of its own with its Python backend stubs, so that stopping it
(on any signal, exception or interpreter exit) takes the whole group down and leaves no orphan
holding the ports or a ``/dev/shm`` region."""

from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from ..errors import TwoTowerError

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
STUB_REGION = re.compile(r"/dev/shm/(triton_python_backend_shm_region_[\w-]+)")
# glog lines: E1130 08:05:05.169586 14726 model_lifecycle.cc:642] "failed to load 'x' ..."
LOG_ERROR = re.compile(r'^E\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] "(.*)"$')
LOG_LAST_WORDS = re.compile(r"^error: (.*)$")
EXIT_TIMEOUT_S = 5  # how long tritonserver itself waits for in-flight work when told to stop


RESTRICTED_APIS = "model-config,logging,shared-memory,trace"


def restricted_admin() -> list[str]:
    """Launch flags that close the admin APIs (model configs, log settings, shared-memory
    registration, trace settings) to every client on both protocols: they answer only a
    request carrying a header whose value is drawn here and never given out. Inference,
    health, metadata and statistics stay open."""
    value = secrets.token_urlsafe(24)
    return [f"--grpc-restricted-protocol={RESTRICTED_APIS}:admin-key={value}",
            f"--http-restricted-api={RESTRICTED_APIS}:admin-key={value}"]


class ServerError(TwoTowerError, RuntimeError):
    """The server binary is missing, failed to start, or never became ready."""


class PortInUseError(ServerError):
    """Another process listens on a port the server needs: its readiness is not ours."""


class Interrupted(BaseException):
    """A stop signal arrived. A BaseException, so that no ``except Exception`` on the way (the
    readiness poll has one) swallows it before the server is stopped."""


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


def check_ports_free(address: str, ports: Iterable[int]) -> None:
    """Bind each port as tritonserver will: a port someone else holds would otherwise let the
    other server answer our readiness check. SO_REUSEADDR, as servers set it, so that sockets
    merely in TIME_WAIT do not count as busy."""
    family = socket.getaddrinfo(address, 0, type=socket.SOCK_STREAM)[0][0]
    for port in ports:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, port))
            except OSError:
                raise PortInUseError(f"port {port} on {address} is already in use; stop what "
                                     "holds it or choose another port (0 picks a free one)") \
                    from None


def log_cause(log: Path) -> str:
    """The first error tritonserver logged (a model's load failure names the real cause, e.g. a
    bad checkpoint), cut to one line; else its last words; else a pointer to the log."""
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    errors = [m.group(1) for m in map(LOG_ERROR.match, lines) if m]
    loads = [e for e in errors if e.startswith("failed to load")]
    last_words = [m.group(1) for m in map(LOG_LAST_WORDS.match, lines) if m]
    cause = (loads or errors or last_words or [""])[0]
    cause = cause.split("\\n")[0].replace("ERROR: ", "").replace("Internal: ", "").strip()
    return f"{cause} (log: {log})" if cause else f"see {log}"


def stub_regions(pid: int) -> set[str]:
    """The /dev/shm regions the server has mapped: one per Python stub, named by a UUID that
    only the server's maps and the stubs' command lines show. A stub killed or left behind
    never unlinks its region, so these are collected while the server is alive."""
    try:
        return set(STUB_REGION.findall(Path(f"/proc/{pid}/maps").read_text()))
    except OSError:
        return set()


def signal_group(pgid: int, sig: int) -> None:
    """Signal a process group that may already be gone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class TritonServer:
    """One tritonserver process group; ``stop`` is safe to call at any point, and more than
    once."""

    repository: Path
    work_dir: Path
    address: str = "127.0.0.1"
    grpc_port: int = 0
    http_port: int = 0
    metrics_port: int = 0
    process: Optional[subprocess.Popen] = None
    regions: set[str] = field(default_factory=set)

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    @property
    def log(self) -> Path:
        return Path(self.work_dir) / "tritonserver.log"

    def start(self, timeout: float = 180.0) -> "TritonServer":
        """Launch and wait until ready. Any failure or interruption on the way stops what was
        launched before it propagates, so a failed start leaves no process behind."""
        self.grpc_port = self.grpc_port or free_port()
        self.http_port = self.http_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        # the metrics port stays unbound (--allow-metrics=false), so only these two can clash
        check_ports_free(self.address, (self.grpc_port, self.http_port))
        try:
            self._launch()
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        self.regions |= stub_regions(self.process.pid)
        return self

    def _launch(self) -> None:
        home = triton_home()
        binary = home / "bin" / "tritonserver"
        backends = prepare_backends(self.work_dir)
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = os.pathsep.join(
            [str(PROJECT_ROOT), sysconfig.get_paths()["purelib"], env.get("PYTHONPATH", "")])
        # The stub and server link against the CUDA runtime bundled in nvidia_pytriton.libs.
        env["LD_LIBRARY_PATH"] = os.pathsep.join([str(home.parent.parent / "nvidia_pytriton.libs"),
                                                  env.get("LD_LIBRARY_PATH", "")])
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [str(binary), f"--model-repository={self.repository}",
                 f"--backend-directory={backends}", f"--grpc-address={self.address}",
                 f"--grpc-port={self.grpc_port}", f"--http-address={self.address}",
                 f"--http-port={self.http_port}", f"--metrics-port={self.metrics_port}",
                 "--allow-metrics=false", "--log-verbose=0", "--exit-on-error=true",
                 f"--exit-timeout-secs={EXIT_TIMEOUT_S}", *restricted_admin()],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        atexit.register(self.stop)

    def _wait_ready(self, timeout: float) -> None:
        """Ready once our own process logged that it holds the gRPC port and then answers: a
        readiness answer alone could come from another server on that port."""
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout
        client = grpcclient.InferenceServerClient(self.grpc_url)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode}: "
                                  f"{log_cause(self.log)}")
            try:
                if self._listening() and client.is_server_ready():
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.5)
        raise ServerError(f"tritonserver was not ready after {timeout:.0f} s: "
                          f"{log_cause(self.log)}")

    def _listening(self) -> bool:
        started = re.compile(rf'Started GRPCInferenceService at .*:{self.grpc_port}"$',
                             re.MULTILINE)
        return bool(started.search(self.log.read_text(errors="replace")))

    def stop(self, timeout: float = EXIT_TIMEOUT_S + 5.0) -> Optional[int]:
        """SIGTERM the server, wait a bounded time, then SIGKILL its whole group (stubs
        included) and unlink the stubs' /dev/shm regions; returns the server's exit code."""
        if self.process is None:
            return None
        self.regions |= stub_regions(self.process.pid)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        signal_group(self.process.pid, signal.SIGKILL)
        code = self.process.wait()
        self._unlink_regions()
        atexit.unregister(self.stop)  # last: a stop cut short by a signal runs again at exit
        return code

    def _unlink_regions(self) -> None:
        for name in self.regions:
            Path("/dev/shm", name).unlink(missing_ok=True)
        self.regions.clear()
