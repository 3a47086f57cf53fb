"""Engine parity on a GPU host with TensorRT (skipped elsewhere, with the reason).

bf16 engines are judged by the drift criterion (docs/parity-criterion.md): every step beside
the PyTorch reference run in bf16 on the same GPU and the fp32 reference, each within a
measured multiple of the references' own drift; generations are reported, not gated. On such a
host:
    trt-twotower build -o out --flavor tensorrt --dtype bf16 --context-device 0 \
        --denoiser-device 0 --block-size 8 --max-context 128 --max-prefill 64 &&
    trt-twotower parity --backend tensorrt out --context-device cuda:0 --denoiser-device cuda:0 \
        --block-size 8
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


def test_bf16_engines_stay_within_the_references_own_drift(tmp_path):
    """The built-in model (trained: its bf16 drift is what the criterion's multiple was
    measured on), built with the default --max-batch 4 that the criterion's steps use."""
    from click.testing import CliRunner

    from trt_twotower.cli import main
    runner = CliRunner()
    built = runner.invoke(main, ["build", "-o", str(tmp_path), "--flavor", "tensorrt",
                                 "--dtype", "bf16", "--context-device", "0",
                                 "--denoiser-device", "0", "--block-size", "8",
                                 "--max-context", "128", "--max-prefill", "64"])
    assert built.exit_code == 0, built.output
    parity = runner.invoke(main, ["parity", "--backend", "tensorrt", str(tmp_path),
                                  "--context-device", "cuda:0", "--denoiser-device", "cuda:0",
                                  "--block-size", "8"])
    assert parity.exit_code == 0, parity.output
    assert "worst/bound" in parity.output and "parity ok" in parity.output
