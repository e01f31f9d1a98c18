"""A width config in the terms Torch-Pruning takes.

Two ways to use it, both in the file ``searcher export --format torch-pruning`` writes:

- ``pruning_ratio_dict`` (keyed by MLP module name) with ``ignored_layers`` for Torch-Pruning's
  pruners (``MetaPruner`` and kin): every MLP gets its searched width, and Torch-Pruning's own
  importance picks the neurons. Attention stays out of it: Torch-Pruning's dependency graph
  cannot trace rotary attention as transformers 5 writes it (the index mapping through
  ``rotate_half``'s slices and concatenation never closes, so building the group of a q/k/v
  projection does not finish), and for grouped-query attention its head pruning removes query
  heads inside every KV group rather than whole KV groups, which is what the search priced.
  The attention part is therefore given as channel indices (``attention_channels``), removed
  with Torch-Pruning's functional pruners.
- ``channels``: every removed channel by index (``out``: rows of q/k/v, gate and up
  projections; ``in``: columns of o and down projections): applied with
  ``tp.prune_linear_out_channels`` / ``tp.prune_linear_in_channels`` it gives exactly the model
  the search scored.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from searcher.errors import SearcherError

FORMAT = "searcher-torch-pruning/1"


def ratio_for(total: int, kept: int) -> float:
    """The pruning ratio for which Torch-Pruning keeps exactly ``kept`` of ``total`` channels
    (it keeps ``int(total * (1 - ratio))``, so float rounding must not drop one)."""
    ratio = (total - kept) / total
    while int(total * (1 - ratio)) < kept:
        ratio = math.nextafter(ratio, -math.inf)
    return ratio


def refuse_unless_width(config: dict[str, Any]) -> None:
    space = config["space"]["name"]
    if space != "width":
        other = "llmcompressor" if space == "sparsity" else "pruned"
        raise SearcherError(
            f"Torch-Pruning removes channels: it takes width configs, not {space} ones "
            f"(try --format {other})"
        )


def spec(config: dict[str, Any], head_dim: int, group_size: int, intermediate: int,
         kv_heads: int) -> dict[str, Any]:  # fmt: skip
    """The Torch-Pruning spec of a width config (see the module docstring)."""
    refuse_unless_width(config)
    ratios: dict[str, float] = {}
    ignored = ["lm_head"]
    out: dict[str, list[int]] = {}
    into: dict[str, list[int]] = {}
    for name, detail in config["config"].items():
        if name.endswith(".mlp"):
            kept = set(detail["kept_neurons"])
            gone = [i for i in range(intermediate) if i not in kept]
            ratios[name] = ratio_for(intermediate, len(kept))
            ignored.append(f"{name}.down_proj")
            for proj in ("gate_proj", "up_proj"):
                out[f"{name}.{proj}"] = gone
            into[f"{name}.down_proj"] = gone
        else:
            kept = set(detail["kept_kv_groups"])
            groups = [g for g in range(kv_heads) if g not in kept]
            q = [c for g in groups for c in range(g * group_size * head_dim,
                                                  (g + 1) * group_size * head_dim)]  # fmt: skip
            kv = [c for g in groups for c in range(g * head_dim, (g + 1) * head_dim)]
            ignored += [f"{name}.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
            out.update({f"{name}.q_proj": q, f"{name}.k_proj": kv, f"{name}.v_proj": kv})
            into[f"{name}.o_proj"] = q
    attention = {
        "out": {k: v for k, v in out.items() if ".self_attn." in k and v},
        "in": {k: v for k, v in into.items() if ".self_attn." in k and v},
    }
    return {
        "format": FORMAT,
        "model": config["model"],
        "space": config["space"],
        "costs": config.get("costs"),
        "fractions": config.get("fractions"),
        "pruning_ratio_dict": ratios,
        "ignored_layers": ignored,
        "attention_channels": attention,
        "channels": {
            "out": {k: v for k, v in out.items() if v},
            "in": {k: v for k, v in into.items() if v},
        },
    }


def prune_channels(model: nn.Module, channels: dict[str, dict[str, list[int]]]) -> nn.Module:
    """Remove ``channels`` (a spec's ``channels`` or ``attention_channels``) from ``model`` in
    place with Torch-Pruning's functional pruners."""
    import torch_pruning as tp

    for name, idxs in channels["out"].items():
        tp.prune_linear_out_channels(model.get_submodule(name), idxs)
    for name, idxs in channels["in"].items():
        tp.prune_linear_in_channels(model.get_submodule(name), idxs)
    return model
