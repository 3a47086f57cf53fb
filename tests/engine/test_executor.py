"""The TensorRT executor where it cannot run: a clear BackendUnavailable, not a crash."""

import pytest
import torch

from trt_twotower.runtime.backends import open_tensorrt
from trt_twotower.runtime.executor import BackendUnavailable


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="this host has a GPU: test_engine_parity_gpu.py runs the engines")
def test_engines_without_a_gpu_say_a_gpu_and_tensorrt_are_needed(bf16_build):
    from trt_twotower.engine.executor import open_engines

    for opener in (open_engines, open_tensorrt):
        with pytest.raises(BackendUnavailable, match="GPU"):
            opener(bf16_build, "cuda:0", "cuda:1")


def test_shapes_outside_the_engines_profiles_are_named():
    from pathlib import Path

    from trt_twotower.engine.executor import _Engine

    engine = object.__new__(_Engine)  # no GPU: only the shape check, not a deserialised engine
    engine.path = Path("denoiser_step.engine")
    engine.profiles = {"block": {"block_ids": [[1, 8], [2, 8], [2, 8]]}}
    engine._check_shapes("block", {"block_ids": torch.zeros(2, 8)})
    with pytest.raises(ValueError, match=r"block_ids from \[1, 8\] to \[2, 8\], got \[4, 8\]"):
        engine._check_shapes("block", {"block_ids": torch.zeros(4, 8)})


def test_a_graph_left_out_of_the_build_is_named_when_asked_for():
    from types import SimpleNamespace

    from trt_twotower import names
    from trt_twotower.engine.executor import TrtDenoiserExecutor

    denoiser = TrtDenoiserExecutor({names.DENOISER_STEP: SimpleNamespace(device="cuda:1")})
    with pytest.raises(BackendUnavailable, match="no mock_ar_step engine"):
        denoiser.mock_ar_step(torch.zeros(1, 1, dtype=torch.long), None)
