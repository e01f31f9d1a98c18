"""Search spaces: what can be removed from each layer, how to apply it, what it costs.

Adding a space is one module here and one entry in ``SPACES``; algorithms never change.
"""

from __future__ import annotations

from typing import Any

import torch

from searcher.errors import SearcherError
from spaces.base import Gene, SearchSpace
from spaces.depth import DepthSpace
from spaces.sparsity import SparsitySpace
from spaces.structure import Structure
from spaces.width import WidthSpace

SPACES: dict[str, type[SearchSpace]] = {
    "width": WidthSpace,
    "depth": DepthSpace,
    "sparsity": SparsitySpace,
}


def build(
    name: str,
    structure: Structure,
    seq_len: int,
    windows: torch.Tensor,
    batch_size: int = 4,
    options: dict[str, Any] | None = None,
) -> SearchSpace:
    """Build a space over a resident model; ``windows`` are calibration tokens for scoring."""
    if name not in SPACES:
        raise SearcherError(f"unknown space {name!r}: choose one of {', '.join(SPACES)}")
    opts = dict(options or {})
    try:
        return SPACES[name](structure, seq_len, windows, batch_size=batch_size, **opts)
    except (TypeError, ValueError) as exc:
        raise SearcherError(f"bad options for the {name} space {opts}: {exc}") from None


__all__ = ["SPACES", "Gene", "SearchSpace", "Structure", "build"]
