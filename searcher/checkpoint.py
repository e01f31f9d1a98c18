"""The model's weights in process memory once, and their dense values read back from disk.

Two things keep a search at about one copy of the weights:

- ``own_weights``: transformers memory-maps a safetensors checkpoint and leaves the loaded
  weights as views of that mapping. Pages of a mapping that were read count in the process's
  resident memory, and they stay counted for as long as any weight still points into the
  file, so a space that replaces the weights it prunes (the width space's ranked copies) or
  writes into them (the sparsity space's masks, copy-on-write) would hold the file's pages
  beside its own. Each mapped weight is copied into process memory instead, and its file
  pages released at once, so the peak is one copy plus the tensor being copied.
- ``CheckpointTensors``: a tensor as the checkpoint stores it, read with ``pread`` (no
  mapping: the page cache is not the process's memory), so the sparsity space can restore
  dense values without keeping a dense copy. A space uses it only for tensors it has checked
  equal to the loaded weights.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

_MADV_DONTNEED = 4  # Linux


def own_weights(model: nn.Module) -> int:
    """Copy every weight that lives in a memory-mapped file into process memory and release
    its file pages; returns how many were copied (0 where this is not Linux)."""
    ranges = _mapped_files()
    if not ranges:
        return 0
    madvise = _madvise()
    copied = 0
    with torch.no_grad():
        for t in _tensors(model):
            storage = t.untyped_storage()
            start = storage.data_ptr()
            if t.device.type != "cpu" or not any(a <= start < b for a, b in ranges):
                continue
            t.data = t.detach().clone()
            # Only pages wholly inside this tensor's storage: neighbours may have been written
            # to (a private mapping's written pages would go back to the file's bytes).
            lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
            hi = (start + storage.nbytes()) // mmap.PAGESIZE * mmap.PAGESIZE
            if madvise is not None and hi > lo:
                madvise(lo, hi - lo, _MADV_DONTNEED)
            copied += 1
    return copied


def _tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Each parameter and buffer once (tied weights are one tensor)."""
    seen: set[int] = set()
    for module in model.modules():
        found = [*module._parameters.values(), *module._buffers.values()]
        for t in found:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                yield t


def _mapped_files() -> list[tuple[int, int]]:
    """Address ranges of the safetensors files mapped into this process (Linux only)."""
    maps = Path("/proc/self/maps")
    if not sys.platform.startswith("linux") or not maps.is_file():
        return []
    out = []
    for line in maps.read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].endswith(".safetensors"):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi))
    return out


def _madvise():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


class CheckpointTensors:
    """Tensors of a model's safetensors checkpoint by name, read from disk on demand."""

    def __init__(self, files: dict[str, Path]) -> None:
        from safetensors import safe_open

        self._open = {
            f: safe_open(str(f), framework="pt", backend="pread") for f in set(files.values())
        }
        self._where = files

    @classmethod
    def of(cls, model: nn.Module) -> CheckpointTensors | None:
        """The checkpoint ``model`` was loaded from, if it is a local safetensors one."""
        source = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
        root = Path(source) if source else None
        if root is None or not root.is_dir():
            return None
        try:
            index = root / "model.safetensors.index.json"
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                files = {k: root / v for k, v in weight_map.items()}
            elif (root / "model.safetensors").is_file():
                from safetensors import safe_open

                single = root / "model.safetensors"
                with safe_open(str(single), framework="pt", backend="pread") as f:
                    files = dict.fromkeys(f.keys(), single)
            else:
                return None
            return cls(files)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.debug("no dense values from %s: %s", root, exc)
            return None

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def read(self, name: str) -> torch.Tensor:
        """The tensor as stored (dtype and layout), in fresh CPU memory."""
        return self._open[self._where[name]].get_tensor(name)
