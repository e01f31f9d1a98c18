"""searcher.heap: freed memory below the mmap threshold goes back to the system."""

from __future__ import annotations

import platform

import pytest
import torch

from searcher.heap import release_free, return_large_buffers

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")


def resident_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


@glibc
def test_release_free_returns_the_heap_pages_a_small_live_allocation_pinned() -> None:
    """Blocks below the mmap threshold, freed under a small live allocation, stay resident
    until ``release_free``; it hands back at least most of them."""
    assert return_large_buffers()
    blocks, pins = [], []
    for _ in range(64):  # 64 x 2 MB, each followed by 256 kB that stays
        blocks.append(torch.ones(1 << 19))
        pins.append(torch.ones(1 << 16))
    held = resident_mb()
    del blocks
    freed = resident_mb()
    assert freed > held - 64  # the heap kept (most of) the freed 128 MB
    assert release_free()
    assert resident_mb() < freed - 64
    assert len(pins) == 64
