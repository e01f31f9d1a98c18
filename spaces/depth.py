"""Depth: per layer, keep or drop the attention sub-block and the MLP sub-block separately.

A dropped sub-block is replaced by a module that adds nothing to the residual stream, so the
layer's input passes through; its weights are not touched and no compute is spent on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from latency_models.table import CostTable
from spaces.base import Block, Gene, SearchSpace, block_tables
from spaces.structure import Structure


class DroppedAttention(nn.Module):
    """Stands in for a removed attention block: contributes zero to the residual."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        return torch.zeros_like(hidden_states), None


class DroppedMLP(nn.Module):
    """Stands in for a removed MLP block: contributes zero to the residual."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class DepthSpace(SearchSpace):
    name = "depth"

    def __init__(
        self,
        structure: Structure,
        seq_len: int,
        windows: torch.Tensor | None = None,
        batch_size: int = 4,
    ) -> None:
        """``windows`` and ``batch_size`` are unused: dropping a block needs no scoring."""
        super().__init__(structure, seq_len)
        genes = []
        for layer in structure.layers:
            genes.append(Gene(f"{layer.prefix}.self_attn", "attn", (False, True), (0.0, 1.0)))
            genes.append(Gene(f"{layer.prefix}.mlp", "mlp", (False, True), (0.0, 1.0)))
        self.genes = tuple(genes)
        self._dropped_attn = DroppedAttention()
        self._dropped_mlp = DroppedMLP()

    def apply(self, candidate: Sequence[int]) -> None:
        for gi, level in enumerate(candidate):
            layer = self.structure.layers[gi // 2]
            if gi % 2 == 0:
                layer.block.self_attn = layer.attn if level else self._dropped_attn
            else:
                layer.block.mlp = layer.mlp if level else self._dropped_mlp

    def cost_tables(self) -> dict[str, CostTable]:
        s = self.structure
        attn = [(0, s.kv_heads)] * len(s.layers)
        mlp = [(0, s.intermediate)] * len(s.layers)
        order = [(g.kind, i // 2) for i, g in enumerate(self.genes)]
        tables = block_tables(s, self.seq_len, attn, mlp, order)
        tables["blocks"] = CostTable.build("blocks", 0.0, [[0.0, 1.0]] * len(self.genes))
        return tables

    def blocks(self) -> tuple[list[Block], list[list[Block | None]]]:
        s = self.structure
        attn: list[Block | None] = [("attn", 0), ("attn", s.kv_heads)]
        mlp: list[Block | None] = [("mlp", 0), ("mlp", s.intermediate)]
        return [], [attn if g.kind == "attn" else mlp for g in self.genes]

    def describe(self, candidate: Sequence[int]) -> dict[str, dict[str, Any]]:
        return {g.name: {"kept": bool(g.values[level])} for g, level in zip(self.genes, candidate)}
