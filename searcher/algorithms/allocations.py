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
- ``frequency``: for the ``experts`` space, the usual expert-pruning rule: drop the
  least-routed experts model-wide (one global threshold on routing frequency).
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
from searcher.algorithms.profile import SPLIT_EXPONENTS, Profile, plan
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


class ExpertFrequency(FLAP):
    """The usual expert-pruning heuristic: drop the least-routed experts model-wide. One
    global threshold on routing frequency (the share of calibration tokens the router sends
    to an expert: comparable across layers, as every layer routes every token to its top k)
    keeps the experts above it, the lowest threshold that meets the budget. With the experts
    space's ``order=frequency`` the experts kept are exactly the most-routed ones; with its
    default order each layer keeps as many, ranked by contribution."""

    name = "frequency"
    needs = "expert_frequency"
    spaces = "experts"

    def standardised(self) -> list[np.ndarray]:
        return [np.asarray(f, dtype=float) for f in self.problem.priors["expert_frequency"]]


class Additive(OneShot):
    """The full single-gene profile (EvoPress's additive baseline): ``levels_per_gene``
    levels spread over each gene's whole range, then the knapsack."""

    name = "additive"
    reads = ("stages", "evals")

    def __init__(
        self, problem: Problem, seed: int, full_windows: int, windows: int = 1,
        levels_per_gene: int = 6, bins: int = 4000,
    ) -> None:  # fmt: skip
        super().__init__(problem, seed, full_windows)
        self.bins = bins
        singles = tuple((g,) for g in range(problem.n_genes))
        bare = Profile(problem, singles, tuple(() for _ in singles), windows)
        picks = []
        for options in bare.options:  # levels spread over the range below dense
            below = len(options) - 1
            spread = np.linspace(0, below - 1, min(levels_per_gene, below))
            picks.append(tuple(int(x) for x in np.unique(np.round(spread))))
        self.profile = Profile(problem, singles, tuple(picks), windows)
        self.scores: dict[Candidate, float] = {}

    @classmethod
    def configure(cls, problem, seed, full_windows, settings):
        windows = min(full_windows, first_stage_windows(settings.get("stages")))
        algo = cls(problem, seed, full_windows, windows=windows)
        need = algo.evaluations()
        if settings.get("evals") is not None and settings["evals"] < need:
            raise SearcherError(
                f"additive scores {len(algo.profile.candidates())} levels alone ({need:g} "
                f"full-fidelity-equivalent evaluations with its final candidate): raise --evals "
                f"to {need:g}, or use the default --algo evo, which sizes its profile to --evals"
            )
        return algo

    def evaluations(self) -> float:
        """Full-fidelity-equivalent evaluations it spends: every profile, then the result."""
        return self.profile.cost(self.full_windows) + 1

    def ask(self) -> list[Request]:
        todo = self.profile.candidates()
        if not self.scores and todo:
            return [Request(c, self.profile.windows) for c in todo]
        return super().ask()

    def tell(self, results: list[Result]) -> None:
        if not self.scores and self.profile.candidates():
            self.scores = {r.candidate: r.kl for r in results}
            return
        self.done = True

    def allocate(self) -> Candidate:
        return self.profile.solve(self.scores, "linear", self.bins)

    def shared(self) -> frozenset[Candidate]:
        return frozenset(self.profile.candidates())

    def status(self) -> str:
        return "scoring levels alone" if not self.scores else "solved"


class ProfileSeed(OneShot):
    """evo's default start: the best solution of the single-unit profiles sized to the
    run's evaluations (``profile.plan``), or the uniform allocation when none fits.

    Each profile's knapsack is solved twice, with the errors between scored levels on
    straight lines and on a power law (``profile.curve``), and where the space gives a
    ``residual_ratio`` prior (depth) a per-layer profile once more for each of
    ``SPLIT_EXPONENTS``, its errors split among the layer's blocks (``Profile.split``);
    every solution is scored on all windows and the best one starts evo. Profiles too
    big for ``--evals`` score fewer options, never refused; either way the start is
    scored on all windows, so even a run too short for one generation of evo ends with a
    result."""

    name = "profile"
    SHAPES = ("power", "linear")

    def __init__(
        self, problem: Problem, seed: int, full_windows: int, profiles: list[Profile]
    ) -> None:
        super().__init__(problem, seed, full_windows)
        self.profiles = profiles
        self.scores: dict[Candidate, float] = {}
        self.starts: list[Candidate] = []

    @classmethod
    def configure(cls, problem, seed, full_windows, settings):
        windows = min(full_windows, first_stage_windows(settings.get("stages")))
        evals = settings.get("evals")
        found = plan(problem, full_windows, windows, evals if evals is not None else np.inf)
        return cls(problem, seed, full_windows, found)

    def candidates(self) -> list[Candidate]:
        """Every profile's candidates, once each, in order."""
        return list(dict.fromkeys(c for p in self.profiles for c in p.candidates()))

    def shared(self) -> frozenset[Candidate]:
        return frozenset(self.candidates())

    def profiling(self) -> bool:
        return bool(self.profiles) and not self.scores

    def ask(self) -> list[Request]:
        if self.done:
            return []
        if self.profiling():
            windows = self.profiles[0].windows
            return [Request(c, windows) for c in self.candidates()]
        if not self.starts:
            found = [p.solve(self.scores, shape) for p in self.profiles for shape in self.SHAPES]
            shares = self.problem.priors.get("residual_ratio")
            if shares is not None:  # per-layer profiles, their errors split among the blocks
                found += [
                    p.split(self.scores, shares, exponent)
                    for p in self.profiles
                    if any(len(genes) > 1 for genes in p.groups)
                    for exponent in SPLIT_EXPONENTS
                ]
            for c in found or [self.problem.uniform()]:
                c = self.problem.to_budget(c, self.rng)
                if c not in self.starts:
                    self.starts.append(c)
        return [Request(c, self.full_windows) for c in self.starts]

    def tell(self, results: list[Result]) -> None:
        if self.profiling():
            self.scores = {r.candidate: r.kl for r in results}
            return
        self.chosen = min(results, key=lambda r: r.kl).candidate  # ties: the first
        self.done = True

    def status(self) -> str:
        if self.profiling():
            return f"profiling {len(self.candidates())} single-unit candidates"
        return "scoring the start" if not self.done else ""


# --init choices for evo: the allocation its search starts from (None: uniform, built in)
SEEDS: dict[str, type[OneShot] | None] = {
    "profile": ProfileSeed,
    "uniform": None,
    "owl": OWL,
    "flap": FLAP,
    "additive": Additive,
}
