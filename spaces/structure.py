"""A resident model seen through its family: its decoder layers, their blocks and sizes.

Spaces, cost models and exports reach a model's weights only through this and the family
(``searcher.families``); none of them knows any family's layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from searcher.families import BlockLayout, Family, Shapes, family_of
from searcher.families.base import get_tensor, set_tensor


@dataclass
class Layer:
    index: int
    prefix: str  # module name of the decoder layer, e.g. "model.layers.3"
    module: nn.Module
    attn: BlockLayout
    mlp: BlockLayout
    # the shape of every tensor the blocks own, as loaded (spaces change the tensors later)
    sizes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    _removed: dict[str, Any] = field(default_factory=dict)  # kind -> the module taken out

    def block(self, kind: str) -> BlockLayout:
        return self.attn if kind == "attn" else self.mlp

    def name(self, path: str) -> str:
        """A path relative to the layer as a module name in the model."""
        return f"{self.prefix}.{path}"

    def tensor(self, path: str) -> torch.Tensor:
        return get_tensor(self.module, path)

    def set(self, path: str, value: torch.Tensor) -> None:
        set_tensor(self.module, path, value)


@dataclass
class Structure:
    """The model, its family, its layers and the sizes every space and cost model needs."""

    model: nn.Module
    family: Family
    shapes: Shapes
    layers: list[Layer]
    tied: bool
    fixed: int  # parameters no block owns: embeddings, LM head (unless tied), the layers' norms

    @classmethod
    def of(cls, model: nn.Module) -> Structure:
        family = family_of(model)
        shapes = family.shapes(model)
        modules = list(family.decoder_layers(model))
        first = {kind: _layout(family, kind, shapes, modules) for kind in ("attn", "mlp")}
        prefix = family.layers_path
        layers = [
            Layer(i, f"{prefix}.{i}", m, *(_own(family, k, shapes, m, first[k]) for k in first))
            for i, m in enumerate(modules)
        ]
        owned: set[int] = set()
        for layer in layers:
            for block in (layer.attn, layer.mlp):
                for path in block.tensors:
                    try:
                        t = layer.tensor(path)
                    except AttributeError:  # a pruned model without this layer's block
                        continue
                    layer.sizes[path] = tuple(t.shape)
                    owned.add(id(t))
        params = {id(p): p for p in model.parameters()}
        fixed = sum(p.numel() for k, p in params.items() if k not in owned)
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        return cls(model, family, shapes, layers, tied, fixed)

    hidden = property(lambda self: self.shapes.hidden)
    heads = property(lambda self: self.shapes.heads)
    kv_heads = property(lambda self: self.shapes.kv_heads)
    head_dim = property(lambda self: self.shapes.head_dim)
    intermediate = property(lambda self: self.shapes.intermediate)
    vocab = property(lambda self: self.shapes.vocab)
    group_size = property(lambda self: self.shapes.group_size)

    def units(self, kind: str) -> int:
        return self.kv_heads if kind == "attn" else self.intermediate

    @property
    def moe_layers(self) -> list[Layer]:
        """The layers whose MLP routes tokens to experts."""
        return [layer for layer in self.layers if layer.mlp.experts is not None]

    @property
    def moe(self) -> bool:
        """Whether some layer routes tokens to experts."""
        return bool(self.moe_layers)

    def drop(self, layer: Layer, kind: str) -> None:
        if kind not in layer._removed:
            layer._removed[kind] = self.family.drop(layer.module, layer.block(kind))

    def restore(self, layer: Layer, kind: str) -> None:
        if kind in layer._removed:
            self.family.restore(layer.module, layer.block(kind), layer._removed.pop(kind))

    def fixed_params(self) -> int:
        """Parameters no block owns: embeddings, LM head (unless tied), the layers' norms."""
        return self.fixed


def _own(
    family: Family, kind: str, shapes: Shapes, module: nn.Module, first: BlockLayout
) -> BlockLayout:
    """A layer's own layout of a block (layers may differ: dense and MoE MLPs in one model),
    or ``first`` (another layer's) where this layer's block was removed."""
    try:
        return family.block(kind, shapes, module)
    except AttributeError:
        return first


def _layout(family: Family, kind: str, shapes: Shapes, modules: list[nn.Module]) -> BlockLayout:
    """A block's layout, read from the first layer that still has that block (a pruned model
    may have removed it from some; one that removed it from all has ``Removed``)."""
    for module in modules:
        try:
            return family.block(kind, shapes, module)
        except AttributeError:
            continue
    return BlockLayout(kind, "", 0, (), "")
