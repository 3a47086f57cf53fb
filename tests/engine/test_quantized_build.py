"""Quantised towers of the built-in model build with TensorRT-RTX on this CPU: int4 weight-only
for the default targets, fp8 for the fp8 ones (SM89, SM120), and the builder's DETAILED log
shows the quantised GEMMs' kernels: int4 weights fused into the GEMM, fp8 × fp8 GEMMs."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from click.testing import CliRunner

from trt_twotower import names
from trt_twotower.cli import main
from trt_twotower.engine.build import FP8_COMPUTE_CAPABILITIES, RTX_COMPUTE_CAPABILITIES
from trt_twotower.manifest import Manifest
from tests.conftest import BUILD_ARGS

pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed")

LAYER = re.compile(r"^Name: (?P<name>[^,]*), LayerType: (?P<type>\w*), (?P<rest>.*)$")


def quantized_layers(log: str) -> Counter:
    """(layer type, kernel stem) of every engine layer that reads an Int4 or FP8 tensor."""
    found = Counter()
    for line in log.splitlines():
        match = LAYER.match(line)
        if match and re.search(r"Datatype: (Int4|FP8)\b", match["rest"]):
            stem = re.sub(r"(_myl\d+_\d+|\d+)$", "", match["name"].split(":")[-1])
            found[(match["type"], stem if stem.startswith("__myl") else "GEMM node")] += 1
    return found


def _build(out, *options):
    result = CliRunner().invoke(main, ["build", *BUILD_ARGS, "--dtype", "bf16",
                                       "--calibration-prompts", "8", "-o", str(out), *options],
                                catch_exceptions=False)
    return result


def test_int4_towers_build_with_the_int4_weights_fused_into_their_gemms(tmp_path):
    """Two blocks per input row (block 64 of 128): TensorRT-RTX fuses the int4 dequantisation
    into the GEMM (a ``ReplCastMulCastFc`` runtime fusion reading Int4). With one block per
    row it dequantises into a separate kernel instead (docs/quantization.md)."""
    result = _build(tmp_path, "--quantize", "int4-awq", "--quantize-block-size", "64")
    assert result.exit_code == 0, result.output
    manifest = Manifest.load(tmp_path)
    assert manifest.quantization.mode == "int4-awq" and len(manifest.engines) == 2
    for graph, record in manifest.engines.items():
        assert record.compute_capabilities == RTX_COMPUTE_CAPABILITIES
        layers = quantized_layers((tmp_path / record.build_log).read_text())
        assert set(layers) == {("runtime_fusion", "__myl_ReplCastMulCastFc")}, layers
        per_profile = 2 * manifest.config.layer_types.count("E") * 2   # routed + shared, up/down
        profiles = len(record.profiles)
        assert sum(layers.values()) == per_profile * profiles


def test_fp8_towers_build_for_fp8_targets_with_fp8_gemms(tmp_path):
    result = _build(tmp_path, "--quantize", "fp8")
    assert result.exit_code == 0, result.output
    manifest = Manifest.load(tmp_path)
    for graph, record in manifest.engines.items():
        assert record.compute_capabilities == FP8_COMPUTE_CAPABILITIES
        layers = quantized_layers((tmp_path / record.build_log).read_text())
        gemms = sum(n for (kind, _), n in layers.items() if kind == "gemm")
        assert gemms == 2 * manifest.config.layer_types.count("E") * 2 * len(record.profiles)
    assert (tmp_path / f"{names.DENOISER_STEP}.engine").stat().st_size > 0


def test_fp8_for_a_target_without_fp8_kernels_is_refused(tmp_path):
    result = _build(tmp_path, "--quantize", "fp8", "--compute-capability", "SM86")
    assert result.exit_code == 1
    assert "TensorRT-RTX has for SM89 and SM120 only" in result.output
    assert "--compute-capability SM89" in result.output
