"""The TensorRT executor's host-side contract, where no engine can run (no GPU here): what it
refuses before an engine would read a wrong address, and what opening a build reads."""

import shutil
from pathlib import Path

import pytest
import torch

from trt_twotower.manifest import Manifest, TensorRecord
from trt_twotower.runtime import trt_executor
from trt_twotower.runtime.backends import open_tensorrt
from trt_twotower.runtime.executor import BackendUnavailable
from trt_twotower.runtime.trt_executor import FeedError, check_feeds, check_shapes

INPUTS = (TensorRecord("block_ids", "int64", ("batch", "block")),
          TensorRecord("past_key.2", "bfloat16", ("batch", 2, 64, 16)))


def _feeds(device="cpu", key_dtype=torch.bfloat16):
    return {"block_ids": torch.zeros(2, 8, dtype=torch.int64),
            "past_key.2": torch.zeros(2, 2, 64, 16, dtype=key_dtype, device=device)}


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="this host has a GPU: test_engine_parity_gpu.py runs the engines")
def test_engines_without_a_gpu_say_a_gpu_and_tensorrt_are_needed(bf16_build):
    for opener in (trt_executor.open_engines, open_tensorrt):
        with pytest.raises(BackendUnavailable, match="GPU"):
            opener(bf16_build, "cuda:0", "cuda:1")


def test_a_tensor_on_another_device_is_refused_by_name():
    """The denoiser engine on one GPU handed a cache on the other would read garbage."""
    check_feeds("denoiser_step.engine", torch.device("cpu"), INPUTS, _feeds())
    with pytest.raises(FeedError, match=r"runs on cpu but past_key.2 is on meta"):
        check_feeds("denoiser_step.engine", torch.device("cpu"), INPUTS, _feeds("meta"))


def test_a_wrong_dtype_or_a_missing_input_is_refused():
    with pytest.raises(FeedError, match="past_key.2 must be bfloat16, got float16"):
        check_feeds("e", torch.device("cpu"), INPUTS, _feeds(key_dtype=torch.float16))
    feeds = _feeds()
    del feeds["block_ids"]
    with pytest.raises(FeedError, match="input block_ids was not fed"):
        check_feeds("e", torch.device("cpu"), INPUTS, feeds)


def test_shapes_outside_the_profile_are_named():
    ranges = {"block_ids": ((1, 8), (2, 8), (2, 8))}
    check_shapes("denoiser_step.engine", "block", ranges, {"block_ids": torch.zeros(2, 8)})
    with pytest.raises(FeedError, match=r"block_ids from \[1, 8\] to \[2, 8\], got \[4, 8\]"):
        check_shapes("denoiser_step.engine", "block", ranges, {"block_ids": torch.zeros(4, 8)})


def test_opening_one_tower_verifies_its_engine_once_and_never_reads_the_other(
        bf16_build, tmp_path, monkeypatch):
    """A Triton tower process opens one tower: it must hash only that tower's engine, once
    (at full scale each engine is ~59 GiB). The other engine is corrupted here, so reading it
    at all would fail; the GPU-side load is replaced by a recorder (no GPU on this machine)."""
    out = tmp_path / "build"
    shutil.copytree(bf16_build, out)
    (out / "context_step.engine").write_bytes(b"corrupt")
    hashed, loaded = [], []
    from trt_twotower.engine import verify

    def counting_hash(path: Path) -> str:
        hashed.append(Path(path).name)
        return original(path)
    original = verify.sha256_file
    monkeypatch.setattr(verify, "sha256_file", counting_hash)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    class Recorded:
        def __init__(self, trt, path, device, record):
            loaded.append((path.name, str(device), record.tower))
            self.device = device
    monkeypatch.setattr(trt_executor, "_Engine", Recorded)
    opened = trt_executor.open_engines(out, "cuda:0", "cuda:1", towers=("denoiser",))
    assert hashed == ["denoiser_step.engine"]
    assert loaded == [("denoiser_step.engine", "cuda:1", "denoiser")]
    assert opened.context is None and opened.denoiser.device == torch.device("cuda:1")
    assert opened.fused_unmask and opened.config == Manifest.load(out).config
