"""An additive cost table: a constant plus one term per gene and level."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CostTable:
    """Cost of a candidate = ``base + sum(levels[g][candidate[g]])`` for one metric.

    ``levels[g]`` is ordered like the gene's levels (index 0 = most compressed).
    """

    metric: str
    base: float
    levels: tuple[np.ndarray, ...]

    @classmethod
    def build(cls, metric: str, base: float, levels: Sequence[Sequence[float]]) -> CostTable:
        return cls(metric, float(base), tuple(np.asarray(v, dtype=np.float64) for v in levels))

    def cost(self, genes: Sequence[int]) -> float:
        return self.base + float(sum(t[g] for t, g in zip(self.levels, genes, strict=True)))

    def dense(self) -> float:
        return self.base + float(sum(t[-1] for t in self.levels))

    def minimum(self) -> float:
        return self.base + float(sum(t.min() for t in self.levels))

    def raise_deltas(self, genes: Sequence[int]) -> np.ndarray:
        """Cost added by raising each gene one level (inf where it is already at the top)."""
        return np.array(
            [t[g + 1] - t[g] if g + 1 < len(t) else np.inf for t, g in zip(self.levels, genes)]
        )

    def lower_deltas(self, genes: Sequence[int]) -> np.ndarray:
        """Cost that lowering each gene can remove: down to its cheapest lower level (0 where
        none is cheaper). Not just one level down: in a measured latency table neighbouring
        levels can cost the same, and a repair that lowers only genes whose next level is
        cheaper would stop over budget with cheaper levels further down."""
        return np.array(
            [max(t[g] - t[:g].min(), 0.0) if g > 0 else 0.0 for t, g in zip(self.levels, genes)]
        )
