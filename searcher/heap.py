"""Freed tensor memory goes back to the operating system (glibc only).

glibc serves an allocation from its heap, not from a fresh mapping, once it is below the
"mmap threshold", and it raises that threshold to the size of each large block freed. Then
the per-window buffers of scoring (tens of MB on a large vocabulary) land in the heap, and
what the heap keeps after they are freed depends on timing: the same search peaked at 2.49
to 3.21 GB on a 1.71 GB model (benchmarks/memory.py). A fixed threshold of 16 MB keeps
the peak at its low end and leaves the small activations in the heap, where they are fast
(a 1 MB threshold cost 30% of a forward pass on this machine; 16 MB cost nothing
measurable).
"""

from __future__ import annotations

import ctypes
import platform

_M_MMAP_THRESHOLD = -3
THRESHOLD = 16 << 20


def return_large_buffers(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; False where libc is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False
