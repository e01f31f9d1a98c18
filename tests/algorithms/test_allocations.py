"""OWL, FLAP-style ranking, additive + knapsack, pymoo, and evo seeded by them (no torch)."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from searcher.algorithms import ALGORITHMS
from searcher.algorithms.allocations import FLAP, OWL, Additive
from searcher.algorithms.evolution import Evolution
from searcher.algorithms.profile import knapsack
from searcher.algorithms.pymoo_search import PymooGA, PymooNSGA2
from searcher.engine import Engine
from searcher.errors import SearcherError
from searcher.pool import Job, Outcome, Pool
from searcher.problem import Problem
from tests.helpers import toy_problem

N_LEVELS = (5, 5, 4, 5, 3, 5)
FLOPS = (3.0, 9.0, 1.5, 6.0, 12.0, 4.0)
PARAMS = (5.0, 2.0, 8.0, 1.0, 3.0, 7.0)
MATTERS = (0.5, 3.0, 1.0, 0.1, 2.0, 0.7)  # KL per level removed, per gene


def problem(budget: str = "flops=0.55", **priors) -> Problem:
    return dataclasses.replace(toy_problem(budget, N_LEVELS, FLOPS, PARAMS), priors=priors)


def additive_kl(candidate) -> float:
    return float(sum(m * (n - 1 - x) for m, n, x in zip(MATTERS, N_LEVELS, candidate)))


class FakePool(Pool):
    def __init__(self, kl=additive_kl) -> None:
        self.kl = kl
        self.jobs: list[Job] = []

    def run(self, jobs: list[Job], on_outcome=None) -> list[Outcome]:
        self.jobs.extend(jobs)
        return [Outcome(np.full(j.stop - j.start, self.kl(j.candidate)), np.zeros(1), 0.0)
                for j in jobs]  # fmt: skip


def brute_force(p: Problem, kl=additive_kl) -> float:
    feasible = [c for c in itertools.product(*map(range, p.n_levels)) if p.feasible(c)]
    return min(kl(c) for c in feasible)


def test_registry() -> None:
    for name, cls in (("owl", OWL), ("flap", FLAP), ("additive", Additive),
                      ("pymoo-ga", PymooGA), ("pymoo-nsga2", PymooNSGA2)):  # fmt: skip
        assert ALGORITHMS[name] is cls


@pytest.mark.parametrize("budget", ["flops=0.55", "params=0.4", "flops=0.7"])
def test_additive_finds_the_optimum_when_errors_do_add_up(budget: str) -> None:
    p = problem(budget)
    algo = Additive(p, seed=0, full_windows=2, windows=1, levels_per_gene=10)
    pool = FakePool()
    trials = Engine(p, algo, pool, max_evals=100).run()
    assert algo.done and p.feasible(algo.chosen)
    # one window per single-gene candidate, then the answer at full fidelity
    assert sum(j.stop - j.start for j in pool.jobs) == sum(n - 1 for n in N_LEVELS) + 2
    assert trials[algo.chosen].windows == 2
    assert additive_kl(algo.chosen) == pytest.approx(brute_force(p))


def test_additive_misses_the_optimum_when_errors_interact() -> None:
    """The assumption EvoPress argues against: removing two related units costs more than
    the sum of removing each alone."""

    def coupled(c) -> float:  # genes 0 and 3 together are much worse than alone
        both = (N_LEVELS[0] - 1 - c[0]) * (N_LEVELS[3] - 1 - c[3])
        return additive_kl(c) + 5.0 * both

    p = problem("flops=0.55")
    algo = Additive(p, seed=0, full_windows=1, windows=1, levels_per_gene=10)
    Engine(p, algo, FakePool(coupled), max_evals=100).run()
    assert coupled(algo.chosen) > brute_force(p, coupled) + 1e-9


def test_knapsack_is_exact_on_integer_costs() -> None:
    p = problem("flops=0.6")
    errors = [np.array([m * (n - 1 - lv) for lv in range(n)]) for m, n in zip(MATTERS, N_LEVELS)]
    table = p.costs["flops"]
    room = 0.6 * table.dense() - table.base
    genes = tuple(knapsack(list(table.levels), errors, room, bins=20000))
    assert p.feasible(genes)
    assert additive_kl(genes) == pytest.approx(brute_force(p))


def test_additive_asks_for_enough_evals_up_front() -> None:
    p = problem()
    settings = {"stages": "1:2,2:1", "evals": 3}
    with pytest.raises(SearcherError, match="raise --evals to .* or use the default --algo evo"):
        Additive.configure(p, 0, 2, settings)


def test_owl_gives_outlier_heavy_layers_more_density() -> None:
    ratios = [0.01, 0.09, 0.01, 0.05, 0.02, 0.01]  # one decoder layer per gene here
    p = problem("flops=0.55", outlier_ratio=ratios)
    owl = OWL(p, seed=0, full_windows=1)
    density = owl.densities()
    assert np.argmax(density) == 1 and density.max() - density.min() == pytest.approx(0.16)
    keep = [p.keep[g][lv] for g, lv in enumerate(p.uniform())]
    assert density.mean() == pytest.approx(np.mean(keep))
    Engine(p, owl, FakePool(), max_evals=10).run()
    assert owl.done and p.feasible(owl.chosen)
    assert owl.chosen[1] >= owl.chosen[0]


def test_flap_ranks_standardised_scores_globally_under_the_budget() -> None:
    rng = np.random.default_rng(0)
    units = [list(range(1, n + 1)) for n in N_LEVELS]  # level l keeps l + 1 units
    # gene 1: one dominant unit, the rest near zero (standardised: all but one far below the
    # others' units); gene 3: evenly spread scores
    scores = [sorted(rng.random(n), reverse=True) for n in N_LEVELS]
    scores[1] = [10.0] + [0.01] * (N_LEVELS[1] - 1)
    p = problem("flops=0.55", unit_scores=scores, units=units)
    flap = FLAP(p, seed=0, full_windows=1)
    Engine(p, flap, FakePool(), max_evals=10).run()
    assert p.feasible(flap.chosen)
    # standardised per gene: scaling one gene's scores changes nothing
    scaled = [list(np.array(s) * (100.0 if i == 3 else 1.0)) for i, s in enumerate(scores)]
    again = FLAP(problem("flops=0.55", unit_scores=scaled, units=units), seed=0, full_windows=1)
    assert again.allocate() == flap.allocate()
    z = flap.standardised()
    genes = flap.allocate()
    kept = [int((zs >= 0).sum()) for zs in z]
    assert genes[1] <= genes[0] and kept[1] == 1


@pytest.mark.parametrize("cls", [OWL, FLAP])
def test_a_baseline_for_another_space_is_refused(cls) -> None:
    with pytest.raises(SearcherError, match=f"--algo {cls.name} works on the"):
        cls(problem(), 0, 1)


@pytest.mark.parametrize("cls", [PymooGA, PymooNSGA2])
def test_pymoo_proposes_feasible_candidates_and_improves(cls) -> None:
    p = problem()
    algo = cls(p, seed=3, full_windows=1, population=6)
    pool = FakePool()
    trials = Engine(p, algo, pool, max_evals=30).run()
    assert all(p.feasible(c) for c in trials) and len(trials) >= 25
    kls = [additive_kl(j.candidate) for j in pool.jobs]
    assert min(kls) < min(kls[:6])  # better than anything in the first population
    again = cls(p, seed=3, full_windows=1, population=6)
    pool2 = FakePool()
    Engine(p, again, pool2, max_evals=30).run()
    assert [j.candidate for j in pool2.jobs] == [j.candidate for j in pool.jobs]


def test_pymoo_nsga2_takes_costs_as_objectives() -> None:
    p = problem()
    algo = PymooNSGA2(p, seed=0, full_windows=1, population=6, objectives=("kl", "flops"))
    trials = Engine(p, algo, FakePool(), max_evals=30).run()
    # feasible offspring are not filled to the budget: the front spreads below it
    assert all(p.feasible(c) for c in trials)
    assert min(p.fractions(c)["flops"] for c in trials) < 0.45
    with pytest.raises(SearcherError, match="bad --objectives"):
        PymooNSGA2(p, 0, 1, objectives=("kl", "latency"))


def test_evo_starts_from_its_init_allocation() -> None:
    p = problem("flops=0.55")
    settings = {"stages": "1:2,2:1", "offspring": 4, "init": "additive", "evals": 100}
    evo = Evolution.configure(p, 0, 2, settings)
    pool = FakePool()
    Engine(p, evo, pool, max_evals=40).run()
    profiled = sum(n - 1 for n in N_LEVELS)
    assert all(j.stop - j.start == 1 for j in pool.jobs[:profiled])
    # additive's answer is evo's first parent: optimal here, so evo never finds better
    best = min((j.candidate for j in pool.jobs if p.feasible(j.candidate)), key=additive_kl)
    assert additive_kl(evo.parent) == pytest.approx(additive_kl(best))
    assert additive_kl(evo.parent) == pytest.approx(brute_force(p))
    with pytest.raises(SearcherError, match="unknown --init"):
        Evolution.configure(p, 0, 2, {**settings, "init": "magic"})
