"""Sparsity: per linear layer, an unstructured sparsity level on an EvoPress-style grid.

The mask is Wanda's: weights are ranked within each output row by |W_ij| * ||X_j||_2, with
||X_j|| the norm of input feature j over the calibration tokens, and a level of sparsity s
zeroes the floor(s * in_features) lowest-ranked weights of every row. Ranks are computed once;
applying a candidate rewrites only the layers whose level changed.

Unstructured zeros do not make dense kernels faster, so FLOPs are reported as dense; what the
budget limits is the kept ("nonzero") share of the prunable weights (``sparsity=R`` means at
least R of them are zero) or the whole model's parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from latency_models.table import CostTable
from searcher.families.base import in_axis
from spaces.base import Block, Gene, SearchSpace, block_costs, dense_blocks, digest, fixed_costs
from spaces.importance import input_statistics
from spaces.structure import Structure

OWL_M = 5.0  # OWL's outlier threshold: a score above M times the layer's mean (paper default)


def outlier_ratio(scores: torch.Tensor, m: float = OWL_M) -> float:
    return float((scores > m * scores.mean()).double().mean())


class SparsitySpace(SearchSpace):
    name = "sparsity"
    latency_note = (
        "unstructured sparsity runs on dense kernels (ONNX Runtime and torch alike), so every "
        "sparsity candidate has the dense model's latency"
    )

    def __init__(
        self,
        structure: Structure,
        seq_len: int,
        windows: torch.Tensor,
        batch_size: int = 4,
        step: float = 0.1,
        max_sparsity: float = 0.9,
    ) -> None:
        super().__init__(structure, seq_len)
        if not 0 < step <= max_sparsity < 1:
            raise ValueError("need 0 < step <= max_sparsity < 1")
        n = int(max_sparsity / step + 1e-9)
        self.step, self.max_sparsity = step, max_sparsity
        self.sparsities = tuple(round(step * k, 6) for k in range(n, -1, -1))
        # every matmul weight of every block, as (layer, module path relative to the layer)
        self.linears = [
            (layer, slab.tensor.removesuffix(".weight"))
            for layer in structure.layers
            for block in (layer.attn, layer.mlp)
            for slab in block.slabs
            if slab.matmul
        ]
        self.genes = tuple(
            Gene(
                layer.name(p),
                "linear",
                self.sparsities,
                tuple(1.0 - x for x in self.sparsities),
            )  # fmt: skip
            for layer, p in self.linears
        )
        modules = {layer.name(p): layer.module.get_submodule(p) for layer, p in self.linears}
        stats = input_statistics(structure.model, modules, windows, batch_size)
        self._dense: list[torch.Tensor] = []  # [out, in] (transposed views of Conv1D weights)
        self._rank: list[torch.Tensor] = []
        self._outliers: list[float] = []  # OWL's outlier ratio of each gene's decoder layer
        per_layer: dict[int, list[torch.Tensor]] = {}
        for layer, p in self.linears:
            w = _rows_out(modules[layer.name(p)]).detach()
            score = w.abs().double() * stats[layer.name(p)]["l2"][None, :].to(w.device)
            per_layer.setdefault(layer.index, []).append(score.flatten())
            order = torch.argsort(score, dim=1, stable=True)
            rank_dtype = torch.int16 if w.shape[1] < 2**15 else torch.int32
            rank = torch.empty_like(order, dtype=rank_dtype)
            cols = torch.arange(w.shape[1], device=w.device, dtype=rank_dtype)
            rank.scatter_(1, order, cols.expand_as(order).contiguous())
            self._rank.append(rank)
            self._dense.append(w.clone())
        ratios = {i: outlier_ratio(torch.cat(scores)) for i, scores in per_layer.items()}
        self._outliers = [ratios[layer.index] for layer, _ in self.linears]
        self._applied = list(self.dense())

    def _zeroed(self, gi: int, level: int) -> int:
        """Weights zeroed per output row of gene gi's linear at this level: rounded up, so
        that a level of s zeroes at least s of every row and ``sparsity=s`` admits it."""
        in_features = self._dense[gi].shape[1]
        return math.ceil(self.sparsities[level] * in_features - 1e-9)

    def row_zeros(self, gi: int, level: int) -> tuple[int, int]:
        """Gene gi's linear: (its input features, the weights zeroed per row at ``level``)."""
        return self._dense[gi].shape[1], self._zeroed(gi, level)

    def apply(self, candidate: Sequence[int]) -> None:
        with torch.no_grad():
            for gi, level in enumerate(candidate):
                if self._applied[gi] == level:
                    continue
                layer, p = self.linears[gi]
                k = self._zeroed(gi, level)
                out = _rows_out(layer.module.get_submodule(p)).data
                torch.mul(self._dense[gi], self._rank[gi] >= k, out=out)
                self._applied[gi] = level

    def cost_tables(self) -> dict[str, CostTable]:
        s = self.structure
        fixed = fixed_costs(s, self.seq_len)
        dense = [
            block_costs(s, layer, kind, s.units(kind), self.seq_len)
            for layer in s.layers
            for kind in ("attn", "mlp")
        ]
        flops = fixed["flops"] + sum(f for f, _ in dense)
        # what a block holds besides its matmul weights (biases, norms) stays dense
        others = sum(p for _, p in dense) - sum(w.numel() for w in self._dense)
        nonzero = []
        for gi in range(len(self.genes)):
            rows, cols = self._dense[gi].shape
            nonzero.append(
                [rows * (cols - self._zeroed(gi, lv)) for lv in range(len(self.sparsities))]
            )
        zeros = [[0.0] * len(self.sparsities) for _ in self.genes]
        return {
            "flops": CostTable.build("flops", flops, zeros),
            "params": CostTable.build("params", fixed["params"] + others, nonzero),
            "nonzero": CostTable.build("nonzero", 0.0, nonzero),
        }

    def blocks(self) -> tuple[list[Block], list[list[Block | None]]]:
        return dense_blocks(self.structure), [[None] * len(g.values) for g in self.genes]

    def describe(self, candidate: Sequence[int]) -> dict[str, dict[str, Any]]:
        return {g.name: {"sparsity": g.values[lv]} for g, lv in zip(self.genes, candidate)}

    def priors(self) -> dict[str, Any]:
        """``outlier_ratio``: per gene, the share of its decoder layer's weights whose Wanda
        score exceeds ``OWL_M`` times the layer's mean score (OWL's layerwise outlier
        distribution, computed over all the layer's projections together)."""
        return {"outlier_ratio": list(self._outliers)}

    def fingerprint(self) -> str:
        return digest(*self._rank)

    def options(self) -> dict[str, Any]:
        return {"step": self.step, "max_sparsity": self.max_sparsity}


def _rows_out(module: nn.Module) -> torch.Tensor:
    """A matmul weight as [out, in] (a transposed view of GPT-2's Conv1D [in, out])."""
    return module.weight if in_axis(module) == 1 else module.weight.t()
