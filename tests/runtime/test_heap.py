"""The set-up frozen out of full collections, its garbage collected first."""

import gc
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
