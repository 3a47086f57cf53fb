"""Start and stop a real ``tritonserver`` (the binary shipped in nvidia-pytriton) for a rendered
model repository, bound to 127.0.0.1 by default.

The server runs in a process group of its own with its Python backend stubs, so that stopping it
(on any signal, exception or interpreter exit) takes the whole group down and leaves no orphan
holding the ports. Each start draws its own prefix for the stubs' ``/dev/shm`` regions, so that
servers running side by side never share a region name, and a stop unlinks every region with
that prefix, including those of stubs that were killed (a killed stub never unlinks its own)."""

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

# Where ``import trt_twotower`` resolves from: the checkout's root, or site-packages when the
# package is installed. The Python stubs get it on their path.
IMPORT_ROOT = Path(__file__).resolve().parents[2]
SHM = Path("/dev/shm")
STUB_BINARY = "triton_python_backend_stub"
# glog lines: E1130 08:05:05.169586 14726 model_lifecycle.cc:642] "failed to load 'x' ..."
LOG_ERROR = re.compile(r'^E\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] "(.*)"$')
LOG_LAST_WORDS = re.compile(r"^error: (.*)$")
NOT_A_CAUSE = "CudaDriverHelper has not been initialized."  # every start logs it without a GPU
# How long tritonserver itself waits for in-flight work and its models' unloading when told to
# stop: each Python stub takes 1-4 s to unload, idle, on a loaded 2-core machine (5 s left
# some still loaded, and tritonserver then exits 1); an idle server stops in ~3 s either way.
EXIT_TIMEOUT_S = 15
STOP_GRACE_S = EXIT_TIMEOUT_S + 3  # then the whole group is killed
GONE_WAIT_S = 5.0  # how long a killed group may take to exit (and free its devices' memory)


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


def _accepts(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1.0):
            return True
    except OSError:
        return False


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
    errors = [m.group(1) for m in map(LOG_ERROR.match, lines) if m and m.group(1) != NOT_A_CAUSE]
    loads = [e for e in errors if e.startswith("failed to load")]
    last_words = [m.group(1) for m in map(LOG_LAST_WORDS.match, lines) if m]
    cause = (loads or errors or last_words or [""])[0]
    cause = cause.split("\\n")[0].replace("ERROR: ", "").replace("Internal: ", "").strip()
    return f"{cause} (log: {log})" if cause else f"see {log}"


def exit_cause(process: subprocess.Popen, log: Path) -> str:
    """Why tritonserver ended, in words: the signal that killed it, or its code and the cause
    from its log."""
    if process.returncode < 0:
        return f"tritonserver was killed by {signal.Signals(-process.returncode).name}"
    return f"tritonserver exited with code {process.returncode}: {log_cause(log)}"


def shm_prefix() -> str:
    """A name prefix for one server start's /dev/shm regions (the Python backend's
    ``shm-region-prefix-name``), drawn at random so that concurrent servers never collide."""
    return f"trt_twotower_{secrets.token_hex(8)}_"


def process_state(pid: int) -> Optional[tuple[str, int, int]]:
    """(state, parent pid, process group) from /proc, or None for a process that is gone."""
    try:
        state, parent, group = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:3]
    except (OSError, IndexError):
        return None
    return state, int(parent), int(group)


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed stub stays a zombie until its parent reaps it)."""
    state = process_state(pid)
    return state is not None and state[0] not in ("Z", "X")


def stub_processes(server_pid: int) -> dict[int, str]:
    """The server's running Python backend stubs, pid → model name (a stub's command line
    names its model's ``model.py``: ``<repository>/<model>/<version>/model.py``)."""
    stubs = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        state = process_state(int(entry.name))
        if state is None or state[1] != server_pid or state[0] in ("Z", "X"):
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(STUB_BINARY.encode()) and len(argv) > 1:
            stubs[int(entry.name)] = Path(argv[1].decode(errors="replace")).parent.parent.name
    return stubs


def group_running(pgid: int) -> bool:
    """Whether any process of the group is alive and not a zombie."""
    return any(state is not None and state[2] == pgid and state[0] not in ("Z", "X")
               for state in (process_state(int(e.name)) for e in Path("/proc").iterdir()
                             if e.name.isdigit()))


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
    shm_prefix: str = ""
    stubs: dict[int, str] = field(default_factory=dict)
    launches: int = 0

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    @property
    def log(self) -> Path:
        return Path(self.work_dir) / "tritonserver.log"

    def start(self, timeout: float = 180.0) -> "TritonServer":
        """Launch and wait until ready. Any failure or interruption on the way stops what was
        launched before it propagates, so a failed start leaves no process behind."""
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process on this server's ports (free ones the first time, when 0)."""
        self.grpc_port = self.grpc_port or free_port()
        self.http_port = self.http_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        # the metrics port stays unbound (--allow-metrics=false), so only these two can clash
        check_ports_free(self.address, (self.grpc_port, self.http_port))
        try:
            self._launch()
        except BaseException:
            self.stop(graceful=False)
            raise

    def wait_ready(self, timeout: float) -> "TritonServer":
        """Wait until the launched server is ready and note its stubs, the processes whose
        death is a fault (``supervisor.py``)."""
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop(graceful=False)
            raise
        self.stubs = stub_processes(self.process.pid)
        return self

    def regions(self) -> list[str]:
        """This start's /dev/shm regions (each stub's, and any the backend made)."""
        if not self.shm_prefix:
            return []
        return sorted(p.name for p in SHM.glob(f"*{self.shm_prefix}*"))

    def dead_stubs(self) -> dict[int, str]:
        """The stubs noted at start that are no longer running, pid → model."""
        return {pid: model for pid, model in self.stubs.items() if not running(pid)}

    def _launch(self) -> None:
        home = triton_home()
        binary = home / "bin" / "tritonserver"
        backends = prepare_backends(self.work_dir)
        if self.log.exists():  # a restart: the log of the run before stays beside the new one
            self.log.replace(self.log.with_name(f"tritonserver.{self.launches}.log"))
        self.launches += 1
        self.shm_prefix, self.stubs = shm_prefix(), {}
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        # No empty entry: one would put each stub's working directory on its path.
        paths = [str(IMPORT_ROOT), sysconfig.get_paths()["purelib"],
                 *env.get("PYTHONPATH", "").split(os.pathsep)]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
        # The stub and server link against the CUDA runtime bundled in nvidia_pytriton.libs.
        env["LD_LIBRARY_PATH"] = os.pathsep.join([str(home.parent.parent / "nvidia_pytriton.libs"),
                                                  env.get("LD_LIBRARY_PATH", "")])
        # The step loop calls the two towers in turn: OpenMP threads that spin after a step
        # hold the cores the other tower needs next (diffusion ran 10x slower), so they sleep.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [str(binary), f"--model-repository={self.repository}",
                 f"--backend-directory={backends}", f"--grpc-address={self.address}",
                 f"--grpc-port={self.grpc_port}", f"--http-address={self.address}",
                 f"--http-port={self.http_port}", f"--metrics-port={self.metrics_port}",
                 "--allow-metrics=false", "--log-verbose=0", "--exit-on-error=true",
                 f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
                 f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                 *restricted_admin()],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        atexit.register(self.stop)

    def _wait_ready(self, timeout: float) -> None:
        """Ready once our own process logged that it holds the gRPC and HTTP ports and then
        answers: a readiness answer alone could come from another server on that port, and
        the HTTP port opens after the gRPC one (a request in between was refused in CI)."""
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout
        client = grpcclient.InferenceServerClient(self.grpc_url)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(exit_cause(self.process, self.log))
            try:
                if self._listening() and client.is_server_ready():
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.5)
        raise ServerError(f"tritonserver was not ready after {timeout:.0f} s: "
                          f"{log_cause(self.log)}")

    def _listening(self) -> bool:
        """Both services logged as started by this server, and its HTTP port takes a
        connection: CI saw a request refused between the log line and the listening socket
        (gRPC is checked by the readiness call itself)."""
        log = self.log.read_text(errors="replace")
        return all(re.search(rf'Started {service} at .*:{port}"$', log, re.MULTILINE)
                   for service, port in (("GRPCInferenceService", self.grpc_port),
                                         ("HTTPService", self.http_port))) \
            and _accepts(self.address, self.http_port)

    def stop(self, graceful: bool = True, timeout: float = STOP_GRACE_S) -> Optional[int]:
        """Stop the server and return its exit code. Gracefully (SIGTERM, in-flight work gets
        ``EXIT_TIMEOUT_S``) only once it was ready and while all its stubs run: a server with a
        dead stub cannot unload that model cleanly and would spend the whole timeout trying,
        and one still loading has nothing to finish. Then SIGKILL the whole group (stubs
        included), wait for it to exit and unlink this start's /dev/shm regions. Safe at any
        point, more than once, and from two threads."""
        if self.process is None:
            return None
        if graceful and self.process.poll() is None and self.stubs and not self.dead_stubs():
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        signal_group(self.process.pid, signal.SIGKILL)
        code = self.process.wait()
        deadline = time.monotonic() + GONE_WAIT_S
        while group_running(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        for name in self.regions():
            (SHM / name).unlink(missing_ok=True)
        atexit.unregister(self.stop)  # last: a stop cut short by a signal runs again at exit
        return code
