"""pymoo's GA and NSGA-II behind the ask/tell seam: a peer optimiser from outside the project.

pymoo works on the same genes (integers in [0, n_levels - 1], one per gene) and the same
fitness (calibration KL at full fidelity; with ``--objectives kl,flops`` also the costs). Its
operators are the usual integer-coded ones: simulated binary crossover and polynomial
mutation rounded to integers (``RoundingRepair``), duplicate elimination. Every offspring
then goes through the budget repair every other algorithm uses (``Problem.repair`` and
``Problem.fill``, seeded), as a pymoo ``Repair``, so pymoo only ever proposes feasible
candidates (on KL alone every offspring is filled to the budget; with costs as objectives
only repaired ones are, so the front can spread below the budget). The first population
holds the uniform allocation, filled to the budget (where ``evo`` and the Optuna samplers
start), and random feasible candidates.

pymoo's ask/tell interface (``algorithm.ask()`` / ``algorithm.tell(infills=pop)``) drives
it; the values are handed over with a ``StaticProblem``, as pymoo's documentation does it.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np

from searcher.algorithms.base import Algorithm, Request, Result
from searcher.algorithms.samplers import parse_objectives
from searcher.problem import Candidate, Problem


@functools.cache
def _pymoo() -> SimpleNamespace:
    """pymoo and the pieces built on it, imported on first use: pymoo imports scipy, and
    importing ``searcher.algorithms`` must stay light."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.algorithms.soo.nonconvex.ga import GA
    from pymoo.core.evaluator import Evaluator
    from pymoo.core.problem import Problem as PymooProblem
    from pymoo.core.repair import Repair
    from pymoo.core.sampling import Sampling
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.problems.static import StaticProblem

    class Genes(PymooProblem):
        """The gene vector as pymoo sees it; values come from the engine, never from here."""

        def __init__(self, problem: Problem, n_obj: int) -> None:
            super().__init__(
                n_var=problem.n_genes, n_obj=n_obj, xl=0, xu=np.array(problem.n_levels) - 1,
                vtype=int,
            )  # fmt: skip

    class Budget(Repair):
        """Round, then lower random genes until the budget holds and raise them while it
        does. With costs among the objectives (``fill_feasible=False``) a feasible candidate
        stays as proposed, as in the Optuna samplers: filling it to the budget would pull
        every point of the front onto the budget line."""

        def __init__(self, problem: Problem, rng: np.random.Generator, fill_feasible: bool):
            super().__init__()
            self.problem, self.rng, self.fill_feasible = problem, rng, fill_feasible

        def _do(self, _problem: Any, X: np.ndarray, **kwargs: Any) -> np.ndarray:
            top = np.array(self.problem.n_levels) - 1
            out = []
            for x in np.clip(np.rint(X), 0, top).astype(int):
                g = tuple(int(v) for v in x)
                if self.fill_feasible or not self.problem.feasible(g):
                    g = self.problem.to_budget(g, self.rng)
                out.append(g)
            return np.array(out, dtype=int)

    class Start(Sampling):
        """The uniform allocation filled to the budget, then random feasible candidates."""

        def __init__(self, problem: Problem, rng: np.random.Generator) -> None:
            super().__init__()
            self.problem, self.rng = problem, rng

        def _do(self, _problem: Any, n_samples: int, **kwargs: Any) -> np.ndarray:
            first = self.problem.fill(self.problem.uniform(), self.rng)
            rest = [self.problem.random(self.rng) for _ in range(n_samples - 1)]
            return np.array([first, *rest], dtype=int)

    return SimpleNamespace(
        GA=GA, NSGA2=NSGA2, Evaluator=Evaluator, StaticProblem=StaticProblem, SBX=SBX, PM=PM,
        RoundingRepair=RoundingRepair, Genes=Genes, Budget=Budget, Start=Start,
    )  # fmt: skip


class PymooSearch(Algorithm):
    name: ClassVar[str]
    multi_objective: ClassVar[bool] = True
    reads = ("random_batch", "objectives")

    def __init__(
        self,
        problem: Problem,
        seed: int,
        full_windows: int,
        population: int = 8,
        objectives: tuple[str, ...] = ("kl",),
    ) -> None:
        super().__init__(problem, seed, full_windows)
        self.objectives = parse_objectives(objectives, problem)
        self.pymoo_problem = _pymoo().Genes(problem, len(self.objectives))
        self.algorithm = self.make(max(2, population))
        self.algorithm.setup(self.pymoo_problem, termination=("n_gen", 10**9), seed=seed)
        self._pop: Any = None  # the population asked last
        self.known: dict[Candidate, float] = {}
        self.generations = 0

    @classmethod
    def configure(cls, problem, seed, full_windows, settings):
        objectives = tuple(settings.get("objectives", "kl").split(","))
        return cls(problem, seed, full_windows, settings["random_batch"], objectives)

    def operators(self, population: int) -> dict[str, Any]:
        pm = _pymoo()
        return {
            "pop_size": population,
            "sampling": pm.Start(self.problem, self.rng),
            "crossover": pm.SBX(prob=0.9, eta=15, vtype=float, repair=pm.RoundingRepair()),
            "mutation": pm.PM(eta=20, vtype=float, repair=pm.RoundingRepair()),
            "repair": pm.Budget(self.problem, self.rng, fill_feasible=len(self.objectives) == 1),
            "eliminate_duplicates": True,
        }

    def make(self, population: int) -> Any:
        raise NotImplementedError

    def ask(self) -> list[Request]:
        pop = self.algorithm.ask()
        if pop is None or len(pop) == 0:
            self.done = True
            return []
        self._pop = pop
        genes = [tuple(int(v) for v in x) for x in pop.get("X")]
        return [Request(g, self.full_windows) for g in genes]

    def tell(self, results: list[Result]) -> None:
        assert self._pop is not None
        rows = []
        for r in results:
            self.known[r.candidate] = r.kl
            fractions = self.problem.fractions(r.candidate)
            rows.append([r.kl if o == "kl" else fractions[o] for o in self.objectives])
        pm = _pymoo()
        static = pm.StaticProblem(self.pymoo_problem, F=np.array(rows, dtype=float))
        pm.Evaluator().eval(static, self._pop)
        self.algorithm.tell(infills=self._pop)
        self._pop = None
        self.generations += 1

    def status(self) -> str:
        return f"generation {self.generations + 1}"


class PymooGA(PymooSearch):
    """pymoo's genetic algorithm (single objective; with costs as objectives, use NSGA-II)."""

    name = "pymoo-ga"
    multi_objective = False

    def make(self, population: int) -> Any:
        return _pymoo().GA(**self.operators(population))


class PymooNSGA2(PymooSearch):
    """pymoo's NSGA-II: on KL alone, or on KL and costs for a Pareto front."""

    name = "pymoo-nsga2"

    def make(self, population: int) -> Any:
        return _pymoo().NSGA2(**self.operators(population))
