"""A width config as Torch-Pruning's functional pruners take it: exactly the searched model.

The file ``searcher export --format torch-pruning`` writes names, for every nn.Linear the
search cut, the channels the removed units own (``channels.out``: rows of q/k/v, gate and up
projections, fused or interleaved as the family lays them out; ``channels.in``: columns of
the o and down projections), and the module attributes some families size their forward
pass by (``attributes``: OPT's and Falcon's head counts, Phi-3's per-layer copy of its
config). Removing the channels with ``tp.prune_linear_out_channels`` /
``tp.prune_linear_in_channels`` from the dense model (``model_path``, ``dtype``) and setting
the attributes gives the model the search scored: the same kept neurons and KV groups, the
same validation KL (``apply`` here; the README's script does the same).

Torch-Pruning's own pruners (``MetaPruner`` with a ``pruning_ratio_dict``) are not used: they
rank channels by their own importance, so they keep other neurons than the search did (the
searched shapes, not the searched model), their dependency graph does not finish tracing
rotary attention as transformers 5 writes it, and their head pruning removes query heads
inside each KV group rather than whole KV groups, which is what the search priced.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from searcher.errors import SearcherError

FORMAT = "searcher-torch-pruning/2"
_PLAIN = (bool, int, float, str, type(None))


def refuse_unless_width(config: dict[str, Any]) -> None:
    space = config["space"]["name"]
    if space != "width":
        other = "llmcompressor" if space == "sparsity" else "pruned"
        raise SearcherError(
            f"Torch-Pruning removes channels: it takes width configs, not {space} ones "
            f"(try --format {other})"
        )


def spec(config: dict[str, Any], structure: Any, model_path: str, dtype: str) -> dict[str, Any]:
    """The Torch-Pruning spec of a width config (see the module docstring); ``structure`` is
    the dense model's ``spaces.Structure``, whose family says which channels a unit owns and
    which attributes follow a unit count; ``model_path`` and ``dtype`` say what to load."""
    refuse_unless_width(config)
    if structure.moe:
        raise SearcherError(
            "Torch-Pruning removes channels of nn.Linear layers, not of a mixture-of-experts "
            "model's fused expert tensors: export with --format pruned"
        )
    blocks = {
        layer.name(block.name): (layer, block)
        for layer in structure.layers
        for block in (layer.attn, layer.mlp)
    }
    out: dict[str, list[int]] = {}
    into: dict[str, list[int]] = {}
    attributes: dict[str, dict[str, Any]] = {}
    for name, detail in config["config"].items():
        layer, block = blocks[name]
        key = "kept_kv_groups" if block.kind == "attn" else "kept_neurons"
        kept = set(detail[key])
        gone = [u for u in range(block.units) if u not in kept]
        channels = _channels(layer, block, gone, structure.family.name)
        out.update({m: c for m, c in channels["out"].items() if c})
        into.update({m: c for m, c in channels["in"].items() if c})
        changed = _attributes(structure, layer, block, len(kept))
        if changed:
            attributes[name] = changed
    return {
        "format": FORMAT,
        "model": config["model"],
        "model_path": model_path,
        "dtype": dtype,
        "space": config["space"],
        "costs": config.get("costs"),
        "fractions": config.get("fractions"),
        "channels": {"out": out, "in": into},
        "attributes": attributes,
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
        found[side][layer.name(owner)] = sorted(slab.indices(gone).tolist())
    return found


def _attributes(structure: Any, layer: Any, block: Any, units: int) -> dict[str, Any]:
    """What the family's ``resized`` changes in the block's module when it keeps ``units``
    rather than all its units: plain values, and (as a nested mapping) those of an object the
    module holds, such as Phi-3's config, which the module then gets a copy of. Found by
    calling ``resized`` at both counts and comparing; the module is put back as it was."""
    module = layer.module.get_submodule(block.name)
    saved = dict(vars(module))
    try:
        structure.family.resized(layer.module, block, block.units, structure.shapes)
        dense = _plain(module)
        structure.family.resized(layer.module, block, units, structure.shapes)
        pruned = _plain(module)
    finally:
        vars(module).clear()
        vars(module).update(saved)
    changed: dict[str, Any] = {}
    for key, value in pruned.items():
        if isinstance(value, dict):
            inner = {k: v for k, v in value.items() if dense.get(key, {}).get(k) != v}
            if inner:
                changed[key] = inner
        elif key not in dense or dense[key] != value:
            changed[key] = value
    return changed


def _plain(module: nn.Module) -> dict[str, Any]:
    """A module's plain attributes, and those of the plain objects it holds (configs)."""
    found: dict[str, Any] = {}
    for key, value in vars(module).items():
        if key.startswith("_"):
            continue
        if isinstance(value, _PLAIN):
            found[key] = value
        elif not isinstance(value, (nn.Module, torch.Tensor)) and hasattr(value, "__dict__"):
            found[key] = {
                k: v
                for k, v in vars(value).items()
                if not k.startswith("_") and isinstance(v, _PLAIN)
            }
    return found


def apply(model: nn.Module, doc: dict[str, Any]) -> nn.Module:
    """What the README's script does: remove ``doc``'s channels from the dense ``model`` in
    place with Torch-Pruning's functional pruners and set its attributes."""
    import torch_pruning as tp

    for name, idxs in doc["channels"]["out"].items():
        tp.prune_linear_out_channels(model.get_submodule(name), idxs)
    for name, idxs in doc["channels"]["in"].items():
        tp.prune_linear_in_channels(model.get_submodule(name), idxs)
    for name, values in doc["attributes"].items():
        _set_attributes(model.get_submodule(name), values)
    return model


def _set_attributes(obj: Any, values: dict[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, dict):  # a shared object (Phi-3's config): this module's own copy
            setattr(obj, key, copy.copy(getattr(obj, key)))
            _set_attributes(getattr(obj, key), value)
        else:
            setattr(obj, key, value)
