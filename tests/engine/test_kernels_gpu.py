"""The CUDA kernels against their torch definitions (GPU hosts with the compiled library).

Run there:  bash build_scripts/build_plugins.sh && pytest -m gpu tests/engine/test_kernels_gpu.py
The full grid and the benchmarks are in bench/kernels.py. Outputs are poisoned (NaN, -1)
before each launch so that a position the kernel forgets to write fails the comparison.
"""

import pytest
import torch

from trt_twotower import fused_ops
from trt_twotower.engine.kernel_library import KernelError, KernelLibrary
from trt_twotower.engine.plugin_library import plugin_library_path

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or not plugin_library_path().is_file(),
                       reason="needs a CUDA GPU and the compiled plugin library"),
]
MASK = 3


@pytest.fixture(scope="module")
def lib():
    return KernelLibrary()


def _random(g, dtype, *shape):
    return torch.randn(*shape, generator=g, device="cuda").to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("b,s,p,hq,hkv,d", [(1, 16, 0, 4, 2, 16), (3, 8, 300, 32, 2, 128),
                                             (2, 16, 2000, 8, 8, 64), (4, 32, 5000, 4, 2, 32),
                                             (1, 16, 70000, 32, 2, 128)])
def test_block_cross_attention_matches_definition(lib, dtype, tol, b, s, p, hq, hkv, d):
    g = torch.Generator(device="cuda").manual_seed(p + d)
    q, ck, cv = (_random(g, dtype, b, s, hq, d), _random(g, dtype, b, hkv, max(p, 1), d),
                 _random(g, dtype, b, hkv, max(p, 1), d))
    bk, bv = _random(g, dtype, b, hkv, s, d), _random(g, dtype, b, hkv, s, d)
    lengths = torch.tensor([p - i * (p // max(b - 1, 1)) for i in range(b)], device="cuda")
    out = torch.full_like(q, float("nan"))
    lib.block_cross_attention(q, ck, cv, lengths, bk, bv, out=out)
    ref = fused_ops.block_cross_attention(q.float(), ck.float(), cv.float(), lengths, bk.float(),
                                          bv.float())
    assert torch.isfinite(out).all()
    assert float((out.float() - ref).abs().max()) <= tol


def _poisoned(b, s):
    return (torch.full((b, s), -1, dtype=torch.int64, device="cuda"),
            torch.full((b, s), float("nan"), device="cuda"),
            torch.full((b,), -1, dtype=torch.int64, device="cuda"))


@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("dtype,vocab", [(torch.float32, 131072), (torch.bfloat16, 131072),
                                         (torch.float16, 1000), (torch.bfloat16, 997)])
def test_confidence_unmask_matches_policy(lib, dtype, vocab, temperature):
    g = torch.Generator(device="cuda").manual_seed(vocab)
    logits = (torch.randn(4, 16, vocab, generator=g, device="cuda") * 4).to(dtype)
    logits[..., MASK] = 100.0  # the mask token must never be predicted
    block = torch.full((4, 16), MASK, dtype=torch.int64, device="cuda")
    block[:, ::4] = 9
    seeds = torch.tensor([0, 1, -7, 2**40 + 3], device="cuda")
    for steps_left in (5, 1):
        nxt, conf, count = lib.confidence_unmask(logits, block, MASK, 0.05, steps_left,
                                                 temperature, seeds, 17, out=_poisoned(4, 16))
        ref_n, ref_c, ref_count = fused_ops.confidence_unmask(logits.float(), block, MASK, 0.05,
                                                              steps_left, temperature, seeds, 17)
        assert torch.equal(nxt, ref_n) and torch.equal(count, ref_count)
        finite = torch.isfinite(ref_c)
        assert torch.equal(finite, torch.isfinite(conf))
        assert float((conf[finite] - ref_c[finite]).abs().max()) < 1e-5


def test_attention_with_one_split_of_workspace_matches_definition(lib):
    """Less workspace than the launcher would like (a TensorRT profile sized elsewhere) means
    fewer splits, never a failure or a wrong result."""
    g = torch.Generator(device="cuda").manual_seed(5)
    b, s, p, hq, hkv, d = 2, 16, 5000, 8, 2, 64
    q = _random(g, torch.bfloat16, b, s, hq, d)
    ck, cv = _random(g, torch.bfloat16, b, hkv, p, d), _random(g, torch.bfloat16, b, hkv, p, d)
    bk, bv = _random(g, torch.bfloat16, b, hkv, s, d), _random(g, torch.bfloat16, b, hkv, s, d)
    lengths = torch.tensor([p, p // 3], device="cuda")
    out = torch.full_like(q, float("nan"))
    one_split = b * hq * s * (d + 2) * 4
    workspace = torch.empty(one_split, dtype=torch.uint8, device="cuda")
    code = lib.lib.tt_block_cross_attention(
        q.data_ptr(), ck.data_ptr(), cv.data_ptr(), lengths.data_ptr(), bk.data_ptr(),
        bv.data_ptr(), out.data_ptr(), workspace.data_ptr(), one_split, b, s, hq, hkv, d, p, 2,
        torch.cuda.current_stream().cuda_stream)
    assert code == 0
    ref = fused_ops.block_cross_attention(q.float(), ck.float(), cv.float(), lengths, bk.float(),
                                          bv.float())
    assert float((out.float() - ref).abs().max()) <= 2e-2


@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_confidence_unmask_rows_of_nan_and_inf_give_tokens_in_range(lib, dtype, temperature):
    """twotower_plugins.h: NaN counts as -inf, so an all-NaN or all -inf position predicts the
    mask token with confidence 1 (the definition's answer for -inf) and stays masked; +inf
    logits give a token in range with confidence 0."""
    vocab = 5000
    g = torch.Generator(device="cuda").manual_seed(11)
    logits = torch.randn(4, 16, vocab, generator=g, device="cuda") * 4
    logits[1] = float("nan")
    logits[2] = float("-inf")
    logits[3, ::2] = float("nan")
    logits[3, 1::4] = float("inf")
    logits = logits.to(dtype)
    block = torch.full((4, 16), MASK, dtype=torch.int64, device="cuda")
    block[:, ::5] = 9
    seeds = torch.tensor([4, 5, 6, 7], device="cuda")
    nxt, conf, count = lib.confidence_unmask(logits, block, MASK, 0.05, 3, temperature, seeds, 2,
                                             out=_poisoned(4, 16))
    assert bool(((nxt >= 0) & (nxt < vocab)).all())
    assert not bool(torch.isnan(conf).any())
    as_defined = logits.float().masked_fill(torch.isnan(logits.float()), float("-inf"))
    ref_n, ref_c, ref_count = fused_ops.confidence_unmask(as_defined[:3], block[:3], MASK, 0.05,
                                                          3, temperature, seeds[:3], 2)
    assert torch.equal(nxt[:3], ref_n) and torch.equal(count[:3], ref_count)
    finite = torch.isfinite(ref_c)
    assert torch.equal(finite, torch.isfinite(conf[:3]))
    assert float((conf[:3][finite] - ref_c[finite]).abs().max()) < 1e-5
    assert bool((conf[1:3][block[1:3] == MASK] == 1).all())
    assert torch.equal(nxt[1:3], block[1:3])  # the mask token was predicted: nothing moved
    assert bool((conf[3, 1::4][block[3, 1::4] == MASK] == 0).all())  # +inf: confidence 0


def test_errors_are_reported_by_name(lib):
    logits = torch.randn(1, 4, 64, device="cuda")
    block = torch.full((1, 4), MASK, dtype=torch.int64, device="cuda")
    with pytest.raises(KernelError, match="invalid argument"):
        lib.confidence_unmask(logits, block, 64, 0.5, 2)  # mask token outside the vocabulary
    with pytest.raises(KernelError, match="one seed per row"):
        lib.confidence_unmask(logits, block, MASK, 0.5, 2, temperature=0.7)
    with pytest.raises(KernelError, match="int64"):
        lib.confidence_unmask(logits, block.int(), MASK, 0.5, 2)
    kv = torch.randn(1, 2, 8, 64, device="cuda", dtype=torch.float16)
    blk = kv[:, :, :4].contiguous()
    q = torch.randn(4 * 2 * 64 + 1, device="cuda", dtype=torch.float16)[1:].view(1, 4, 2, 64)
    with pytest.raises(KernelError, match="misaligned"):  # q 2 bytes past a 4-byte boundary
        lib.block_cross_attention(q, kv, kv, torch.tensor([8], device="cuda"), blk, blk)
    q = torch.randn(1, 4, 2, 48, device="cuda", dtype=torch.float16)
    kv = torch.randn(1, 2, 8, 48, device="cuda", dtype=torch.float16)
    with pytest.raises(KernelError, match="head size 48"):
        blk = kv[:, :, :4].contiguous()
        lib.block_cross_attention(q, kv, kv, torch.tensor([8], device="cuda"), blk, blk)
