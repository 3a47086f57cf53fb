"""Engines of the built-in model, built once per session with TensorRT-RTX on the CPU."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from trt_twotower.cli import main

BUILD_ARGS = ["--flavor", "tensorrt-rtx", "--max-context", "128",
              "--block-size", "8", "--max-batch", "2", "--max-prefill", "64"]


@pytest.fixture(scope="session")
def bf16_cli(tmp_path_factory):
    """(build directory, what `trt-twotower build` printed)."""
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed")
    out = tmp_path_factory.mktemp("engines-bf16")
    result = CliRunner().invoke(main, ["build", *BUILD_ARGS, "--dtype", "bf16", "-o", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="session")
def bf16_build(bf16_cli):
    return bf16_cli[0]
