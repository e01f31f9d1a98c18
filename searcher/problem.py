"""The search problem as algorithms see it: genes, levels, additive costs and a budget.

Algorithms import this and nothing that knows about torch, models or workers.

Costs need not grow with the level. A latency table measured on a GPU, or with some quantized
kernels, can time a larger block faster than a smaller one, so the cheapest level of a gene
may be any level. Repair therefore moves genes towards their cheapest levels (whichever way
that is), fill raises a gene to any higher level that still fits, and the feasibility check
and fallbacks work from the cheapest candidate (``floor``), not from level 0. On tables whose
costs do grow with the level (every analytic table) each of these does exactly what the
level-0-is-cheapest versions did, with the same random draws: same seed, same candidates.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from latency_models.table import CostTable
from searcher.budget import KEYS, Budget
from searcher.errors import SearcherError

Candidate = tuple[int, ...]
"""A gene vector: one level index per gene, 0 = most compressed, last = dense."""

TOLERANCE = 1e-9  # of the dense cost: a cost over its limit by at most this meets it (Budget's)


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
        reasons = self.budget.violations(self.minimum_fractions())
        if reasons:
            raise SearcherError(
                f"budget {self.budget.text} is infeasible for the {self.space_name} space: even "
                f"the cheapest candidate has {'; '.join(reasons)}. Raise the budget."
            )
        if not self.feasible(self.floor()):
            # Only with several limits whose cheapest levels differ (see ``floor``).
            reasons = self.budget.violations(self.fractions(self.floor()))
            raise SearcherError(
                f"budget {self.budget.text} looks infeasible for the {self.space_name} space: "
                "each limit can be met alone, but no candidate was found that meets them "
                f"together (the nearest has {'; '.join(reasons)}). Raise the budget or drop "
                "a limit."
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
        """Each metric's least cost (each gene at its cheapest level for that metric), as a
        fraction of dense. With several metrics these may belong to different candidates."""
        return {m: t.minimum() / t.dense() for m, t in self.costs.items()}

    def feasible(self, genes: Sequence[int]) -> bool:
        return self.budget.satisfied(self.fractions(genes))

    def floor(self) -> Candidate:
        """The cheapest candidate under the budget's limits (each gene at its cheapest level,
        whichever that is): feasible whenever any candidate is, for one limited metric or
        several that agree on each gene's cheapest level; else the best a search found
        (``_cheapest``). Repair falls back to it."""
        return self._floor

    @cached_property
    def _floor(self) -> Candidate:
        return self._cheapest()

    def _cheapest(self) -> Candidate:
        """Per gene, the level of least cost in the limited metrics.

        One limited metric: each gene at its cheapest level, which minimises the (additive)
        cost, so it is feasible whenever any candidate is. Several limited metrics: where
        every gene has a level that is cheapest in all of them at once (always so when costs
        grow with the level: level 0), those levels minimise every metric together, and
        again are feasible whenever anything is. Otherwise the limits pull a gene different
        ways (e.g. a latency that falls with size under a FLOPs limit too), and whether any
        candidate meets them all is a multi-dimensional knapsack question, NP-complete in
        general: the floor is then the best found by a search, not a proof (``_search``)."""
        limited = list(self.budget.limits)
        matrices = [self.costs[m].matrix for m in limited]
        if len(limited) == 1:
            return self.costs[limited[0]].cheapest()
        at_min = np.ones_like(matrices[0], dtype=bool)
        for a in matrices:
            at_min &= a <= a.min(axis=1, keepdims=True)
        if at_min.any(axis=1).all():
            return tuple(int(x) for x in at_min.argmax(axis=1))
        return self._search(limited)

    def _search(self, limited: list[str]) -> Candidate:
        """A candidate meeting several limits that disagree on genes' cheapest levels.

        First, per gene the level of least weighted cost, for weights on a grid over the
        metrics (each cost a fraction of its dense one), repaired where it misses (cheap, and
        enough unless the budget is near the edge of what is feasible). Then, if none fits,
        for each limited metric a multiple-choice knapsack (``knapsack``) that keeps it
        within its limit while minimising the others (weighted, on a grid): for two metrics
        this finds a feasible candidate whenever one exists, up to the knapsack's
        discretisation of the constrained metric. Of all found, the feasible one furthest
        within its limits, or when none is, the nearest to them (for the refusal)."""
        valid = np.isfinite(self.costs[limited[0]].matrix)
        scaled = {
            m: np.where(valid, self.costs[m].matrix / self.costs[m].dense(), 0.0) for m in limited
        }

        def least(weights: Sequence[float], metrics: Sequence[str]) -> np.ndarray:
            total = sum(w * scaled[m] for w, m in zip(weights, metrics, strict=True))
            return np.where(valid, total, np.inf)

        steps = {1: 1, 2: 32, 3: 12}
        found: dict[Candidate, None] = {}
        for weights in _simplex(len(limited), steps.get(len(limited), 4)):
            found.setdefault(tuple(int(x) for x in least(weights, limited).argmin(axis=1)))
        rng = np.random.default_rng(0)
        for c in list(found):
            if not self.feasible(c):
                g, _ = self._descend(c, rng, self._max_steps)
                found.setdefault(tuple(g))
        if not any(self.feasible(c) for c in found):
            for metric in limited:
                table = self.costs[metric]
                others = [m for m in limited if m != metric]
                rows = [t[:n] for t, n in zip(table.matrix, self.n_levels, strict=True)]
                room = self.budget.limits[metric] * table.dense() * (1 + TOLERANCE) - table.base
                for weights in _simplex(len(others), steps.get(len(others), 4)):
                    objective = least(weights, others)
                    errors = [e[:n] for e, n in zip(objective, self.n_levels, strict=True)]
                    choice = knapsack(rows, errors, room, bins=2000)
                    if choice is not None:
                        found.setdefault(tuple(int(x) for x in choice))

        def excess(c: Candidate) -> tuple[float, float]:
            f = self.fractions(c)
            ratios = [f[m] / self.budget.limits[m] for m in limited]
            return sum(max(r - 1.0, 0.0) for r in ratios), max(ratios)

        return min(found, key=excess)

    @cached_property
    def _max_steps(self) -> int:
        """Repair steps before it goes straight for the floor: more than a repair on costs that
        grow with the level can take (one level down per step)."""
        return sum(self.n_levels)

    def _over(self, genes: Sequence[int]) -> list[str]:
        """The limited metrics the candidate breaks."""
        return [m for m, s in self._slack(genes).items() if s < -TOLERANCE * self.costs[m].dense()]

    def _slack(self, genes: Sequence[int]) -> dict[str, float]:
        """Budget left per limited metric, in absolute cost units."""
        return {
            m: limit * self.costs[m].dense() - self.costs[m].cost(genes)
            for m, limit in self.budget.limits.items()
        }

    def _step(self, gene: int, level: int, over: Sequence[str]) -> int:
        """Where repair moves ``gene`` from ``level``: towards the level cheapest in the
        violated metrics ``over`` (each a fraction of its dense cost, summed), to the
        nearest level on the way that costs no more than this one. Where costs grow with the
        level, that is one level down."""
        n = self.n_levels[gene]
        rows = [self.costs[m].matrix[gene, :n] for m in over]
        cost = sum(r / self.costs[m].dense() for r, m in zip(rows, over, strict=True))
        target = int(np.argmin(cost))
        if not cost[target] < cost[level]:
            # the violated metrics pull this gene different ways: follow one it can cut
            cost = next(r for r in rows if r.min() < r[level])
            target = int(np.argmin(cost))
        way = 1 if target > level else -1
        return next(lv for lv in range(level + way, target + way, way) if cost[lv] <= cost[level])

    def _descend(
        self, genes: Sequence[int], rng: np.random.Generator, steps: int
    ) -> tuple[list[int], bool]:
        """Repair's walk: a random gene that can cut a violated cost moves towards its
        cheapest level (``_step``), until the budget holds (True), no gene can cut one, or
        ``steps`` are spent (False)."""
        g = list(genes)
        for _ in range(steps):
            over = self._over(g)
            if not over:
                return g, True
            helps = np.zeros(len(g), dtype=bool)
            for m in over:
                helps |= self.costs[m].savings(g) > 0
            choices = np.flatnonzero(helps)
            if choices.size == 0:
                return g, False
            i = int(rng.choice(choices))
            g[i] = self._step(i, g[i], over)
        return g, not self._over(g)

    def repair(self, genes: Sequence[int], rng: np.random.Generator) -> Candidate:
        """Move random genes towards their cheapest levels until the budget holds.

        With one limited metric the walk (``_descend``) ends feasible: every gene that can
        cut the cost does, until none can, and then all are at the floor. With several, a
        move that cuts a violated cost can raise another where costs do not grow with the
        level, and the walk can trade one violation for another; when it stops short, the
        repair moves genes to their floor levels instead (those that cut the excess first),
        which ends feasible at the latest at the floor (``__post_init__`` checked it)."""
        g, ok = self._descend(genes, rng, self._max_steps)
        if ok:
            return tuple(g)
        floor = self.floor()
        limited = list(self.budget.limits)
        rows = np.arange(len(g))
        while self._over(g):
            differ = np.array([x != f for x, f in zip(g, floor, strict=True)])
            if not differ.any():  # cannot happen: __post_init__ checked the floor
                raise SearcherError(f"cannot meet budget {self.budget.text}")
            # prefer the genes whose floor level cuts the excess over the limits
            now = np.array([-self._slack(g)[m] for m in limited])
            after = np.zeros(len(g))
            for m, e in zip(limited, now, strict=True):
                a = self.costs[m].matrix
                after += np.maximum(e + a[rows, floor] - a[rows, g], 0.0) / self.costs[m].dense()
            before = sum(max(e, 0.0) / self.costs[m].dense() for m, e in zip(limited, now))
            better = differ & (after < before)
            i = int(rng.choice(np.flatnonzero(better if better.any() else differ)))
            g[i] = floor[i]
        return tuple(g)

    def fill(self, genes: Sequence[int], rng: np.random.Generator) -> Candidate:
        """Raise random genes while the budget still holds, so that no gene can be raised to
        any higher level after. A gene goes to the nearest higher level that fits (where costs
        grow with the level: the next one; where they do not, a level further up can fit
        where the next does not)."""
        g = list(genes)
        rows = np.arange(len(g))
        levels = np.arange(max(self.n_levels))[None, :]
        while True:
            fits = levels > np.array(g)[:, None]  # padded levels never fit: they cost inf
            for m, s in self._slack(g).items():
                a = self.costs[m].matrix
                fits &= a - a[rows, g][:, None] <= s + TOLERANCE * self.costs[m].dense()
            choices = np.flatnonzero(fits.any(axis=1))
            if choices.size == 0:
                return tuple(g)
            i = int(rng.choice(choices))
            g[i] = int(np.argmax(fits[i]))

    def to_budget(self, genes: Sequence[int], rng: np.random.Generator) -> Candidate:
        """Repaired (moved towards cheaper levels until feasible), then filled (raised while
        it still fits)."""
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
        Where none does (costs that fall with the level can make every common fraction too
        expensive), the common fraction nearest the budget, repaired (deterministically).
        """
        grid = sorted({float(f) for row in self.keep for f in row}, reverse=True)
        tried = []
        for target in grid:
            genes = tuple(
                int(np.argmin([abs(f - target) - 1e-12 * f for f in row])) for row in self.keep
            )
            if self.feasible(genes):
                break
            tried.append(genes)
        else:
            nearest = min(tried, key=self._excess)  # the first (largest fraction) on ties
            genes = self.repair(nearest, np.random.default_rng(0))
        if not any(genes):
            # Coarse grids (keep/drop) make "the same level everywhere" all-or-nothing: keep
            # what fits instead, spread evenly through the network.
            genes = self._spread_fill(genes)
        return genes

    def _excess(self, genes: Sequence[int]) -> float:
        """How far the candidate is over its limits, summed (fractions of dense)."""
        f = self.fractions(genes)
        return sum(max(f[m] - limit, 0.0) for m, limit in self.budget.limits.items())

    @cached_property
    def _rising(self) -> tuple[bool, ...]:
        """Per gene, whether every limited cost grows (or stays) with the level."""
        return tuple(
            all(bool(np.all(np.diff(self.costs[m].levels[i]) >= 0)) for m in self.budget.limits)
            for i in range(self.n_genes)
        )

    def _spread_fill(self, genes: Sequence[int]) -> Candidate:
        """Raise genes in an evenly spread order while they fit: each to the nearest higher
        level that fits (the next one, where its costs grow with the level)."""
        n = len(genes)
        bits = max(1, (n - 1).bit_length())
        order = sorted(range(n), key=lambda i: int(f"{i:0{bits}b}"[::-1], 2))
        g = list(genes)
        changed = True
        while changed:
            changed = False
            for i in order:
                # where costs grow with the level, if the next level does not fit, none above does
                top = g[i] + 2 if self._rising[i] else self.n_levels[i]
                for lv in range(g[i] + 1, min(top, self.n_levels[i])):
                    before, g[i] = g[i], lv
                    if self.feasible(g):
                        changed = True
                        break
                    g[i] = before
        return tuple(g)

    def mutate(self, genes: Sequence[int], rng: np.random.Generator, switches: int) -> Candidate:
        """EvoPress level switch: lower one gene and raise another, ``switches`` times.

        With unequal unit costs a switch can overshoot or undershoot the budget, so the child is
        repaired (moved to cheaper levels until feasible) and filled (raised while it fits)
        afterwards.
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


def _simplex(k: int, steps: int) -> Iterator[tuple[float, ...]]:
    """Weights of ``k`` parts on a grid of ``1 / steps``, summing to 1."""
    for cuts in itertools.combinations(range(steps + k - 1), k - 1):
        parts = np.diff([-1, *cuts, steps + k - 1]) - 1
        yield tuple(float(p) / steps for p in parts)


def knapsack(
    costs: list[np.ndarray], errors: list[np.ndarray], room: float, bins: int,
    exact: Callable[[Sequence[int]], float] | None = None,
) -> list[int] | None:  # fmt: skip
    """One option per item minimising the summed error with the summed cost within ``room``:
    a multiple-choice knapsack by dynamic programming over ``bins`` capacity steps.

    Costs are rounded down, so the table holds every truly feasible choice; the answer is
    the best one, walking down from full capacity, whose exact cost (``exact``, default the
    sum of ``costs``) fits. With no room above the cheapest options, the cheapest options;
    None when every choice that fits has an infinite error."""
    exact = exact or (lambda c: float(sum(cost[i] for cost, i in zip(costs, c))))
    cheapest = [int(np.argmin(c)) for c in costs]
    lows = np.array([c.min() for c in costs])
    free = room - lows.sum()
    if free <= 0:
        return cheapest
    step = free / bins
    weights = [np.floor((c - c.min()) / step + 1e-9).astype(int) for c in costs]
    best = np.zeros(bins + 1)  # best[w]: least error of the items so far within weight w
    choice = np.zeros((len(errors), bins + 1), dtype=np.int16)
    for i, (err, w_i) in enumerate(zip(errors, weights, strict=True)):
        new = np.full(bins + 1, np.inf)
        for option, (w, e) in enumerate(zip(w_i, err)):
            if w > bins:
                continue
            cand = np.full(bins + 1, np.inf)
            cand[w:] = best[: bins + 1 - w] + e
            better = cand < new
            new[better] = cand[better]
            choice[i][better] = option
        best = new
    if not np.isfinite(best).any():
        return None  # every choice within room has an unknown (infinite) error
    for top in (c for c in range(bins, -1, -1) if np.isfinite(best[c])):
        picked, w = [], top
        for i in range(len(errors) - 1, -1, -1):
            option = int(choice[i][w])
            picked.append(option)
            w -= int(weights[i][option])
        picked.reverse()
        if exact(picked) <= room:
            return picked
    return cheapest
