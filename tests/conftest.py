"""Shared fixtures: small random TwoTower models in fp32 (fixed seeds, non-zero weights), and
engines of the built-in model built once per session with TensorRT-RTX on the CPU."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from trt_twotower.cli import main
from trt_twotower.engine.plugin_library import load_plugin_library, plugin_library_path
from trt_twotower.config import TwoTowerConfig, preset
from trt_twotower.reference import TwoTowerModel
from trt_twotower.reference.init import initialise


def random_model(config: TwoTowerConfig, seed: int = 0) -> TwoTowerModel:
    return initialise(TwoTowerModel(config), seed).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_config() -> TwoTowerConfig:
    return preset("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_config: TwoTowerConfig) -> TwoTowerModel:
    return random_model(tiny_config, seed=0)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


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


# Tests that call the compiled plugin library (build_scripts/build_plugins.sh; CI builds it
# first) skip, saying so, where it has not been built.
needs_plugin_library = pytest.mark.skipif(
    not plugin_library_path().is_file(),
    reason="the plugin library is not built (bash build_scripts/build_plugins.sh)")


@pytest.fixture(scope="session")
def plugin_library():
    """The compiled library with its C prototypes declared."""
    return load_plugin_library()
