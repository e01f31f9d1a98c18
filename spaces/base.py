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
from searcher.errors import SearcherError
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


def refuse_mixed(structure: Structure, space: str) -> None:
    """A one-line refusal of a model with both dense and MoE MLP layers, whose MLP widths
    differ from layer to layer (the width grid is one for all layers)."""
    kinds = {layer.mlp.experts is None for layer in structure.layers}
    if len(kinds) > 1:
        raise SearcherError(
            f"the {space} space does not prune models that mix dense and mixture-of-experts "
            "MLP layers (mlp_only_layers) yet: use --space experts or depth"
        )


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
    """Costs no space changes: LM head FLOPs; embedding, head and norm parameters (all of them
    active: ``active_params`` counts what a token uses, bar the routed experts it skips)."""
    s = structure
    out = {"flops": linear_flops(seq_len, s.hidden, s.vocab), "params": s.fixed_params()}
    if s.moe:
        out["active_params"] = s.fixed_params()
    return out


def block_costs(
    structure: Structure, layer: Layer, kind: str, units: int | None, seq_len: int,
    experts: int | None = None,
) -> tuple[float, float, float]:  # fmt: skip
    """FLOPs, parameters and active parameters of one layer's block keeping ``units`` KV groups
    or neurons (None: the dense block's; 0: the block is removed) and, in a MoE block,
    ``experts`` routed experts (None: all). Counted from the family's layout: every matmul
    weight costs 2 FLOPs per element per token, attention its scores; of the routed experts'
    tensors a token runs top-k of the experts kept, so their FLOPs and active parameters are
    that share of their size, their parameters all of it."""
    block = layer.block(kind)
    units = block.units if units is None else units
    moe = block.experts
    kept = (moe.count if experts is None else experts) if moe else 0
    runs = min(moe.top_k, kept) if moe else 0  # experts a token runs
    per_expert = set(moe.tensors + moe.router) if moe else set()
    slabs = {slab.tensor: slab for slab in block.slabs}
    params = active = flops = 0.0
    for path in block.tensors if units else slabs:
        shape = list(layer.sizes[path])
        slab = slabs.get(path)
        if slab is not None:
            shape[slab.axis] = slab.size(units)
        if path in per_expert:
            shape[0] = kept
        n = math.prod(shape)
        used = n // kept * runs if moe and path in moe.tensors else n  # exact: n = kept * each
        params += n
        active += used
        if slab.matmul if slab is not None else path in block.matmuls:
            flops += 2 * seq_len * used
    if kind == "attn":
        s = structure
        flops += attention_score_flops(1, seq_len, units * s.group_size, s.head_dim)
    return flops, params, active


def block_tables(
    structure: Structure,
    seq_len: int,
    levels: dict[str, Sequence[int | None]],
    order: Sequence[tuple[str, int]],
) -> dict[str, CostTable]:
    """Cost tables for spaces whose genes are whole attention / MLP blocks.

    ``order`` lists the genes as ("attn" | "mlp", layer index); ``levels[kind]`` gives the
    KV groups / neurons kept at each level of a gene of that kind (None: the dense block's).
    """
    fixed = fixed_costs(structure, seq_len)
    rows: list[list[tuple[float, float, float]]] = [
        [block_costs(structure, structure.layers[i], kind, u, seq_len) for u in levels[kind]]
        for kind, i in order
    ]
    return cost_tables(fixed, rows)


METRICS = ("flops", "params", "active_params")  # block_costs' order


def cost_tables(
    fixed: dict[str, float], rows: Sequence[Sequence[tuple[float, float, float]]]
) -> dict[str, CostTable]:
    """Tables of the metrics ``fixed`` has, from per gene and level (flops, params, active
    params) as ``block_costs`` gives them."""
    return {
        metric: CostTable.build(metric, fixed[metric], [[row[m] for row in gene] for gene in rows])
        for m, metric in enumerate(METRICS)
        if metric in fixed
    }
