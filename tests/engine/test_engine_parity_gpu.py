"""Engine parity on a GPU host with TensorRT (skipped elsewhere, with the reason).

On such a host:
    trt-twotower build --preset tiny -o out --flavor tensorrt --dtype bf16 --context-device 0 \
        --denoiser-device 0 --block-size 8 --max-context 128 --max-prefill 64 &&
    trt-twotower parity --backend tensorrt out --context-device cuda:0 --denoiser-device cuda:0 \
        --block-size 8 --tolerance 2e-2
or  pytest -m gpu tests/engine/test_engine_parity_gpu.py
"""

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available()
                       or importlib.util.find_spec("tensorrt") is None,
                       reason="needs a CUDA GPU and TensorRT (`pip install tensorrt`)"),
]

BF16_TOLERANCE = 2e-2  # bf16 engines vs the fp32 reference, relative to the largest logit


def test_bf16_engines_match_the_reference(tmp_path):
    from click.testing import CliRunner

    from trt_twotower.cli import main
    runner = CliRunner()
    built = runner.invoke(main, ["build", "--preset", "tiny", "-o", str(tmp_path), "--flavor",
                                 "tensorrt", "--dtype", "bf16", "--context-device", "0",
                                 "--denoiser-device", "0", "--block-size", "8",
                                 "--max-context", "128", "--max-prefill", "64"])
    assert built.exit_code == 0, built.output
    parity = runner.invoke(main, ["parity", "--backend", "tensorrt", str(tmp_path),
                                  "--context-device", "cuda:0", "--denoiser-device", "cuda:0",
                                  "--tolerance", str(BF16_TOLERANCE), "--block-size", "8"])
    assert parity.exit_code == 0, parity.output
