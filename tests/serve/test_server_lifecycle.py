"""Starting and stopping a real tritonserver under faults: a busy port is named before anything
starts, and a stop after a crash is quick and leaves no process or /dev/shm region behind."""

import importlib.util
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from trt_twotower.reference.sources import BUILTIN_CHECKPOINT

pytestmark = pytest.mark.skipif(importlib.util.find_spec("pytriton") is None
                                or importlib.util.find_spec("tritonclient") is None,
                                reason="needs nvidia-pytriton (tritonserver) and tritonclient")


def small_repository(work: Path) -> Path:
    from trt_twotower.serve.repository import render, repository_values
    return render(work / "repo", repository_values(
        "builtin", "torch", BUILTIN_CHECKPOINT, "cpu", "cpu", 128, 16, "16", capacity=2))


def group_running(pgid: int) -> bool:
    """Whether any process of the group is alive and not a zombie (killed stubs are orphans
    whose zombies wait for init to reap them)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except OSError:
            continue
        if int(group) == pgid and state != "Z":
            return True
    return False


def test_a_port_held_by_a_plain_socket_is_named_before_anything_starts(tmp_path):
    from trt_twotower.serve.server import PortInUseError, TritonServer
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = TritonServer(small_repository(tmp_path), tmp_path, grpc_port=port)
        began = time.monotonic()
        with pytest.raises(PortInUseError, match=f"port {port} on 127.0.0.1 is already in use"):
            server.start(timeout=60)
        assert time.monotonic() - began < 5
    assert server.process is None and not (tmp_path / "tritonserver.log").exists()


def test_stopping_after_the_server_crashed_kills_its_stubs_and_unlinks_their_regions(tmp_path):
    """SIGKILL of tritonserver alone orphans its Python stubs and their shared memory; stop()
    must still take the whole process group down, free the ports and unlink the regions."""
    from trt_twotower.serve.server import TritonServer, check_ports_free
    server = TritonServer(small_repository(tmp_path), tmp_path).start(timeout=120)
    pid = server.process.pid
    regions = server.regions()
    assert regions and all(server.shm_prefix in name for name in regions)
    try:
        os.kill(pid, signal.SIGKILL)
        server.process.wait(10)
        assert group_running(pid)  # the stubs outlive their server
        began = time.monotonic()
        assert server.stop() == -signal.SIGKILL
        assert time.monotonic() - began < 5
    finally:
        if group_running(pid):
            os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while group_running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_running(pid)
    assert not any(Path("/dev/shm", name).exists() for name in regions)
    check_ports_free("127.0.0.1", (server.grpc_port, server.http_port))



def test_a_server_counts_as_listening_only_once_both_its_ports_are_open(tmp_path):
    """tritonserver opens its gRPC port before its HTTP port, and logs the HTTP port as started
    before it takes connections; a request sent in between was refused (seen in CI twice), so
    readiness waits for both lines of this server's own log and a connection to its HTTP
    port."""
    import socket

    from trt_twotower.serve.server import TritonServer
    with socket.socket() as http:
        http.bind(("127.0.0.1", 0))
        port = http.getsockname()[1]
        server = TritonServer(tmp_path / "repo", tmp_path, grpc_port=40001, http_port=port)
        lines = ['I1130 grpc_server.cc:2558] "Started GRPCInferenceService at 127.0.0.1:40001"',
                 f'I1130 http_server.cc:4713] "Started HTTPService at 127.0.0.1:{port}"']
        server.log.write_text(lines[0] + "\n")
        assert not server._listening()
        server.log.write_text("\n".join(lines) + "\n")
        assert not server._listening(), "logged as started, not yet listening"
        http.listen()
        assert server._listening()
        server.log.write_text(lines[0] + "\n" + lines[1].replace(str(port), "1") + "\n")
        assert not server._listening(), "another server's HTTP port"
