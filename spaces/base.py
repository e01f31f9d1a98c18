"""The interface every search space implements, and the cost pieces they share."""

from __future__ import annotations

import copy
import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from latency_models.analytic import attention_score_flops, linear_flops
from latency_models.latency_table import Block
from latency_models.table import CostTable
from spaces.structure import Layer, Structure


@dataclass(frozen=True)
class Gene:
    """One searchable unit: a module and the levels it may take (index 0 = most compressed)."""

    name: str  # module name in the model, e.g. "model.layers.3.mlp"
    kind: str  # "mlp", "attn" or "linear"
    values: tuple[Any, ...]  # what each level means: neurons kept, heads kept, sparsity, kept
    keep: tuple[float, ...]  # fraction of the unit kept at each level


class SearchSpace(ABC):
    """Genes over a resident model, how to apply a candidate to it, and what candidates cost."""

    name: ClassVar[str]
    latency_note: ClassVar[str | None] = None  # why latency does not follow the genes, if so

    def __init__(self, structure: Structure, seq_len: int) -> None:
        self.structure = structure
        self.seq_len = seq_len
        self.genes: tuple[Gene, ...] = ()

    @abstractmethod
    def apply(self, candidate: Sequence[int]) -> None:
        """Put the resident model into the candidate's configuration (absolute, not relative)."""

    @abstractmethod
    def cost_tables(self) -> dict[str, CostTable]:
        """Exact additive costs per metric for a forward pass of one sequence of seq_len."""

    @abstractmethod
    def describe(self, candidate: Sequence[int]) -> dict[str, dict[str, Any]]:
        """The candidate's per-module configuration, keyed by module name."""

    @abstractmethod
    def blocks(self) -> tuple[list[Block], list[list[Block | None]]]:
        """What a forward pass runs, for latency tables: the blocks no gene changes, and for
        each gene and level the block it leaves (size 0: removed; None: latency unchanged)."""

    def options(self) -> dict[str, Any]:
        """Settings needed to rebuild this space (besides model and calibration data)."""
        return {}

    def priors(self) -> dict[str, Any]:
        """What the space knows about its units from the model (activation-aware scores,
        outlier ratios), in plain numbers, for allocation baselines such as ``flap`` and
        ``owl``. Keys a space does not provide are absent."""
        return {}

    def fingerprint(self) -> str:
        """A hash of the choices fixed at build time (which neurons, heads or weights each
        level removes), so a rebuilt space can be checked against the one a config used."""
        return digest()

    def gene_layers(self) -> tuple[int, ...]:
        """Each gene's decoder layer (the layer whose module holds the gene's module); empty
        when some gene is in none (then profiles go gene by gene)."""
        prefixes = [(f"{layer.prefix}.", layer.index) for layer in self.structure.layers]
        found = [
            next((i for prefix, i in prefixes if gene.name.startswith(prefix)), None)
            for gene in self.genes
        ]
        return () if None in found else tuple(i for i in found if i is not None)

    @property
    def n_levels(self) -> tuple[int, ...]:
        return tuple(len(g.values) for g in self.genes)

    def dense(self) -> tuple[int, ...]:
        return tuple(n - 1 for n in self.n_levels)

    def materialize(self, candidate: Sequence[int]) -> nn.Module:
        """An independent copy of the model pruned to the candidate, with compact weights."""
        self.apply(candidate)
        pruned = copy.deepcopy(self.structure.model)
        self.apply(self.dense())
        for module in pruned.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                if p.untyped_storage().nbytes() > p.numel() * p.element_size():  # a slice
                    setattr(module, name, nn.Parameter(p.detach().clone(), requires_grad=False))
        return pruned


def dense_blocks(structure: Structure) -> list[Block]:
    s = structure
    return [b for _ in s.layers for b in (("attn", s.kv_heads), ("mlp", s.intermediate))]


def digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(part.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()[:16]


def fixed_costs(structure: Structure, seq_len: int) -> dict[str, float]:
    """Costs no space changes: LM head FLOPs; embedding, head and norm parameters."""
    s = structure
    return {
        "flops": linear_flops(seq_len, s.hidden, s.vocab),
        "params": s.fixed_params(),
    }


def block_costs(structure: Structure, layer: Layer, kind: str, units: int, seq_len: int):
    """FLOPs and params of one layer's block keeping ``units`` KV groups or neurons (0: the
    block is removed), counted from the family's slabs: every matmul weight costs 2 FLOPs
    per element per token, and attention its scores."""
    block = layer.block(kind)
    params = flops = 0
    for slab in block.slabs:
        shape = list(layer.sizes[slab.tensor])
        shape[slab.axis] = slab.size(units)
        n = math.prod(shape)
        params += n
        flops += 2 * seq_len * n if slab.matmul else 0
    if units:
        params += sum(math.prod(layer.sizes[path]) for path in block.owned)
    if kind == "attn":
        s = structure
        flops += attention_score_flops(1, seq_len, units * s.group_size, s.head_dim)
    return flops, params


def block_tables(
    structure: Structure,
    seq_len: int,
    levels: dict[str, Sequence[int]],
    order: Sequence[tuple[str, int]],
) -> dict[str, CostTable]:
    """Cost tables for spaces whose genes are whole attention / MLP blocks.

    ``order`` lists the genes as ("attn" | "mlp", layer index); ``levels[kind]`` gives the
    KV groups / neurons kept at each level of a gene of that kind.
    """
    fixed = fixed_costs(structure, seq_len)
    flops, params = [], []
    for kind, i in order:
        layer = structure.layers[i]
        rows = [block_costs(structure, layer, kind, u, seq_len) for u in levels[kind]]
        flops.append([f for f, _ in rows])
        params.append([p for _, p in rows])
    return {
        "flops": CostTable.build("flops", fixed["flops"], flops),
        "params": CostTable.build("params", fixed["params"], params),
    }
