"""What a model family declares, and the generic code that works from those declarations.

A family says where a decoder's layers live and, for each layer's two blocks (attention and
MLP), which tensors hold which units: a KV group (the KV head and the query heads sharing it;
one head without grouped-query attention) or an MLP neuron. A unit owns the same span of rows
(or columns) in each of its segments of a tensor, so fused projections (q, k and v in one
weight), transposed weights (GPT-2's Conv1D) and interleaved layouts (GPT-NeoX's per-head
qkv) are all one ``Slab``: a tensor, an axis and its segments. From the slabs alone the
spaces slice units, the cost model counts FLOPs and parameters, and exports find channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from searcher.errors import SearcherError

# torch alone (the module imports transformers only where it builds classes): no cycle
from searcher.export.modeling_searcher_pruned import RemovedBlock

KINDS = ("attn", "mlp")


@dataclass(frozen=True)
class Slab:
    """The part of one tensor a block's units own: along ``axis``, each segment
    ``(offset, span)`` gives unit u the indices ``offset + u*span ... offset + (u+1)*span``."""

    tensor: str  # parameter path relative to the decoder layer, e.g. "self_attn.q_proj.weight"
    axis: int
    segments: tuple[tuple[int, int], ...]
    matmul: bool = False  # a weight the activations are multiplied by (it costs FLOPs)

    def indices(self, units: Sequence[int] | torch.Tensor, device: Any = None) -> torch.Tensor:
        """Indices along ``axis`` of ``units`` (in that order), segment by segment."""
        u = torch.as_tensor(units, dtype=torch.long, device=device)
        parts = [
            (off + u[:, None] * span + torch.arange(span, device=device)[None, :]).reshape(-1)
            for off, span in self.segments
        ]
        return torch.cat(parts)

    def size(self, units: int) -> int:
        return units * sum(span for _, span in self.segments)

    def is_prefix(self) -> bool:
        """Whether the first n units are the first indices along the axis (one segment)."""
        return len(self.segments) == 1 and self.segments[0][0] == 0


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts block's routed experts. Axis 0 of each of ``tensors`` (the experts'
    fused weights and biases) and of ``router`` (the router's weight and bias) indexes the
    experts; a token runs the router whole and ``top_k`` of the experts."""

    count: int  # routed experts in the dense model
    top_k: int
    renormalised: bool  # the top-k weights are divided by their sum (else softmax as it is)
    tensors: tuple[str, ...]
    router: tuple[str, ...]
    module: str  # the experts module: module(x, top_k_index, top_k_weights) -> output
    gate: str  # the router module: gate(x) -> (logits, top-k weights, top-k indices)
    down: str = ""  # the experts' down projection (whose input axis is their neurons' slab)
    transposed: bool = False  # stacked weights are [experts, in, out] (else [experts, out, in])
    # the shared expert's output projection (its neurons are units' slabs too), if it has one
    shared: str = ""


@dataclass(frozen=True)
class BlockLayout:
    """One block of a decoder layer: what removing it replaces, its units and their tensors."""

    kind: str  # "attn" or "mlp"
    name: str  # the block's module path relative to the layer (what a gene is named after)
    units: int  # KV groups or neurons in the dense model (a MoE block: each expert's neurons)
    slabs: tuple[Slab, ...]
    score: str  # the module whose input features are the units' (the block's output projection)
    owned: tuple[str, ...] = ()  # other parameters that go with the block (output bias, norms)
    # weights the block multiplies every token by whole, whatever its units (a MoE router,
    # a shared expert): parameters and FLOPs while the block is kept
    matmuls: tuple[str, ...] = ()
    experts: Experts | None = None  # a mixture-of-experts block's routed experts

    def slab(self, tensor: str) -> Slab:
        return next(s for s in self.slabs if s.tensor == tensor)

    @property
    def tensors(self) -> tuple[str, ...]:
        """Every parameter the block owns, as paths relative to the layer."""
        return (*(s.tensor for s in self.slabs), *self.owned, *self.matmuls)

    @property
    def score_slab(self) -> Slab:
        return self.slab(f"{self.score}.weight")


@dataclass(frozen=True)
class Shapes:
    """The dense model's sizes."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads


class Dropped(RemovedBlock):
    """Stands in for a removed block: the exported modeling file's ``RemovedBlock`` (one source
    for how a removed block computes, here and in a pruned model loaded without searcher),
    made from a block's ``kind``. Its output is zeros, ``features`` wide (the input's width
    when None); a removed attention returns (output, None) and, with a KV cache, records its
    tokens at ``layer`` (its index in the cache). ``removed_as`` says, as plain data, what
    stands in (exports record it)."""

    def __init__(
        self, kind: str, features: int | None = None, layer: int | None = None,
        pair: bool = False,
    ) -> None:  # fmt: skip
        attention = kind == "attn"
        super().__init__(attention, features, layer if attention else None, pair)
        self.kind = kind


def is_removed(module: nn.Module) -> bool:
    """Whether ``module`` stands in for a removed block (``Dropped``, or the stand-in of a
    pruned model loaded from its export)."""
    return callable(getattr(module, "removed_as", None))


def get_tensor(layer: nn.Module, path: str) -> torch.Tensor:
    owner, _, name = path.rpartition(".")
    return getattr(layer.get_submodule(owner), name)


def set_tensor(layer: nn.Module, path: str, value: torch.Tensor) -> None:
    """Point a parameter at ``value`` (often a view: no copy), keeping module sizes in step."""
    owner, _, name = path.rpartition(".")
    module = layer.get_submodule(owner)
    setattr(module, name, nn.Parameter(value, requires_grad=False))
    if name == "weight" and isinstance(module, nn.Linear):
        module.out_features, module.in_features = value.shape
    elif name == "weight" and hasattr(module, "nf"):  # transformers' Conv1D: [in, out]
        module.nf = value.shape[1]
        module.nx = value.shape[0]
    elif name == "weight" and hasattr(module, "normalized_shape"):
        module.normalized_shape = tuple(value.shape)


def in_axis(module: nn.Module) -> int:
    """The axis of a matmul weight that its input features index ([out, in] for nn.Linear,
    [in, out] for transformers' Conv1D)."""
    return 0 if hasattr(module, "nf") else 1


class Family:
    """A model family. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    layers_path: ClassVar[str] = "model.layers"
    # config keys that size the MLP and the attention, for ordinary checkpoints of pruned models
    intermediate_key: ClassVar[str] = "intermediate_size"
    head_dim_in_config: ClassVar[bool] = True  # False: derived from hidden / heads
    note: ClassVar[str] = ""  # what a user should know (README table)
    mlp_pair: ClassVar[bool] = False  # the MLP returns (output, router scores): gpt-oss

    # -- layout ---------------------------------------------------------------------------
    def shapes(self, model: nn.Module) -> Shapes:
        cfg = model.config
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        return Shapes(
            layers=len(self.decoder_layers(model)),
            hidden=cfg.hidden_size,
            heads=heads,
            kv_heads=kv,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            intermediate=self.intermediate(model),
            vocab=model.get_output_embeddings().weight.shape[0],
        )

    def intermediate(self, model: nn.Module) -> int:
        return int(getattr(model.config, self.intermediate_key))

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def block(self, kind: str, shapes: Shapes, layer: nn.Module) -> BlockLayout:
        """The layout of a dense decoder layer's ``kind`` block ("attn" or "mlp"). Paths and
        segments are the same in every layer; the layer is read for optional parts (biases,
        norms). Raises AttributeError on a layer whose block was removed."""
        raise NotImplementedError

    def check(self, model: nn.Module) -> None:
        """Refuse, in one line, a variant of the family this module does not handle."""

    # -- changing a layer -----------------------------------------------------------------
    def resized(self, layer: nn.Module, block: BlockLayout, units: int, shapes: Shapes) -> None:
        """Keep module attributes that size the forward pass in step with ``units``."""

    def drop(self, layer: nn.Module, block: BlockLayout) -> nn.Module | None:
        """Remove a block; returns what to give ``restore`` to put it back."""
        owner, _, attr = block.name.rpartition(".")
        parent = layer.get_submodule(owner)
        original = getattr(parent, attr)
        pair = self.mlp_pair and block.kind == "mlp"
        stand_in = Dropped(block.kind, layer=getattr(original, "layer_idx", None), pair=pair)
        setattr(parent, attr, stand_in)
        return original

    def restore(self, layer: nn.Module, block: BlockLayout, original: Any) -> None:
        owner, _, attr = block.name.rpartition(".")
        setattr(layer.get_submodule(owner), attr, original)

    def is_dropped(self, layer: nn.Module, block: BlockLayout) -> bool:
        return is_removed(layer.get_submodule(block.name))

    def set_experts(self, layer: nn.Module, block: BlockLayout, count: int) -> None:
        """Keep the attributes that size a MoE block's routing in step with ``count`` kept
        experts (their tensors already cut to it): the router and the experts module count
        them, and top-k is at most the experts kept (``torch.topk`` needs as many)."""
        moe = block.experts
        assert moe is not None
        for path in (moe.module, moe.gate):
            layer.get_submodule(path).num_experts = count
        for path in (moe.gate, block.name):
            module = layer.get_submodule(path)
            if hasattr(module, "top_k"):
                module.top_k = min(moe.top_k, count)

    def expert_hidden(self, experts: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
        """A MoE layer's routed ``expert``'s hidden activations (the input of its down
        projection) for tokens ``x``, from the layer's experts module."""
        raise NotImplementedError

    # -- latency --------------------------------------------------------------------------
    def lean(self, model: nn.Module) -> Any:
        """The model's weights as ``latency_models.graph.DecoderWeights`` (the lean block)."""
        raise SearcherError(f"latency measurement does not support the {self.name} family yet")

    # -- saving -----------------------------------------------------------------------------
    def config_for(
        self, config: dict[str, Any], shapes: Shapes, groups: int, neurons: int,
        experts: int | None = None,
    ) -> dict[str, Any] | None:  # fmt: skip
        """A Hugging Face config for a model whose every layer keeps ``groups`` KV groups,
        ``neurons`` MLP neurons (in each expert, for MoE) and ``experts`` routed experts (MoE
        only), or None where the config cannot say so."""
        if experts is not None:
            return None  # a MoE family says how its config counts experts
        out = {**config, self.intermediate_key: neurons}
        if groups == shapes.kv_heads:
            return out
        if not self.head_dim_in_config:
            return None  # the head size is derived from hidden / heads: fewer heads break it
        out.update(
            num_attention_heads=groups * shapes.group_size,
            num_key_value_heads=groups,
            head_dim=shapes.head_dim,
        )
        return out


def experts_of(layer: nn.Module, block: BlockLayout) -> int:
    """Routed experts a (possibly pruned) MoE layer keeps, read from its tensors."""
    assert block.experts is not None
    return get_tensor(layer, block.experts.tensors[0]).shape[0]


def keep_experts(family: Family, layer: nn.Module, block: BlockLayout, count: int) -> None:
    """Cut a MoE block to its first ``count`` experts (used to rebuild saved models)."""
    assert block.experts is not None
    for path in (*block.experts.tensors, *block.experts.router):
        set_tensor(layer, path, get_tensor(layer, path).detach()[:count].clone())
    family.set_experts(layer, block, count)


def units_of(layer: nn.Module, block: BlockLayout) -> int:
    """Units a (possibly pruned) layer keeps in ``block``, read from its tensors."""
    slab = block.slabs[0]
    return get_tensor(layer, slab.tensor).shape[slab.axis] // slab.size(1)


def resize_to(family: Family, layer: nn.Module, block: BlockLayout, units: int,
              shapes: Shapes) -> None:  # fmt: skip
    """Cut a layer's block to its first ``units`` units (used to rebuild saved models)."""
    for slab in block.slabs:
        t = get_tensor(layer, slab.tensor)
        keep = slab.indices(range(units), t.device)
        set_tensor(layer, slab.tensor, t.detach().index_select(slab.axis, keep))
    family.resized(layer, block, units, shapes)


def linear_slabs(prefix: str, outs: Sequence[tuple[str, tuple[tuple[int, int], ...]]],
                 into: tuple[str, tuple[tuple[int, int], ...]], layer: nn.Module
                 ) -> tuple[Slab, ...]:  # fmt: skip
    """Slabs of nn.Linear projections: ``outs`` produce the units' features (rows of the
    weight and the bias), ``into`` consumes them (columns of its weight)."""
    slabs = []
    for name, segs in outs:
        path = f"{prefix}.{name}" if prefix else name
        slabs.append(Slab(f"{path}.weight", 0, segs, matmul=True))
        if layer.get_submodule(path).bias is not None:
            slabs.append(Slab(f"{path}.bias", 0, segs))
    name, segs = into
    path = f"{prefix}.{name}" if prefix else name
    layer.get_submodule(path)  # AttributeError where the block was removed
    slabs.append(Slab(f"{path}.weight", 1, segs, matmul=True))
    return tuple(slabs)


def linear_block(
    kind: str, module: str, units: int, outs: Sequence[tuple[str, tuple[tuple[int, int], ...]]],
    into: tuple[str, tuple[tuple[int, int], ...]], layer: nn.Module, extra: tuple[Slab, ...] = (),
) -> BlockLayout:  # fmt: skip
    """A block of nn.Linear projections under ``module`` (see ``linear_slabs``), scored at its
    output projection ``into``; ``extra`` slabs are other tensors its units own."""
    slabs = linear_slabs(module, outs, into, layer) + extra
    return BlockLayout(kind, module, units, slabs, f"{module}.{into[0]}",
                       owned_rest(layer, module, slabs))  # fmt: skip


def owned_rest(layer: nn.Module, module: str, slabs: Sequence[Slab]) -> tuple[str, ...]:
    """Parameters under ``module`` that no slab covers (an output bias, per-head norms)."""
    sliced = {s.tensor for s in slabs}
    return tuple(
        f"{module}.{n}" for n, _ in layer.get_submodule(module).named_parameters()
        if f"{module}.{n}" not in sliced
    )  # fmt: skip
