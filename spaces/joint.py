"""Width and depth in one genome: each attention and MLP block keeps any width level, or goes.

A gene is a block, as in the width space, with one more level below its narrowest: 0, the
block removed the way the depth space removes it (``Family.drop``: the layer's input passes
through, no compute). The other levels are the width space's, in the same order, keeping
the same activation-ranked units. So the search can thin one layer's MLP to a quarter and
drop the next layer's attention outright, under one budget, where the width space must keep
at least one KV group and one neuron step in every block and the depth space cannot thin.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from latency_models.table import CostTable
from spaces.base import Block, Gene, block_tables
from spaces.width import WidthSpace


class JointSpace(WidthSpace):
    name = "joint"

    def searched(self, widths: tuple[Gene, ...]) -> tuple[Gene, ...]:
        return tuple(Gene(g.name, g.kind, (0, *g.values), (0.0, *g.keep)) for g in widths)

    def apply(self, candidate: Sequence[int]) -> None:
        s = self.structure
        for gi, level in enumerate(candidate):
            layer, kind = s.layers[gi // 2], self.genes[gi].kind
            if level == 0:
                s.drop(layer, kind)
            else:  # back in place first: resizing sets the block's own tensors
                s.restore(layer, kind)
                self.resize(gi, level - 1)

    def cost_tables(self) -> dict[str, CostTable]:
        levels = {"attn": (0, *self.group_counts), "mlp": (0, *self.mlp_sizes)}
        order = [(g.kind, i // 2) for i, g in enumerate(self.genes)]
        tables = block_tables(self.structure, self.seq_len, levels, order)
        kept = [[0.0] + [1.0] * (len(g.values) - 1) for g in self.genes]
        tables["blocks"] = CostTable.build("blocks", 0.0, kept)
        return tables

    def blocks(self) -> tuple[list[Block], list[list[Block | None]]]:
        fixed, levels = super().blocks()
        return fixed, [[(g.kind, 0), *lv] for g, lv in zip(self.genes, levels, strict=True)]

    def describe(self, candidate: Sequence[int]) -> dict[str, dict[str, Any]]:
        return {
            g.name: {"kept": False, "keep": 0.0}
            if level == 0
            else {"kept": True, **self.detail(gi, level - 1)}
            for gi, (g, level) in enumerate(zip(self.genes, candidate, strict=True))
        }

    def priors(self) -> dict[str, Any]:
        out = super().priors()
        out["units"] = [[0, *u] for u in out["units"]]
        return out
