"""Allocation heuristics people use today, as one-shot algorithms (and seeds for ``evo``).

- ``owl``: Outlier-Weighted Layerwise sparsity (Yin et al., 2024) for the ``sparsity`` space.
  Each decoder layer's density is set from its outlier ratio (the share of weights whose Wanda
  score exceeds M = 5 times the layer's mean, computed by the space): ratios are scaled to
  [0, 2 lambda] (lambda = 0.08, the paper's defaults), shifted so that they average to the
  target density, and every projection of the layer takes the level nearest its layer's
  density.
- ``flap``: a one-shot, FLAP-style global ranking for ``width``: every KV group and MLP
  neuron has the space's activation-aware score; scores are standardised within each layer's
  attention and MLP (as FLAP does) and one global threshold keeps the units above it, the
  lowest threshold that meets the budget.
- ``additive``: scores each gene's levels alone (the rest of the model dense), assumes the
  errors add up, and solves the budgeted allocation exactly by dynamic programming (a
  multiple-choice knapsack over the first budgeted metric). This is the error-additivity
  assumption EvoPress argues against.

Every allocation is rounded to the space's levels, then repaired and filled to the budget
like any candidate (``Problem.repair`` / ``Problem.fill``), and scored at full fidelity.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from searcher.algorithms.base import Algorithm, Request, Result
from searcher.algorithms.stages import first_stage_windows
from searcher.errors import SearcherError
from searcher.problem import Candidate, Problem

OWL_LAMBDA = 0.08


class OneShot(Algorithm):
    """Computes one candidate (``allocate``) and scores it at full fidelity."""

    baseline = True
    needs: ClassVar[str] = ""  # the Problem prior it reads, if any

    def __init__(self, problem: Problem, seed: int, full_windows: int) -> None:
        super().__init__(problem, seed, full_windows)
        if self.needs and self.needs not in problem.priors:
            raise SearcherError(
                f"--algo {self.name} works on the {self.spaces} space, not "
                f"{problem.space_name or 'this one'}"
            )
        self.chosen: Candidate | None = None

    def allocate(self) -> Candidate:
        raise NotImplementedError

    def ask(self) -> list[Request]:
        if self.done:
            return []
        if self.chosen is None:
            self.chosen = self.problem.to_budget(self.allocate(), self.rng)
        return [Request(self.chosen, self.full_windows)]

    def tell(self, results: list[Result]) -> None:
        self.done = True


def nearest_levels(problem: Problem, fractions: np.ndarray) -> Candidate:
    """Per gene, the level whose kept fraction is nearest the wanted one (ties upward)."""
    return tuple(
        int(np.argmin([abs(k - f) - 1e-12 * k for k in keep]))
        for keep, f in zip(problem.keep, fractions, strict=True)
    )


class OWL(OneShot):
    name = "owl"
    needs = "outlier_ratio"
    spaces = "sparsity"

    def __init__(
        self, problem: Problem, seed: int, full_windows: int, lam: float = OWL_LAMBDA
    ) -> None:
        super().__init__(problem, seed, full_windows)
        self.lam = lam

    def densities(self) -> np.ndarray:
        """OWL's per-gene density: outlier ratios scaled to [0, 2 lambda], centred on the
        target density (the uniform allocation's mean kept fraction under the budget)."""
        ratio = np.asarray(self.problem.priors["outlier_ratio"], dtype=float)
        span = ratio.max() - ratio.min()
        scaled = (ratio - ratio.min()) / span * 2 * self.lam if span > 0 else 0 * ratio
        uniform = self.problem.uniform()
        target = float(np.mean([k[g] for k, g in zip(self.problem.keep, uniform)]))
        return np.clip(scaled - scaled.mean() + target, 0.0, 1.0)

    def allocate(self) -> Candidate:
        return nearest_levels(self.problem, self.densities())


class FLAP(OneShot):
    name = "flap"
    needs = "unit_scores"
    spaces = "width"

    def allocation(self, z: list[np.ndarray], threshold: float) -> Candidate:
        """Per gene, the level keeping the count of units scoring at least ``threshold``
        nearest (at least the lowest level)."""
        units = self.problem.priors["units"]
        genes = []
        for scores, counts in zip(z, units, strict=True):
            kept = int((scores >= threshold).sum())
            genes.append(int(np.argmin([abs(c - kept) - 1e-9 * c for c in counts])))
        return tuple(genes)

    def standardised(self) -> list[np.ndarray]:
        """Each gene's unit scores standardised within the gene (one layer's attention or
        MLP), as FLAP standardises per layer and structure: raw activation-aware scores grow
        with depth along with the residual stream, so unstandardised they would rank every
        unit of the last layers above every unit of the first."""
        out = []
        for s in self.problem.priors["unit_scores"]:
            s = np.asarray(s, dtype=float)
            out.append((s - s.mean()) / (s.std() or 1.0))
        return out

    def allocate(self) -> Candidate:
        z = self.standardised()
        thresholds = np.unique(np.concatenate(z))  # ascending: keeping most first
        lo, hi = 0, len(thresholds) - 1
        if not self.problem.feasible(self.allocation(z, thresholds[hi])):
            return self.allocation(z, thresholds[hi])  # the smallest it can do; repair lowers
        while lo < hi:  # the lowest threshold (most kept) that meets the budget
            mid = (lo + hi) // 2
            if self.problem.feasible(self.allocation(z, thresholds[mid])):
                hi = mid
            else:
                lo = mid + 1
        return self.allocation(z, thresholds[lo])


class Additive(OneShot):
    name = "additive"
    reads = ("stages", "evals")

    def __init__(
        self, problem: Problem, seed: int, full_windows: int, windows: int = 1,
        levels_per_gene: int = 6, bins: int = 4000,
    ) -> None:  # fmt: skip
        super().__init__(problem, seed, full_windows)
        self.windows = windows
        self.bins = bins
        dense = problem.dense()
        self.scored: list[list[int]] = []  # per gene, the levels scored alone
        for top in dense:
            if top == 0:
                self.scored.append([])
                continue
            picks = np.unique(np.round(np.linspace(0, top - 1, min(levels_per_gene, top))))
            self.scored.append([int(x) for x in picks])
        self.profile = [self.alone(g, lv) for g, levels in enumerate(self.scored) for lv in levels]
        self.errors: dict[Candidate, float] = {}

    def alone(self, gene: int, level: int) -> Candidate:
        """Dense but for ``gene`` at ``level``."""
        return tuple(level if j == gene else d for j, d in enumerate(self.problem.dense()))

    @classmethod
    def configure(cls, problem, seed, full_windows, settings):
        windows = min(full_windows, first_stage_windows(settings.get("stages")))
        algo = cls(problem, seed, full_windows, windows=windows)
        need = algo.evaluations()
        if settings.get("evals") is not None and settings["evals"] < need:
            raise SearcherError(
                f"additive scores {len(algo.profile)} levels alone ({need:g} full-fidelity-"
                f"equivalent evaluations with its final candidate): raise --evals to {need:g}"
            )
        return algo

    def evaluations(self) -> float:
        """Full-fidelity-equivalent evaluations it spends: every profile, then the result."""
        return len(self.profile) * self.windows / self.full_windows + 1

    def ask(self) -> list[Request]:
        if not self.errors and self.profile:
            return [Request(c, self.windows) for c in self.profile]
        return super().ask()

    def tell(self, results: list[Result]) -> None:
        if not self.errors and self.profile:
            self.errors = {r.candidate: r.kl for r in results}
            return
        self.done = True

    def error_table(self) -> list[np.ndarray]:
        """Per gene and level, the KL with only that gene lowered; levels not scored are
        interpolated linearly in their kept fraction, the dense level is 0."""
        dense = self.problem.dense()
        table = []
        for g, levels in enumerate(self.scored):
            keep = np.asarray(self.problem.keep[g], dtype=float)
            xs = [keep[lv] for lv in levels] + [keep[dense[g]]]
            ys = [self.errors[self.alone(g, lv)] for lv in levels] + [0.0]
            order = np.argsort(xs)
            table.append(np.interp(keep, np.asarray(xs)[order], np.asarray(ys)[order]))
        return table

    def allocate(self) -> Candidate:
        return knapsack(self.problem, self.error_table(), self.bins)

    def status(self) -> str:
        return "scoring levels alone" if not self.errors else "solved"


def knapsack(problem: Problem, errors: list[np.ndarray], bins: int) -> Candidate:
    """Minimise the summed error under the first budgeted metric: a multiple-choice knapsack
    solved by dynamic programming over ``bins`` capacity steps. Weights are rounded down, so
    the table holds every truly feasible allocation; the answer is the best one, walking down
    from full capacity, whose exact cost meets the limit. Other limits are left to repair."""
    metric, limit = next(iter(problem.budget.limits.items()))
    table = problem.costs[metric]
    lows = np.array([t.min() for t in table.levels])
    room = limit * table.dense() * (1 + 1e-9) - table.base - lows.sum()  # above the minimum
    if room <= 0:
        return tuple(int(np.argmin(t)) for t in table.levels)
    step = room / bins
    weights = [np.floor((t - t.min()) / step + 1e-9).astype(int) for t in table.levels]
    best = np.zeros(bins + 1)  # best[c]: least error of the genes so far within weight c
    choice = np.zeros((len(errors), bins + 1), dtype=np.int16)
    for g, (err, w_g) in enumerate(zip(errors, weights, strict=True)):
        new = np.full(bins + 1, np.inf)
        for lv, (w, e) in enumerate(zip(w_g, err)):
            if w > bins:
                continue
            cand = np.full(bins + 1, np.inf)
            cand[w:] = best[: bins + 1 - w] + e
            better = cand < new
            new[better] = cand[better]
            choice[g][better] = lv
        best = new
    for top in range(bins, -1, -1):
        genes, c = [], top
        for g in range(len(errors) - 1, -1, -1):
            lv = int(choice[g][c])
            genes.append(lv)
            c -= int(weights[g][lv])
        genes.reverse()
        if table.cost(genes) <= limit * table.dense() * (1 + 1e-9):
            return tuple(genes)
    return tuple(int(np.argmin(t)) for t in table.levels)


# --init choices for evo: the allocation its search starts from (None: uniform, built in)
SEEDS: dict[str, type[OneShot] | None] = {
    "uniform": None,
    "owl": OWL,
    "flap": FLAP,
    "additive": Additive,
}
