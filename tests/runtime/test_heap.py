"""The set-up frozen out of full collections, its garbage collected first; freed step
memory kept for the next step."""

import gc
import os
import subprocess
import sys
import weakref

import pytest

from trt_twotower.runtime.heap import freeze_long_lived


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cycle collector frees it


@pytest.fixture
def thawed():
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_freezing_collects_the_set_ups_garbage_first(thawed):
    """Garbage frozen would never be freed: it is collected before the freeze."""
    dropped = _Node()
    gone = weakref.ref(dropped)
    del dropped
    freeze_long_lived()
    assert gone() is None, "a dropped cycle was frozen instead of collected"


def test_the_set_up_is_frozen_and_later_garbage_still_collected(thawed):
    kept = [_Node() for _ in range(1000)]
    before = gc.get_freeze_count()
    count = freeze_long_lived()
    # frozen objects that die by reference count leave the count: it may drop, never below
    # what the set-up still holds
    assert count >= before + len(kept) and gc.get_freeze_count() >= before + len(kept)
    late = _Node()
    gone = weakref.ref(late)
    del late
    gc.collect()
    assert gone() is None, "garbage made after the freeze must still be collected"
    assert len(kept) == 1000


_KEPT = """
import ctypes, resource, statistics, sys, torch
from trt_twotower.runtime.heap import keep_freed_memory

class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(name, ctypes.c_size_t) for name in "arena ordblks smblks hblks hblkhd "
                "usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def a_step():  # buffers alive together, written, then all freed: what a decoding step does
    buffers = [torch.empty(4 << 20, dtype=torch.uint8) for _ in range(6)]
    for buffer in buffers:
        buffer.fill_(1)

def faults(step):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

applied = keep_freed_memory() if sys.argv[1] == "keep" else None
mapped = libc.mallinfo2().hblkhd
block = torch.empty(24 << 20, dtype=torch.uint8).fill_(1)
mapped_for_block = libc.mallinfo2().hblkhd - mapped
del block
free_in_heap = libc.mallinfo2().fordblks
for _ in range(10):
    a_step()
per_step = statistics.median(faults(a_step) for _ in range(50))
print(applied, mapped_for_block >> 20, free_in_heap >> 20, per_step)
"""


def _heap(keep: bool) -> tuple[str, int, int, float]:
    out = subprocess.run([sys.executable, "-c", _KEPT, "keep" if keep else "defaults"],
                         capture_output=True, text=True, check=True, timeout=120).stdout.split()
    return out[0], int(out[1]), int(out[2]), float(out[3])


def _glibc_version() -> tuple[int, ...]:
    names = getattr(os, "confstr_names", {})
    if "CS_GNU_LIBC_VERSION" not in names:
        return ()
    return tuple(int(part) for part in os.confstr("CS_GNU_LIBC_VERSION").split()[1].split("."))


@pytest.mark.skipif(_glibc_version() < (2, 33), reason="needs glibc's malloc with mallinfo2 "
                                                       "(glibc 2.33 or newer)")
def test_freed_step_memory_stays_in_the_heap_for_the_next_step():
    """In fresh processes (the setting is process-wide). glibc's defaults map a first 24 MiB
    buffer on its own and unmap it when freed; kept, it comes from the heap and stays there,
    free, once freed. Steps of six 4 MiB buffers then fault in nothing (median of 50 steps;
    under the defaults they fault 0 to 6100 pages a step, varying from process to process,
    measured)."""
    applied, mapped, kept, per_step = _heap(keep=True)
    assert applied == "True", "keep_freed_memory() found no glibc mallopt on this Linux machine"
    assert mapped == 0, f"a 24 MiB buffer was mapped on its own ({mapped} MiB)"
    assert kept >= 24, f"only {kept} MiB stayed free in the heap"
    assert per_step == 0, f"{per_step} page faults per step with freed memory kept"
    _, mapped_by_default, kept_by_default, _ = _heap(keep=False)
    assert mapped_by_default >= 24 and kept_by_default < 24, \
        "glibc's defaults changed: this test no longer shows what keeping changes"
