"""The search problem as algorithms see it: genes, levels, additive costs and a budget.

Algorithms import this and nothing that knows about torch, models or workers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from latency_models.table import CostTable
from searcher.budget import KEYS, Budget
from searcher.errors import SearcherError

Candidate = tuple[int, ...]
"""A gene vector: one level index per gene, 0 = most compressed, last = dense."""


@dataclass(frozen=True)
class Problem:
    n_levels: tuple[int, ...]
    costs: Mapping[str, CostTable]
    budget: Budget
    keep: tuple[tuple[float, ...], ...]  # fraction of each gene's unit kept at each level
    space_name: str = ""
    priors: Mapping[str, Any] = field(default_factory=dict)  # SearchSpace.priors()
    layers: tuple[int, ...] = ()  # each gene's decoder layer (empty: not known)

    def __post_init__(self) -> None:
        for metric in sorted(self.budget.metrics):
            if metric not in self.costs:
                key = next((k for k, (m, _) in KEYS.items() if m == metric), metric)
                raise SearcherError(
                    f"the {self.space_name or 'chosen'} space cannot be budgeted by {key!r} "
                    f"here; budget one of: {', '.join(self.budget_keys())}"
                )
        dense = {m: t.dense() for m, t in self.costs.items()}
        object.__setattr__(self, "budget", self.budget.resolved(dense))
        floor = self.minimum_fractions()
        reasons = self.budget.violations(floor)
        if reasons:
            raise SearcherError(
                f"budget {self.budget.text} is infeasible for the {self.space_name} space: even "
                f"the most compressed candidate has {'; '.join(reasons)}. Raise the budget."
            )

    def budget_keys(self) -> list[str]:
        return [k for k, (metric, _) in KEYS.items() if metric in self.costs]

    @property
    def n_genes(self) -> int:
        return len(self.n_levels)

    def dense(self) -> Candidate:
        return tuple(n - 1 for n in self.n_levels)

    def cost(self, genes: Sequence[int]) -> dict[str, float]:
        return {m: t.cost(genes) for m, t in self.costs.items()}

    def fractions(self, genes: Sequence[int]) -> dict[str, float]:
        return self.fractions_of(self.cost(genes))

    def fractions_of(self, costs: Mapping[str, float]) -> dict[str, float]:
        """Costs as fractions of the dense model's (for costs measured rather than tabled)."""
        return {m: costs[m] / t.dense() for m, t in self.costs.items()}

    def minimum_fractions(self) -> dict[str, float]:
        return {m: t.minimum() / t.dense() for m, t in self.costs.items()}

    def feasible(self, genes: Sequence[int]) -> bool:
        return self.budget.satisfied(self.fractions(genes))

    def _slack(self, genes: Sequence[int]) -> dict[str, float]:
        """Budget left per limited metric, in absolute cost units."""
        return {
            m: limit * self.costs[m].dense() - self.costs[m].cost(genes)
            for m, limit in self.budget.limits.items()
        }

    def repair(self, genes: Sequence[int], rng: np.random.Generator) -> Candidate:
        """Lower random genes until the budget holds. Ends: every step lowers a level."""
        g = list(genes)
        while True:
            over = [m for m, s in self._slack(g).items() if s < -1e-9 * self.costs[m].dense()]
            if not over:
                return tuple(g)
            helps = np.zeros(len(g), dtype=bool)
            for m in over:
                helps |= self.costs[m].lower_deltas(g) > 0
            choices = np.flatnonzero(helps)
            if choices.size == 0:  # cannot happen when the budget passed __post_init__
                raise SearcherError(f"cannot meet budget {self.budget.text}")
            g[int(rng.choice(choices))] -= 1

    def fill(self, genes: Sequence[int], rng: np.random.Generator) -> Candidate:
        """Raise random genes while the budget still holds, so no single raise fits after."""
        g = list(genes)
        while True:
            fits = np.array([n - 1 > x for n, x in zip(self.n_levels, g)])
            for m, s in self._slack(g).items():
                fits &= self.costs[m].raise_deltas(g) <= s + 1e-9 * self.costs[m].dense()
            choices = np.flatnonzero(fits)
            if choices.size == 0:
                return tuple(g)
            g[int(rng.choice(choices))] += 1

    def to_budget(self, genes: Sequence[int], rng: np.random.Generator) -> Candidate:
        """Repaired (lowered until feasible), then filled (raised while it still fits)."""
        return self.fill(self.repair(genes, rng), rng)

    def random(self, rng: np.random.Generator) -> Candidate:
        """A random feasible candidate near the budget (uniform levels, repaired, filled)."""
        g = [int(rng.integers(0, n)) for n in self.n_levels]
        return self.to_budget(g, rng)

    def uniform(self) -> Candidate:
        """The same kept fraction everywhere, as large as the budget allows.

        ``keep[g][l]`` is the fraction of gene g's unit kept at level l. Each gene takes the
        level whose kept fraction is nearest the common fraction (ties upward); the common
        fraction is the largest one, on the union of all genes' grids, that meets the budget.
        """
        grid = sorted({float(f) for row in self.keep for f in row}, reverse=True)
        for target in grid:
            genes = tuple(
                int(np.argmin([abs(f - target) - 1e-12 * f for f in row])) for row in self.keep
            )
            if self.feasible(genes):
                break
        else:
            raise SearcherError(f"no uniform candidate meets budget {self.budget.text}")
        if not any(genes):
            # Coarse grids (keep/drop) make "the same level everywhere" all-or-nothing: keep
            # what fits instead, spread evenly through the network.
            genes = self._spread_fill(genes)
        return genes

    def _spread_fill(self, genes: Sequence[int]) -> Candidate:
        """Raise genes one level at a time in an evenly spread order while they fit."""
        n = len(genes)
        bits = max(1, (n - 1).bit_length())
        order = sorted(range(n), key=lambda i: int(f"{i:0{bits}b}"[::-1], 2))
        g = list(genes)
        changed = True
        while changed:
            changed = False
            for i in order:
                if g[i] + 1 < self.n_levels[i]:
                    g[i] += 1
                    if self.feasible(g):
                        changed = True
                    else:
                        g[i] -= 1
        return tuple(g)

    def mutate(self, genes: Sequence[int], rng: np.random.Generator, switches: int) -> Candidate:
        """EvoPress level switch: lower one gene and raise another, ``switches`` times.

        With unequal unit costs a switch can overshoot or undershoot the budget, so the child is
        repaired (lowered until feasible) and filled (raised while it fits) afterwards.
        """
        g = list(genes)
        for _ in range(switches):
            down = [i for i, x in enumerate(g) if x > 0]
            if not down:
                break
            i = int(rng.choice(down))
            up = [j for j, x in enumerate(g) if j != i and x < self.n_levels[j] - 1]
            if not up:
                break
            j = int(rng.choice(up))
            g[i] -= 1
            g[j] += 1
        return self.to_budget(g, rng)
