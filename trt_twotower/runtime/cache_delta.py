"""A sequence's cache delta: what a copy of the context tower's cache on another device or in
another process needs after a context step — the keys and values of the positions just written
and the Mamba states, never the prefix again (architecture: the per-block handoff).

The delta is one flat byte buffer (a header of the old and new lengths, then each tensor's
bytes in the cache's name order), so it crosses a process boundary as one tensor; both ends
know the shapes from the configuration.
"""

from __future__ import annotations

import numpy as np
import torch

from .cache import StepCache

HEADER_BYTES = 16


class DeltaError(ValueError):
    """A delta that does not continue the copy it is applied to."""


def _as_bytes(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().contiguous().cpu().view(torch.uint8).reshape(-1).numpy()


def pack_delta(cache: StepCache, row: int, old_length: int) -> np.ndarray:
    """The delta of ``row`` since it held ``old_length`` positions, as uint8 [N]."""
    new_length = int(cache.lengths[row])
    parts = [np.array([old_length, new_length], dtype=np.int64).view(np.uint8)]
    parts += [_as_bytes(cache.tensors[n][row, :, old_length:new_length])
              for n in cache.kv_names()]
    parts += [_as_bytes(cache.tensors[n][row]) for n in cache.mamba_names()]
    return np.concatenate(parts)


def delta_span(buffer: np.ndarray) -> tuple[int, int]:
    """(old length, new length) of a delta."""
    if buffer.dtype != np.uint8 or buffer.size < HEADER_BYTES:
        raise DeltaError(f"a cache delta is a uint8 buffer of at least {HEADER_BYTES} bytes")
    old, new = (int(v) for v in buffer[:HEADER_BYTES].view(np.int64))
    return old, new


def apply_delta(cache: StepCache, row: int, buffer: np.ndarray) -> None:
    """Write a delta into ``row`` of a copy that holds exactly the delta's old length."""
    old, new = delta_span(buffer)
    held = int(cache.lengths[row])
    if old != held or not old <= new <= cache.max_context:
        raise DeltaError(f"the delta covers positions [{old}, {new}) but the copy holds {held} "
                         f"of at most {cache.max_context}")
    offset = HEADER_BYTES
    targets = ([cache.tensors[n][row, :, old:new] for n in cache.kv_names()] +
               [cache.tensors[n][row] for n in cache.mamba_names()])
    for target in targets:
        size = target.numel() * target.element_size()
        if offset + size > buffer.size:
            raise DeltaError(f"the delta ends at byte {buffer.size}, short of its tensors")
        piece = torch.from_numpy(buffer[offset:offset + size].copy())
        target.copy_(piece.view(target.dtype).reshape(target.shape))
        offset += size
    if offset != buffer.size:
        raise DeltaError(f"the delta has {buffer.size - offset} bytes past its tensors")
    cache.lengths[row] = new
