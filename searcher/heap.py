"""Freed tensor memory goes back to the operating system (glibc only).

glibc serves an allocation from its heap, not from a fresh mapping, once it is below the
"mmap threshold", and it raises that threshold to the size of each large block freed. Then
the per-window buffers of scoring (tens of MB on a large vocabulary) land in the heap, and
what the heap keeps after they are freed depends on timing: the same search peaked at 2.49
to 3.21 GB on a 1.71 GB model (benchmarks/memory.py). A fixed threshold of 16 MB keeps
the peak at its low end and leaves the small activations in the heap, where they are fast
(a 1 MB threshold cost 30% of a forward pass on this machine; 16 MB cost nothing
measurable).

Below the threshold, freed blocks stay in the heap: glibc returns only free memory at its
top, and any small live allocation above (a tensor's header, a kept result) pins the rest.
A loop that allocates a few MB per step and keeps a little of each (the sparsity space
ranking weight after weight) grows the heap by tens of MB a step: 0.75 GB over the 168
weights of benchmarks/memory.py's model, as much as its bfloat16 weights' linear layers.
``release_free`` hands every free page of the heap back (``malloc_trim``) after each step.
"""

from __future__ import annotations

import ctypes
import functools
import platform
from typing import Any

_M_MMAP_THRESHOLD = -3
THRESHOLD = 16 << 20


@functools.cache
def _glibc() -> Any:
    """This process's glibc, or None."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def return_large_buffers(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; False where libc is not glibc."""
    libc = _glibc()
    try:
        return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except AttributeError:
        return False


def release_free() -> bool:
    """Return the heap's free pages to the system, wherever they lie in it (glibc's
    ``malloc_trim(0)``; a few milliseconds for a heap of a few hundred MB); False where
    libc is not glibc or nothing was released."""
    libc = _glibc()
    try:
        return libc is not None and bool(libc.malloc_trim(0))
    except AttributeError:
        return False
