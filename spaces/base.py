"""The interface every search space implements, and the cost pieces they share."""

from __future__ import annotations

import copy
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from latency_models.analytic import attention_score_flops, linear_flops
from latency_models.latency_table import Block
from latency_models.table import CostTable
from spaces.structure import ATTN_PROJ, MLP_PROJ, Structure


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
            if isinstance(module, nn.Linear) and module is not pruned.get_output_embeddings():
                set_linear(module, module.weight.detach().clone(), _clone(module.bias))
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


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()


def set_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Point a linear layer at new (possibly view) weights, without copying them."""
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    linear.out_features, linear.in_features = weight.shape


def linear_params(linear: nn.Linear, rows: int, cols: int) -> int:
    return rows * cols + (rows if linear.bias is not None else 0)


def fixed_costs(structure: Structure, seq_len: int) -> dict[str, float]:
    """Costs no space changes: LM head FLOPs; embedding, head and norm parameters."""
    s = structure
    return {
        "flops": linear_flops(seq_len, s.hidden, s.vocab),
        "params": s.fixed_params(),
    }


def attention_costs(structure: Structure, layer_index: int, groups: int, seq_len: int):
    """FLOPs and params of one layer's attention keeping ``groups`` KV groups (0 = removed)."""
    s = structure
    layer = s.layers[layer_index]
    q = groups * s.group_size * s.head_dim
    kv = groups * s.head_dim
    shapes = {"q_proj": (q, s.hidden), "k_proj": (kv, s.hidden), "v_proj": (kv, s.hidden)}
    shapes["o_proj"] = (s.hidden if groups else 0, q)
    flops = sum(linear_flops(seq_len, cols, rows) for rows, cols in shapes.values())
    flops += attention_score_flops(1, seq_len, groups * s.group_size, s.head_dim)
    params = sum(linear_params(layer.linear(n), *shapes[n]) for n in ATTN_PROJ)
    return flops, params


def mlp_costs(structure: Structure, layer_index: int, width: int, seq_len: int):
    """FLOPs and params of one layer's gated MLP keeping ``width`` neurons (0 = removed)."""
    s = structure
    layer = s.layers[layer_index]
    shapes = {"gate_proj": (width, s.hidden), "up_proj": (width, s.hidden)}
    shapes["down_proj"] = (s.hidden if width else 0, width)
    flops = sum(linear_flops(seq_len, cols, rows) for rows, cols in shapes.values())
    params = sum(linear_params(layer.linear(n), *shapes[n]) for n in MLP_PROJ)
    return flops, params


def block_tables(
    structure: Structure,
    seq_len: int,
    attn_levels: Sequence[Sequence[int]],
    mlp_levels: Sequence[Sequence[int]],
    order: Sequence[tuple[str, int]],
) -> dict[str, CostTable]:
    """Cost tables for spaces whose genes are whole attention / MLP blocks.

    ``order`` lists the genes as ("attn" | "mlp", layer index); ``attn_levels[i]`` and
    ``mlp_levels[i]`` give the KV groups / neurons kept at each level of layer i.
    """
    fixed = fixed_costs(structure, seq_len)
    flops, params = [], []
    for kind, i in order:
        if kind == "attn":
            rows = [attention_costs(structure, i, g, seq_len) for g in attn_levels[i]]
        else:
            rows = [mlp_costs(structure, i, w, seq_len) for w in mlp_levels[i]]
        flops.append([f for f, _ in rows])
        params.append([p for _, p in rows])
    return {
        "flops": CostTable.build("flops", fixed["flops"], flops),
        "params": CostTable.build("params", fixed["params"], params),
    }
