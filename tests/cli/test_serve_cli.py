"""`trt-twotower serve` and `trt-twotower client` as a user runs them: separate processes, a
real tritonserver, Ctrl-C to stop."""

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from trt_twotower.cli import main

needs_triton = pytest.mark.skipif(importlib.util.find_spec("pytriton") is None
                                  or importlib.util.find_spec("tritonclient") is None,
                                  reason="needs nvidia-pytriton (tritonserver) and tritonclient")
CLI = [sys.executable, "-c", "from trt_twotower.cli import main; main()"]


def test_serve_refuses_a_device_it_cannot_place_before_starting_anything(tmp_path):
    result = CliRunner().invoke(main, ["serve", "--denoiser-device", "gpu1",
                                       "--work-dir", str(tmp_path)])
    assert result.exit_code != 0 and "neither cpu nor cuda:N" in result.output
    assert not (tmp_path / "tritonserver.log").exists()


def test_serve_needs_a_build_dir_for_engine_backends():
    result = CliRunner().invoke(main, ["serve", "--backend", "onnxruntime"])
    assert result.exit_code == 2 and "BUILD_DIR" in result.output


@needs_triton
def test_serve_then_client_stream_then_ctrl_c_stops_cleanly(tmp_path):
    from trt_twotower.serve.server import free_port
    port, openai_port = free_port(), free_port()
    server = subprocess.Popen(
        [*CLI, "serve", "--grpc-port", str(port), "--http-port", str(free_port()),
         "--metrics-port", str(free_port()), "--max-context", "256", "--capacity", "4",
         "--openai-port", str(openai_port), "--work-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        banner = server.stdout.readline()
        assert f"gRPC 127.0.0.1:{port}" in banner, banner + server.stdout.read()
        openai_line = server.stdout.readline()
        assert f"OpenAI API: http://127.0.0.1:{openai_port}/v1" in openai_line, openai_line
        models = json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{openai_port}/v1/models", timeout=30).read())
        assert [m["id"] for m in models["data"]] == ["twotower"]
        client = subprocess.run(
            [*CLI, "client", "--url", f"127.0.0.1:{port}", "--prompt", "import os\n",
             "--max-tokens", "16", "--stream"], capture_output=True, text=True, timeout=120)
        assert client.returncode == 0, client.stderr
        assert client.stdout.startswith("import os\n") and len(client.stdout) > len("import os\n")
        assert "denoiser_evaluations" in client.stderr
        server.send_signal(signal.SIGINT)
        rest, _ = server.communicate(timeout=60)
        assert server.returncode == 0 and "exit code 0" in rest
    finally:
        if server.poll() is None:
            server.kill()
    refused = subprocess.run([*CLI, "client", "--url", f"127.0.0.1:{port}", "--prompt", "x",
                              "--timeout", "5"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "Error" in refused.stderr


def children(pid):
    try:
        return [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []


def running(pid):
    """Alive and not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def ports_free(*ports):
    from trt_twotower.serve.server import PortInUseError, check_ports_free
    try:
        check_ports_free("127.0.0.1", ports)
    except PortInUseError:
        return False
    return True


@needs_triton
def test_serve_on_a_busy_port_names_it_in_one_line_and_leaves_no_process(tmp_path):
    from trt_twotower.serve.server import free_port
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        began = time.monotonic()
        result = subprocess.run(
            [*CLI, "serve", "--grpc-port", str(free_port()), "--http-port", str(port),
             "--metrics-port", str(free_port()), "--no-openai", "--work-dir",
             str(tmp_path)],
            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "ready" not in result.stdout
    assert result.stderr == f"Error: port {port} on 127.0.0.1 is already in use; stop what " \
                            "holds it or choose another port (0 picks a free one)\n"
    assert time.monotonic() - began < 15
    assert not (tmp_path / "tritonserver.log").exists()  # nothing was launched


@needs_triton
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_during_start_up_leaves_no_tritonserver_and_frees_the_ports(tmp_path, sig):
    from trt_twotower.serve.server import free_port
    grpc, http = free_port(), free_port()
    cli = subprocess.Popen(
        [*CLI, "serve", "--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port",
         str(free_port()), "--max-context", "128", "--capacity", "2", "--no-openai",
         "--work-dir",
         str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server = None
    try:
        deadline = time.monotonic() + 30
        while not server and time.monotonic() < deadline:  # tritonserver launched, not ready
            server = next(iter(children(cli.pid)), None)
            time.sleep(0.1)
        assert server, cli.communicate(timeout=30)
        time.sleep(1.0)  # the stubs are loading models
        cli.send_signal(sig)
        out, err = cli.communicate(timeout=20)
        deadline = time.monotonic() + 10
        while (running(server) or not ports_free(grpc, http)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not running(server) and ports_free(grpc, http)
        assert cli.returncode == 1 and "ready" not in out
        assert err == f"Error: stopped by {sig.name} while tritonserver was starting; it was " \
                      "stopped too\n"
    finally:
        if cli.poll() is None:
            cli.kill()
        if server and running(server):
            os.kill(server, signal.SIGKILL)


@needs_triton
def test_a_checkpoint_that_fails_to_load_is_one_line_with_the_cause_from_the_log(tmp_path):
    from trt_twotower.reference.sources import BUILTIN_CHECKPOINT
    from trt_twotower.serve.server import free_port
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy2(BUILTIN_CHECKPOINT / "tokenizer.json", broken)
    (broken / "config.json").write_text("{")
    result = subprocess.run(
        [*CLI, "serve", "--checkpoint", str(broken), "--grpc-port", str(free_port()),
         "--http-port", str(free_port()), "--metrics-port", str(free_port()), "--no-openai",
         "--work-dir", str(tmp_path / "work")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("Error: tritonserver exited with code 1: failed to load '")
    assert f"{broken / 'config.json'} is not valid JSON" in result.stderr
