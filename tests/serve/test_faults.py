"""Faults detected and survived, against a real tritonserver: SIGKILL of a Python stub (each
tower's, the orchestrator's) or of tritonserver itself, mid-stream. The in-flight request ends
with an error at once, readiness answers "not ready" until the supervisor has restarted the
server on the same ports, the next request gets the same tokens as before the fault, and no
/dev/shm region outlives its server. One supervised server serves every fault test: restarting
is what they test."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from trt_twotower.policy import GenerationSettings
from trt_twotower.reference.sources import BUILTIN_CHECKPOINT

pytestmark = pytest.mark.skipif(importlib.util.find_spec("pytriton") is None
                                or importlib.util.find_spec("tritonclient") is None,
                                reason="needs nvidia-pytriton (tritonserver) and tritonclient")
MAX_CONTEXT = 1024
PROMPT = [1, 400, 500, 600]
SHORT = GenerationSettings(max_new_tokens=32, block_size=16, steps_per_block=8, seed=3)
# 60 blocks of 16 denoiser steps each, none committed early: far longer than a test waits
LONG = GenerationSettings(max_new_tokens=960, block_size=16, steps_per_block=16,
                          confidence_threshold=1.0, seed=3)
ERROR_WITHIN_S = 10.0
RECOVERY_WITHIN_S = 60.0
STOP_WITHIN_S = 10.0


def render_repository(work: Path) -> Path:
    from trt_twotower.serve.repository import render, repository_values
    return render(work / "repo", repository_values(
        "builtin", "torch", BUILTIN_CHECKPOINT, "cpu", "cpu", MAX_CONTEXT,
        LONG.max_new_tokens, "16", capacity=2))


def stat(pid: int):
    """(state, process group) of a process, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[2])


def stub_pid(server_pid: int, model: str) -> int:
    """The running stub of ``model`` in the server's process group, read from /proc: a stub's
    command line names its model file, <repository>/<model>/1/model.py."""
    found = []
    for entry in Path("/proc").iterdir():
        argv = read_cmdline(entry).split(b"\0")
        state = stat(int(entry.name)) if len(argv) > 1 else None
        if (state and state[0] != "Z" and state[1] == server_pid
                and argv[0].endswith(b"triton_python_backend_stub")
                and f"/{model}/1/model.py".encode() in argv[1]):
            found.append(int(entry.name))
    assert len(found) == 1, f"expected one stub of {model}, found {found}"
    return found[0]


def ready(server) -> bool:
    """Readiness as a client sees it over gRPC (what our client asks) and HTTP
    (/v2/health/ready); a server that answers nothing is not ready."""
    import tritonclient.grpc as grpcclient
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        grpc_ready = client.is_server_ready(client_timeout=2)
    except Exception:
        grpc_ready = False
    finally:
        client.close()
    try:
        with urllib.request.urlopen(
                f"http://{server.address}:{server.http_port}/v2/health/ready", timeout=2) as r:
            http_ready = r.status == 200
    except OSError:
        http_ready = False
    return grpc_ready and http_ready


def eventually(condition, within_s: float) -> bool:
    """Whether ``condition()`` holds within ``within_s`` seconds (polled)."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def regions_left(prefixes) -> list[str]:
    return sorted(name for name in os.listdir("/dev/shm") for p in prefixes if p in name)


def orphaned_regions(before: set[str]) -> list[str]:
    """Regions of servers started since ``before`` was listed that no live process names (a
    running server's command line holds its prefix, so other servers' regions do not count)."""
    live = b" ".join(cmdline for cmdline in map(read_cmdline, Path("/proc").iterdir()) if cmdline)
    return sorted(name for name in set(os.listdir("/dev/shm")) - before
                  if name.startswith("trt_twotower_")
                  and name.rsplit("_", 1)[0].encode() + b"_" not in live)


def read_cmdline(entry: Path) -> bytes:
    try:
        return (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
    except OSError:
        return b""


def tokens(server, settings: GenerationSettings = SHORT) -> list[int]:
    from trt_twotower.serve.client import stream_generate
    return sum((ids for ids, _, _ in stream_generate(server.grpc_url, PROMPT, settings,
                                                     timeout=30)), [])


def start_at_once(servers) -> None:
    """Start the servers on threads of their own, all at the same time."""
    errors = []

    def start(server):
        try:
            server.start(timeout=150)
        except Exception as err:  # collected, so that the other starts are waited for
            errors.append(err)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two servers of one repository, started at the same time: the first serves the fault
    tests, the second is there to collide with it."""
    from trt_twotower.serve.server import TritonServer
    work = tmp_path_factory.mktemp("faults")
    repository = render_repository(work)
    servers = [TritonServer(repository, work / name) for name in ("a", "b")]
    for server in servers:
        server.work_dir.mkdir()
    try:
        start_at_once(servers)
        yield servers
    finally:
        for server in servers:
            server.stop(graceful=False)


class Supervised:
    """The shared server, its supervisor, the supervisor's one-line reports (with the time
    each came) and every shm prefix the server has used."""

    def __init__(self, server) -> None:
        from trt_twotower.serve.supervisor import Supervisor
        self.server = server
        self.reports: list[tuple[float, str]] = []
        self.supervisor = Supervisor(  # as many restarts as the tests make: no crash loop
            server, report=lambda line: self.reports.append((time.monotonic(), line)),
            max_restarts=10).start()
        self.prefixes = {server.shm_prefix}
        self.before_faults = tokens(server)


@pytest.fixture(scope="module")
def supervised(pair):
    harness = Supervised(pair[0])
    yield harness
    # last fault: a stub dies and the server is stopped at once, mid-recovery
    server = harness.server
    assert eventually(lambda: server.stubs and not server.dead_stubs(), RECOVERY_WITHIN_S)
    harness.prefixes.add(server.shm_prefix)
    reported = len(harness.reports)
    os.kill(stub_pid(server.process.pid, "context_tower"), signal.SIGKILL)
    assert eventually(lambda: len(harness.reports) > reported, 2.0)
    began = time.monotonic()
    harness.supervisor.stop()
    assert time.monotonic() - began < STOP_WITHIN_S
    harness.prefixes.add(server.shm_prefix)
    assert not harness.supervisor.running() and harness.supervisor.failure is None
    assert stat(server.process.pid) is None or stat(server.process.pid)[0] == "Z"
    assert regions_left(harness.prefixes) == []


def kill_mid_stream(server, victim: str) -> tuple[int, float, float]:
    """Start a long stream, and a long request of the load benchmark's target (its streams
    share one asyncio loop), SIGKILL ``victim`` (a model's stub, or tritonserver) once both
    have their first block, and read on; returns (killed pid, kill time, time of the error)."""
    from trt_twotower.serve.client import ClientError, stream_generate
    from trt_twotower.serve.load_target import TritonTarget
    stream = stream_generate(server.grpc_url, PROMPT, LONG, timeout=ERROR_WITHIN_S)
    next(stream)
    first_block = threading.Event()
    with TritonTarget(server.grpc_url, timeout=3 * ERROR_WITHIN_S) as target:
        wait = target.start(PROMPT, LONG, lambda ids: first_block.set())
        assert first_block.wait(ERROR_WITHIN_S)
        pid = (server.process.pid if victim == "tritonserver"
               else stub_pid(server.process.pid, victim))
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(ClientError):
            for _ in stream:
                assert time.monotonic() - killed < ERROR_WITHIN_S, "the stream outlived its server"
        errored = time.monotonic()
        with pytest.raises(ClientError) as load_error:
            wait()
        assert "no end of a request" not in str(load_error.value)
        assert time.monotonic() - killed < ERROR_WITHIN_S, "a load request outlived its server"
    return pid, killed, errored


def wait_for_recovery(harness: Supervised, killed: float, restarts: int) -> float:
    """Poll readiness until the restarted server answers; returns when it did. Every answer
    before then must be "not ready"."""
    answers = []
    while time.monotonic() - killed < RECOVERY_WITHIN_S:
        answers.append(ready(harness.server))
        if answers[-1]:
            break
        time.sleep(0.2)
    assert answers[-1], f"not ready {RECOVERY_WITHIN_S:.0f} s after the fault: {harness.reports}"
    back = time.monotonic()
    while harness.supervisor.recoveries < restarts and time.monotonic() - back < 10:
        time.sleep(0.05)  # the supervisor notes the new stubs just after it is ready
    assert harness.supervisor.recoveries == restarts
    return back


@pytest.mark.parametrize("victim", ["context_tower", "denoiser_tower", "twotower_bls",
                                    "tritonserver"])
def test_a_killed_process_ends_in_flight_requests_at_once_and_the_server_recovers(
        supervised, victim):
    server = supervised.server
    old_process, old_prefix = server.process, server.shm_prefix
    restarts = supervised.supervisor.recoveries + 1
    reported = len(supervised.reports)

    pid, killed, errored = kill_mid_stream(server, victim)
    assert errored - killed < ERROR_WITHIN_S
    assert not ready(server), "ready with a process of the server dead"
    assert eventually(lambda: len(supervised.reports) > reported, killed + 2.0 - time.monotonic())
    detected, fault = supervised.reports[reported]
    assert detected - killed < 2.0, "the fault went unnoticed for seconds"
    assert (f"model {victim} (pid {pid}) died" if victim != "tritonserver"
            else "tritonserver was killed by SIGKILL") in fault

    back = wait_for_recovery(supervised, killed, restarts)
    assert back - killed < RECOVERY_WITHIN_S
    supervised.prefixes.add(server.shm_prefix)
    assert server.process is not old_process and old_process.poll() is not None
    assert server.stubs and pid not in server.stubs and not server.dead_stubs()
    assert regions_left([old_prefix]) == [], "the dead server's /dev/shm regions outlived it"
    assert "recovered" in supervised.reports[-1][1]

    assert tokens(server) == supervised.before_faults
    from trt_twotower.serve.client import tower_stats
    # releases go out when the loop falls idle, just after the last answer is streamed
    assert eventually(lambda: all(stats["live_sequences"] == 0 for stats in
                                  tower_stats(server.grpc_url).values()), 5.0)


def test_two_servers_started_at_once_keep_to_their_own_regions_and_stop_quickly_after_a_fault(
        pair):
    a, b = pair
    assert a.shm_prefix != b.shm_prefix
    assert a.regions() and b.regions() and not set(a.regions()) & set(b.regions())
    assert all(s.shm_prefix in region for s in pair for region in s.regions())
    prefix, pid = b.shm_prefix, stub_pid(b.process.pid, "context_tower")
    os.kill(pid, signal.SIGKILL)
    while stat(pid) and stat(pid)[0] != "Z":  # dead: a stop comes after the fault
        time.sleep(0.01)
    began = time.monotonic()
    b.stop()
    assert time.monotonic() - began < STOP_WITHIN_S
    assert regions_left([prefix]) == [] and a.regions()


class NeverRestarts:
    """What the supervisor sees of a server whose every restart fails (say, a model that no
    longer loads): a running process, then only failed launches."""

    grpc_url = "127.0.0.1:1"

    def __init__(self, log: Path) -> None:
        self.log = log
        self.process = subprocess.Popen(["sleep", "60"])
        self.stubs: dict[int, str] = {}
        self.launches = 0

    def dead_stubs(self) -> dict[int, str]:
        return {}

    def stop(self, graceful: bool = True) -> int:
        self.process.kill()
        return self.process.wait()

    def launch(self) -> None:
        from trt_twotower.serve.server import ServerError
        self.launches += 1
        raise ServerError("tritonserver exited with code 1: failed to load 'context_tower'")

    def wait_ready(self, timeout: float) -> None:
        raise AssertionError("never launched")


def test_a_crash_loop_is_given_up_with_one_line_after_the_allowed_restarts(tmp_path):
    from trt_twotower.serve.supervisor import Supervisor
    server = NeverRestarts(tmp_path / "tritonserver.log")
    reports = []
    supervisor = Supervisor(server, report=reports.append, max_restarts=2, window_s=60).start()
    try:
        server.process.kill()
        deadline = time.monotonic() + 10
        while supervisor.running() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not supervisor.running()
    finally:
        supervisor.stop()
    assert server.launches == 2
    assert "\n" not in supervisor.failure
    assert supervisor.failure == (
        "gave up restarting tritonserver: it failed 3 times within 60 s, last: the restart "
        "failed: tritonserver exited with code 1: failed to load 'context_tower' (log: "
        f"{server.log})")
    assert reports[0].startswith("fault at ") and "killed by SIGKILL" in reports[0]
    assert len(reports) == 3 and all("the restart failed" in line for line in reports[1:])


def test_serve_reports_a_fault_in_one_line_and_a_ctrl_c_mid_recovery_stops_it_quickly(tmp_path):
    """The command as users run it: the supervisor's line on stderr, then Ctrl-C while it
    restarts the server leaves no process and no /dev/shm region behind."""
    import queue
    import sys
    from trt_twotower.serve.server import free_port
    cli = subprocess.Popen(
        [sys.executable, "-c", "from trt_twotower.cli import main; main()", "serve",
         "--grpc-port", str(free_port()), "--http-port", str(free_port()), "--metrics-port",
         str(free_port()), "--max-context", "128", "--capacity", "2", "--no-openai",
         "--work-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    before = set(os.listdir("/dev/shm"))
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in cli.stderr], daemon=True).start()
    try:
        assert "tritonserver ready" in cli.stdout.readline()
        server = next(int(p) for p in Path(f"/proc/{cli.pid}/task/{cli.pid}/children")
                      .read_text().split())
        prefix = next(arg.split("=")[-1] for arg in Path(f"/proc/{server}/cmdline")
                      .read_bytes().decode().split("\0") if "shm-region-prefix-name" in arg)
        stub = stub_pid(server, "denoiser_tower")
        os.kill(stub, signal.SIGKILL)
        fault = lines.get(timeout=5)
        assert fault.startswith("fault at ") and fault.count("\n") == 1
        assert f"the Python stub of model denoiser_tower (pid {stub}) died" in fault
        began = time.monotonic()
        cli.send_signal(signal.SIGINT)
        out, _ = cli.communicate(timeout=STOP_WITHIN_S)
        assert time.monotonic() - began < STOP_WITHIN_S
        assert cli.returncode == 0 and "stopping… exit code" in out
    finally:
        if cli.poll() is None:
            cli.kill()
    assert eventually(lambda: stat(server) is None or stat(server)[0] == "Z", 5)
    assert not any(state and state[1] == server and state[0] != "Z"
                   for state in map(stat, (int(p.name) for p in Path("/proc").iterdir()
                                           if p.name.isdigit())))
    assert regions_left([prefix]) == [] and orphaned_regions(before) == []
