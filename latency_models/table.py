"""An additive cost table: a constant plus one term per gene and level."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class CostTable:
    """Cost of a candidate = ``base + sum(levels[g][candidate[g]])`` for one metric.

    ``levels[g]`` is ordered like the gene's levels (index 0 = most compressed). Costs need
    not grow with the level: a measured latency table can time a larger block faster (GPU
    kernels that prefer some sizes, quantized kernels), so nothing here assumes they do.
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
        """The least cost any candidate has: each gene at its cheapest level, whichever that
        is (not necessarily level 0)."""
        return self.base + float(sum(t.min() for t in self.levels))

    def cheapest(self) -> tuple[int, ...]:
        """Per gene, its level of least cost (the lowest such level on ties)."""
        return tuple(int(np.argmin(t)) for t in self.levels)

    @cached_property
    def matrix(self) -> np.ndarray:
        """The costs as one array, gene by level, padded with inf past a gene's last level."""
        width = max((len(t) for t in self.levels), default=0)
        out = np.full((len(self.levels), width), np.inf)
        for g, t in enumerate(self.levels):
            out[g, : len(t)] = t
        return out

    def savings(self, genes: Sequence[int]) -> np.ndarray:
        """Cost that moving each gene to its cheapest level removes (0 where it is there).

        Any level, not just lower ones and not just one level away: in a measured latency
        table neighbouring levels can cost the same, and a block can time faster at a larger
        size, so a repair that looks only one level down stops over budget with cheaper
        levels elsewhere."""
        return np.array([t[g] - t.min() for t, g in zip(self.levels, genes, strict=True)])
