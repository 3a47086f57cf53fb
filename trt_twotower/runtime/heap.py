"""What a long-lived decoding process asks of its heap: its set-up out of the cycle collector's
way, and the memory its steps free kept for the next step.

Cycle collector.

A serving process keeps its model, executors, slot pools and every import for its whole life,
and CPython's full (generation 2) collection walks all of them each time it runs, stalling
every stream the process serves. Measured on the built-in model's server under 16 clients:
in the orchestrator process one full collection every 7–21 s of load, taking 70–74 ms (a
forced one in a process with its imports: 51–57 ms, under 0.1 ms once frozen); 185–290 ms in
the benchmark's process, which holds the in-process engine and the gRPC clients. Freezing what
exists once a process is set up moves it to the permanent generation, so later collections
walk only what requests create.

Freed memory. Every step allocates and frees the same buffers (activations, logits) of a few
MiB. glibc gives memory at the top of its heap back to the system once more than its trim
threshold is free, and maps blocks over its mmap threshold on their own, so each step's
buffers came back as fresh pages: 25–34 page faults per output token on the built-in model
under 64 AR clients, each page zeroed again. Fixed thresholds (mmap 32 MiB, glibc's own
ceiling for its sliding one; trim 32 MiB) keep those pages: faults 0–0.4 per token, AR
tokens/s +20–30 % in process and peak RSS unchanged (417 MiB either way); diffusion, whose
steps already reused their memory, unchanged (measured 2026-12-01, one process per setting).
A larger trim threshold keeps more of a busy moment's memory for good: at 128 MiB the served
towers' RSS grew 10 % over the soak test's 320 requests after warm-up (the limit is 10 %);
at 32 MiB 2–6 %, with glibc's defaults 3–4 %.
"""

from __future__ import annotations

import ctypes
import gc
import os


def freeze_long_lived() -> int:
    """Collect the set-up's garbage once, then freeze every surviving object; returns the
    number of objects frozen so far. Call it once the long-lived objects exist, never while
    short-lived ones are up: a frozen cycle is never freed."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 32 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # glibc's malloc.h


def keep_freed_memory() -> bool:
    """Keep the memory decoding steps free for the next ones (fixed glibc malloc thresholds);
    returns False where the C library is not glibc (nothing changed) or glibc refused a value.
    Process-wide: called by the processes this project owns (the CLI's decoding and benchmark
    commands, the Triton models), never on import."""
    names = getattr(os, "confstr_names", {})
    if "CS_GNU_LIBC_VERSION" not in names or not os.confstr("CS_GNU_LIBC_VERSION"):
        return False   # the option numbers above are glibc's
    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
