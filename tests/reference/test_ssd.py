"""The chunked SSD scan and the single step compute the sequential recurrence (spec §2.3)."""

import pytest
import torch

from trt_twotower.reference.ssd import ssd_chunked, ssd_sequential, ssd_step

TOL = 1e-5  # fp32, relative to the largest output magnitude


def _inputs(gen, b=2, length=13, heads=4, p=3, groups=2, n=5, state_scale=1.0):
    x = torch.randn(b, length, heads, p, generator=gen)
    dt = torch.nn.functional.softplus(torch.randn(b, length, heads, generator=gen))
    A = -torch.exp(torch.randn(heads, generator=gen))
    B = torch.randn(b, length, groups, n, generator=gen)
    C = torch.randn(b, length, groups, n, generator=gen)
    D = torch.randn(heads, generator=gen)
    state = torch.randn(b, heads, p, n, generator=gen) * state_scale
    return x, dt, A, B, C, D, state


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("length,chunk", [(1, 4), (4, 4), (13, 4), (13, 5), (7, 16), (32, 8)])
def test_chunked_scan_matches_sequential_recurrence(rng, length, chunk):
    args = _inputs(rng, length=length)
    y_ref, s_ref = ssd_sequential(*args)
    y, s = ssd_chunked(*args, chunk_size=chunk)
    assert _rel(y, y_ref) < TOL and _rel(s, s_ref) < TOL


def test_chunked_scan_with_large_seeded_state_stays_finite_and_exact(rng):
    """Seeded states of O(1e3) (spec §7.4) must neither overflow nor lose the recurrence."""
    args = _inputs(rng, length=16, state_scale=1e3)
    y_ref, s_ref = ssd_sequential(*args)
    y, s = ssd_chunked(*args, chunk_size=4)
    assert torch.isfinite(y).all()
    assert _rel(y, y_ref) < TOL and _rel(s, s_ref) < TOL


def test_prefix_scan_then_seeded_block_equals_one_full_scan(rng):
    """The denoiser's seeded block scan premise (spec §7.3)."""
    x, dt, A, B, C, D, state = _inputs(rng, length=21)
    y_full, s_full = ssd_chunked(x, dt, A, B, C, D, state, chunk_size=4)
    y1, s1 = ssd_chunked(x[:, :13], dt[:, :13], A, B[:, :13], C[:, :13], D, state, chunk_size=4)
    y2, s2 = ssd_chunked(x[:, 13:], dt[:, 13:], A, B[:, 13:], C[:, 13:], D, s1, chunk_size=4)
    assert _rel(torch.cat([y1, y2], 1), y_full) < TOL and _rel(s2, s_full) < TOL


def test_step_uses_group_of_each_head(rng):
    """Head h reads group h // (H/G): swapping the groups' B must change exactly those heads."""
    x, dt, A, B, C, D, state = _inputs(rng, length=1)
    y, _ = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, state)
    y_swapped, _ = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0].flip(1), C[:, 0], D, state)
    changed = (y - y_swapped).abs().amax(dim=(0, 2)) > 1e-6
    assert changed.all()  # every head reads B, so both groups' heads change
    y_same_group, _ = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, state)
    assert torch.equal(y, y_same_group)
