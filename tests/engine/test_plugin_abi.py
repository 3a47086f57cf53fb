"""The compiled library's C ABI on the host (plugins/twotower_plugins.h): the checks each launcher
makes before any CUDA call, and the workspace sizes. The pointers are fake and never
dereferenced: every call here is refused before the launch, which is what is being tested."""

import pytest

from tests.conftest import needs_plugin_library

pytestmark = needs_plugin_library

# tt_error codes of twotower_plugins.h
UNSUPPORTED, WORKSPACE, MISALIGNED = 2, 3, 5
FP32, FP16 = 0, 1
ALIGNED = 0x7F0000000000  # a multiple of 256, as CUDA allocations are


@pytest.fixture
def lib(plugin_library):
    return plugin_library


def _attention(lib, q=ALIGNED, ctx_k=ALIGNED, out=ALIGNED, workspace_bytes=0, head_dim=64,
               batch=2):
    """tt_block_cross_attention with every pointer aligned unless given; a workspace of 0 bytes
    unless given, so that a check running after the workspace check would answer WORKSPACE."""
    return lib.tt_block_cross_attention(q, ctx_k, ALIGNED, ALIGNED, ALIGNED, ALIGNED, out,
                                        ALIGNED, workspace_bytes, batch, 16, 8, 2, head_dim, 128,
                                        FP16, None)


def test_attention_refuses_misaligned_pointers_before_anything_else(lib):
    assert _attention(lib) == WORKSPACE  # all aligned: the next check down answers
    assert _attention(lib, ctx_k=ALIGNED + 8) == MISALIGNED  # K/V need 16 bytes
    assert _attention(lib, q=ALIGNED + 2) == MISALIGNED  # q needs 4
    assert _attention(lib, out=ALIGNED + 1) == MISALIGNED
    assert b"misaligned" in lib.tt_error_string(MISALIGNED)


def test_attention_refuses_unsupported_shapes_before_sizing_the_workspace(lib):
    assert _attention(lib, head_dim=48) == UNSUPPORTED
    assert _attention(lib, batch=70000) == UNSUPPORTED  # more rows than a grid dimension


def _unmask(lib, logits=ALIGNED, confidence=ALIGNED, steps_left=ALIGNED, batch=2, block=16,
            dtype=FP32):
    return lib.tt_confidence_unmask(logits, ALIGNED, ALIGNED, confidence, ALIGNED, None, ALIGNED,
                                    0, batch, block, 1000, 3, ALIGNED, steps_left, 0.0, 0, dtype,
                                    None)


def test_unmask_refuses_misaligned_pointers_and_shapes_before_anything_else(lib):
    assert _unmask(lib) == WORKSPACE
    assert _unmask(lib, logits=ALIGNED + 2) == MISALIGNED  # fp32 logits
    assert _unmask(lib, logits=ALIGNED + 2, dtype=FP16) == WORKSPACE  # fp16 needs only 2
    assert _unmask(lib, confidence=ALIGNED + 1) == MISALIGNED
    assert _unmask(lib, steps_left=ALIGNED + 4) == MISALIGNED
    assert _unmask(lib, block=2048) == UNSUPPORTED
    assert _unmask(lib, batch=128, block=1024) == UNSUPPORTED  # 131072 positions


def test_attention_workspace_covers_every_smaller_shape(lib):
    """What TensorRT allots for a profile's maximum must serve each launch within it."""
    size = lib.tt_block_cross_attention_workspace_bytes
    for hq, hkv, d in ((32, 2, 128), (4, 2, 16)):
        most = size(64, 32, hq, hkv, d, 65536)
        assert most >= 64 * 32 * hq * (d + 2) * 4  # at least one split's partials
        for b in range(1, 65):
            for s in (1, 7, 16, 32):
                for lmax in (0, 300, 8192, 65536):
                    assert size(b, s, hq, hkv, d, lmax) <= most, (b, s, lmax)


def test_unmask_workspace_covers_every_smaller_shape(lib):
    size = lib.tt_confidence_unmask_workspace_bytes
    for batch, block in ((64, 1024), (1, 66)):
        most = size(batch, block, 131072)
        for b in range(1, batch + 1):
            for s in range(1, block + 1, 13 if block > 100 else 1):
                for v in (1000, 4096, 131072):
                    assert size(b, s, v) <= most, (b, s, v)
    assert size(1, 16, 0) == -1
