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


def spec(config: dict[str, Any], structure: Any) -> dict[str, Any]:
    """The Torch-Pruning spec of a width config (see the module docstring); ``structure`` is
    the dense model's ``spaces.Structure``, whose family says which channels a unit owns."""
    refuse_unless_width(config)
    blocks = {
        layer.name(block.name): (layer, block)
        for layer in structure.layers
        for block in (layer.attn, layer.mlp)
    }
    ratios: dict[str, float] = {}
    ignored = ["lm_head"]
    out: dict[str, list[int]] = {}
    into: dict[str, list[int]] = {}
    attention: dict[str, dict[str, list[int]]] = {"out": {}, "in": {}}
    for name, detail in config["config"].items():
        layer, block = blocks[name]
        key = "kept_kv_groups" if block.kind == "attn" else "kept_neurons"
        kept = set(detail[key])
        gone = [u for u in range(block.units) if u not in kept]
        channels = _channels(layer, block, gone, structure.family.name)
        if block.kind == "mlp":
            ratios[name] = ratio_for(block.units, len(kept))
            ignored.append(layer.name(block.score))
        else:
            ignored += [m for side in channels.values() for m in side]
            for side, by_module in channels.items():
                attention[side].update({m: c for m, c in by_module.items() if c})
        out.update(channels["out"])
        into.update(channels["in"])
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


def _channels(layer: Any, block: Any, gone: list[int], family: str) -> dict[str, dict]:
    """The output channels (``out``) and input channels (``in``) of each nn.Linear that the
    ``gone`` units own."""
    found: dict[str, dict[str, list[int]]] = {"out": {}, "in": {}}
    for slab in block.slabs:
        owner, _, param = slab.tensor.rpartition(".")
        module = layer.module.get_submodule(owner)
        if param == "bias" and isinstance(module, nn.Linear):
            continue  # Torch-Pruning cuts a linear's bias with its output channels
        if param != "weight" or not isinstance(module, nn.Linear):
            raise SearcherError(
                f"Torch-Pruning's functional pruners take nn.Linear channels, and a {family} "
                f"model's units also live in {slab.tensor} ({type(module).__name__}): export "
                "--format pruned instead"
            )
        side = "out" if slab.axis == 0 else "in"
        found[side][layer.name(owner)] = slab.indices(gone).tolist()
    return found


def prune_channels(model: nn.Module, channels: dict[str, dict[str, list[int]]]) -> nn.Module:
    """Remove ``channels`` (a spec's ``channels`` or ``attention_channels``) from ``model`` in
    place with Torch-Pruning's functional pruners."""
    import torch_pruning as tp

    for name, idxs in channels["out"].items():
        tp.prune_linear_out_channels(model.get_submodule(name), idxs)
    for name, idxs in channels["in"].items():
        tp.prune_linear_in_channels(model.get_submodule(name), idxs)
    return model
