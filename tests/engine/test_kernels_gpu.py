"""The CUDA kernels against their torch definitions (GPU hosts with the compiled library).

Run there:  bash build_scripts/build_plugins.sh && pytest -m gpu tests/engine/test_kernels_gpu.py
The full grid and the benchmarks are in bench/kernels.py.
"""

import pytest
import torch

from trt_twotower import fused_ops
from trt_twotower.engine.kernel_library import KernelError, KernelLibrary, library_path

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or not library_path().is_file(),
                       reason="needs a CUDA GPU and the compiled plugin library "
                              "(build_scripts/build_plugins.sh)"),
]
MASK = 3


@pytest.fixture(scope="module")
def lib():
    return KernelLibrary()


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("b,s,p,hq,hkv,d", [(1, 16, 0, 4, 2, 16), (3, 8, 300, 32, 2, 128),
                                             (2, 16, 2000, 8, 8, 64)])
def test_block_cross_attention_matches_definition(lib, dtype, tol, b, s, p, hq, hkv, d):
    g = torch.Generator(device="cuda").manual_seed(p)
    r = lambda *shape: torch.randn(*shape, generator=g, device="cuda").to(dtype)  # noqa: E731
    q, ck, cv = r(b, s, hq, d), r(b, hkv, max(p, 1), d), r(b, hkv, max(p, 1), d)
    bk, bv = r(b, hkv, s, d), r(b, hkv, s, d)
    lengths = torch.tensor([p - i * (p // 3) for i in range(b)], device="cuda")
    out = torch.full_like(q, float("nan"))
    lib.block_cross_attention(q, ck, cv, lengths, bk, bv, out=out)
    ref = fused_ops.block_cross_attention(q.float(), ck.float(), cv.float(), lengths, bk.float(),
                                          bv.float())
    assert torch.isfinite(out).all() and float((out.float() - ref).abs().max()) <= tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_confidence_unmask_matches_policy(lib, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(4, 16, 131072, generator=g, device="cuda") * 4).to(dtype)
    block = torch.full((4, 16), MASK, dtype=torch.int64, device="cuda")
    block[:, ::4] = 9
    for steps_left in (5, 1):
        nxt, conf, count = lib.confidence_unmask(logits, block, MASK, 0.05, steps_left)
        ref_n, ref_c, ref_count = fused_ops.confidence_unmask(logits.float(), block, MASK, 0.05,
                                                              steps_left)
        assert torch.equal(nxt, ref_n) and torch.equal(count, ref_count)
        finite = torch.isfinite(ref_c)
        assert torch.equal(finite, torch.isfinite(conf))
        assert float((conf[finite] - ref_c[finite]).abs().max()) < 1e-5


def test_errors_are_reported_by_name(lib):
    logits = torch.randn(1, 4, 64, device="cuda")
    block = torch.full((1, 4), MASK, dtype=torch.int64, device="cuda")
    with pytest.raises(KernelError, match="unsupported"):
        lib.confidence_unmask(logits, block, MASK, 0.5, 2, temperature=0.7)
    with pytest.raises(KernelError, match="invalid argument"):
        lib.confidence_unmask(logits, block, MASK, 0.5, 0)
