"""Depth: per layer, keep or drop the attention sub-block and the MLP sub-block separately.

A dropped sub-block is replaced, the way its family says (``Family.drop``), by a module that
adds nothing to the residual stream, so the layer's input passes through; its weights are not
touched and no compute is spent on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from latency_models.table import CostTable
from spaces.base import Block, Gene, SearchSpace, block_tables
from spaces.importance import residual_ratios
from spaces.structure import Structure


class DepthSpace(SearchSpace):
    name = "depth"

    def __init__(
        self,
        structure: Structure,
        seq_len: int,
        windows: torch.Tensor | None = None,
        batch_size: int = 4,
    ) -> None:
        """``windows``: calibration tokens for the blocks' residual ratios (a prior for the
        default search's start; none without them)."""
        super().__init__(structure, seq_len)
        self._ratios = [] if windows is None else residual_ratios(structure, windows, batch_size)
        self.genes = tuple(
            Gene(layer.name(block.name), block.kind, (False, True), (0.0, 1.0))
            for layer in structure.layers
            for block in (layer.attn, layer.mlp)
        )

    def apply(self, candidate: Sequence[int]) -> None:
        s = self.structure
        for gi, level in enumerate(candidate):
            layer, kind = s.layers[gi // 2], self.genes[gi].kind
            if level:
                s.restore(layer, kind)
            else:
                s.drop(layer, kind)

    def cost_tables(self) -> dict[str, CostTable]:
        s = self.structure
        levels = {"attn": (0, None), "mlp": (0, None)}  # None: each block's dense units
        order = [(g.kind, i // 2) for i, g in enumerate(self.genes)]
        tables = block_tables(s, self.seq_len, levels, order)
        tables["blocks"] = CostTable.build("blocks", 0.0, [[0.0, 1.0]] * len(self.genes))
        return tables

    def blocks(self) -> tuple[list[Block], list[list[Block | None]]]:
        s = self.structure
        attn: list[Block | None] = [("attn", 0), ("attn", s.kv_heads)]
        mlp: list[Block | None] = [("mlp", 0), ("mlp", s.intermediate)]
        return [], [attn if g.kind == "attn" else mlp for g in self.genes]

    def priors(self) -> dict[str, Any]:
        """``residual_ratio``: per gene, how much its block changes the residual stream on
        calibration tokens (``residual_ratios``)."""
        return {"residual_ratio": self._ratios} if self._ratios else {}

    def describe(self, candidate: Sequence[int]) -> dict[str, dict[str, Any]]:
        return {g.name: {"kept": bool(g.values[level])} for g, level in zip(self.genes, candidate)}
