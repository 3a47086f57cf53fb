"""`trt-twotower serve` and `trt-twotower client` as a user runs them: separate processes, a
real tritonserver, Ctrl-C to stop."""

import importlib.util
import signal
import subprocess
import sys

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
    port = free_port()
    server = subprocess.Popen(
        [*CLI, "serve", "--grpc-port", str(port), "--http-port", str(free_port()),
         "--metrics-port", str(free_port()), "--max-context", "256", "--capacity", "4",
         "--work-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        banner = server.stdout.readline()
        assert f"gRPC 127.0.0.1:{port}" in banner, banner + server.stdout.read()
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
