"""Keep freed memory for reuse on Linux, instead of giving it back to the kernel.

glibc serves an allocation above its mmap threshold (at most 32 MB) with fresh pages from the
kernel and unmaps them on free, so every large temporary MLX makes (logits, activations,
gradients) faults in each of its pages again: 12,673 faults and about 25 ms for a 52 MB array on
our 2-core machine, 8x the cost of the arithmetic that fills it (scripts/bench_kernels.py).
Raising the mmap and trim thresholds with ``mallopt`` makes glibc serve them from its heap and
keep freed blocks there. The process then holds its peak until it exits, which a training run
does anyway.

``NRT_MLX_MALLOC=system`` leaves glibc's defaults. macOS and other C libraries are untouched.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_MMAP_THRESHOLD = 1 << 30  # allocations below 1 GB come from the heap
_TRIM_THRESHOLD = (1 << 31) - 1  # never trim the heap's top

_kept: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's thresholds once per process; True when they are set."""
    global _kept
    if _kept is None:
        _kept = False
        if sys.platform == "linux" and os.environ.get("NRT_MLX_MALLOC", "") != "system":
            try:
                libc = ctypes.CDLL("libc.so.6")
                _kept = bool(
                    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
                    and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
                )
            except (OSError, AttributeError):  # not glibc (musl has no mallopt)
                _kept = False
    return _kept
