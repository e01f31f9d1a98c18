"""Layout-free parts the families' lean converters share (``Family.lean`` in
``searcher.families``): reading a norm, an activation, a config's head sizes. None of these
knows a family's module names; each family reads its own modules and hands them in.

A pruned model keeps its Hugging Face classes but its weights may have fewer rows / columns
than the config says, layer by layer: converters take shapes from the weights, never from the
config (except head_dim and the query heads per KV head, which pruning whole KV groups keeps).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from latency_models.graph import ACTIVATIONS
from searcher.errors import SearcherError


def live(module: nn.Module | None, name: str) -> bool:
    """Whether ``module.name`` is a projection with weights: not a dropped block (a module
    without parameters in its place) and not cut to zero rows."""
    w = getattr(getattr(module, name, None), "weight", None)
    return isinstance(w, torch.Tensor) and w.numel() > 0


def activation(name: str, family: str) -> str:
    """``name`` (a Hugging Face activation) if the lean graph computes it; else a one-line
    refusal naming ``family``."""
    if name not in ACTIVATIONS:
        raise SearcherError(f"the lean graph has no {name!r} activation for {family}")
    return name


def head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def group_size(cfg: Any) -> int:
    """Query heads per KV head: unchanged by pruning, which removes whole groups."""
    return cfg.num_attention_heads // (getattr(cfg, "num_key_value_heads", None) or 1)


def rotary_dims(cfg: Any, head: int) -> int | None:
    """Rotated dims of each head for ``Style.rotary_dims``: None where the rotary covers the
    whole head, else its ``partial_rotary_factor`` share (kept in ``rope_parameters``)."""
    factor = (getattr(cfg, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    return None if factor == 1.0 else int(head * factor)


def layer_norm(ln: nn.LayerNorm, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A LayerNorm's weight and bias (ones and zeros where it has no affine part)."""
    w, b = ln.weight, ln.bias
    dtype = torch.get_default_dtype() if w is None else w.dtype
    w = torch.ones(hidden, dtype=dtype) if w is None else w
    b = torch.zeros(hidden, dtype=dtype) if b is None else b
    return w, b


def embed_scale(embed: nn.Module) -> float:
    """A scaled embedding's factor as its forward applies it (Gemma's sqrt(hidden), kept as
    ``embed_scale``), rounded to the model's dtype."""
    return float(embed.embed_scale.to(embed.weight.dtype))


def no_bidirectional(cfg: Any, family: str) -> None:
    """Refuse a config whose attention looks both ways (the lean graph is causal)."""
    if getattr(cfg, "use_bidirectional_attention", False):
        raise SearcherError(f"the lean graph is causal; this {family} attends both ways")


def sliding_window(cfg: Any, i: int) -> int | None:
    """Layer ``i``'s sliding window where the config's ``layer_types`` makes it a sliding
    layer, else None."""
    types = getattr(cfg, "layer_types", None)
    return cfg.sliding_window if types is not None and types[i] == "sliding_attention" else None
