"""Search spaces: what can be removed from each layer, how to apply it, what it costs.

Adding a space is one module here and one entry in ``SPACES``; algorithms never change.
"""

from __future__ import annotations

import inspect
import math
import typing
from typing import Any

import torch

from searcher.errors import SearcherError
from spaces.base import Gene, SearchSpace
from spaces.depth import DepthSpace
from spaces.experts import ExpertsSpace
from spaces.joint import JointSpace
from spaces.moe import MoeSpace
from spaces.sparsity import SparsitySpace
from spaces.structure import Structure
from spaces.width import WidthSpace

SPACES: dict[str, type[SearchSpace]] = {
    "width": WidthSpace,
    "depth": DepthSpace,
    "sparsity": SparsitySpace,
    "joint": JointSpace,
    "experts": ExpertsSpace,
    "moe": MoeSpace,
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
    opts = check_options(name, options)
    try:
        return SPACES[name](structure, seq_len, windows, batch_size=batch_size, **opts)
    except (TypeError, ValueError) as exc:
        raise SearcherError(f"bad options for the {name} space {opts}: {exc}") from None


__all__ = ["SPACES", "Gene", "SearchSpace", "Structure", "build"]


# constructor arguments that are not options a user sets
_BUILT_IN = {"self", "structure", "seq_len", "windows", "batch_size"}


def check_options(name: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """The space's name and its options' names and types, checked before any model loads
    (ranges are the space's own business)."""
    if name not in SPACES:
        raise SearcherError(f"unknown space {name!r}: choose one of {', '.join(SPACES)}")
    opts = dict(options or {})
    init = SPACES[name].__init__
    hints = typing.get_type_hints(init)
    known = [p for p in inspect.signature(init).parameters if p not in _BUILT_IN]
    for key, value in opts.items():
        if key not in known:
            raise SearcherError(
                f"unknown option {key!r} for the {name} space: it takes "
                f"{', '.join(known) or 'no options'}"
            )
        kind = hints.get(key)
        whole = isinstance(value, int) and not isinstance(value, bool)
        ok = {
            int: whole,
            float: whole or isinstance(value, float) and math.isfinite(value),
            bool: isinstance(value, bool),
        }.get(kind, True)
        if not ok:
            what = {int: "a whole number", float: "a finite number", bool: "true or false"}[kind]
            raise SearcherError(f"{name} space option {key} = {value!r} should be {what}")
    return opts
