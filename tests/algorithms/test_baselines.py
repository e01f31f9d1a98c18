"""Uniform and RandomSearch through the Engine."""

from __future__ import annotations

import numpy as np
import pytest

from searcher.algorithms import ALGORITHMS
from searcher.algorithms.baselines import RandomSearch, Uniform
from searcher.engine import Engine
from searcher.pool import Job, Outcome, Pool
from searcher.problem import Problem
from tests.helpers import toy_problem

N_LEVELS = (5, 5, 4, 5, 3, 5)
FLOPS = (3.0, 9.0, 1.5, 6.0, 12.0, 4.0)
PARAMS = (5.0, 2.0, 8.0, 1.0, 3.0, 7.0)


def make_problem(budget: str = "flops=0.55", n_levels=N_LEVELS) -> Problem:
    return toy_problem(budget, n_levels, FLOPS, PARAMS)


class FakePool(Pool):
    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def run(self, jobs: list[Job], on_outcome=None) -> list[Outcome]:
        self.jobs.extend(jobs)
        return [
            Outcome(np.full(j.stop - j.start, float(sum(j.candidate))), np.zeros(1), 0.0)
            for j in jobs
        ]


def test_registry() -> None:
    assert ALGORITHMS["uniform"] is Uniform and ALGORITHMS["random"] is RandomSearch


@pytest.mark.parametrize("budget", ["flops=0.55", "params=0.4", "flops=0.5,params=0.6"])
def test_uniform_asks_exactly_one_candidate(budget: str) -> None:
    p = make_problem(budget)
    algo = Uniform(p, seed=0, full_windows=3)
    pool = FakePool()
    trials = Engine(p, algo, pool, max_evals=100).run()
    assert algo.done
    assert [(j.candidate, j.start, j.stop) for j in pool.jobs] == [(p.uniform(), 0, 3)]
    assert list(trials) == [p.uniform()]
    assert p.feasible(p.uniform())
    assert algo.ask() == []


def test_uniform_ignores_the_seed() -> None:
    p = make_problem()
    assert Uniform(p, 0, 2).ask() == Uniform(p, 99, 2).ask()


@pytest.mark.parametrize("budget", ["flops=0.55", "params=0.4", "flops=0.5,params=0.6"])
def test_random_candidates_are_unique_feasible_and_full(budget: str) -> None:
    p = make_problem(budget)
    algo = RandomSearch(p, seed=0, full_windows=2, batch=6)
    pool = FakePool()
    trials = Engine(p, algo, pool, max_evals=60).run()
    cands = [j.candidate for j in pool.jobs]
    assert len(cands) == len(set(cands)) == len(trials)
    assert len(cands) >= 20
    assert all((j.start, j.stop) == (0, 2) for j in pool.jobs)
    for c in cands:
        assert p.feasible(c)
        assert all(0 <= x < n for x, n in zip(c, p.n_levels))
    assert algo.count == len(cands)


def test_random_batches_are_unique_across_asks() -> None:
    p = make_problem()
    algo = RandomSearch(p, seed=1, full_windows=1, batch=5)
    seen = []
    for _ in range(6):
        batch = algo.ask()
        assert len(batch) <= 5
        seen.extend(r.candidate for r in batch)
        assert all(r.windows == 1 for r in batch)
    assert len(seen) == len(set(seen)) > 15


def test_random_same_seed_same_candidates() -> None:
    p = make_problem()

    def draw(seed: int):
        algo = RandomSearch(p, seed=seed, full_windows=1, batch=8)
        return [r.candidate for _ in range(3) for r in algo.ask()]

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)


def test_random_runs_out_in_a_tiny_space() -> None:
    # 64 candidates in all, few of them feasible and tight: the search must end by itself.
    p = make_problem("flops=0.7", n_levels=(2, 2, 2, 2, 2, 2))
    algo = RandomSearch(p, seed=0, full_windows=1, batch=50)
    pool = FakePool()
    trials = Engine(p, algo, pool, max_evals=10_000).run()
    assert algo.done
    cands = [j.candidate for j in pool.jobs]
    assert len(cands) == len(set(cands)) == len(trials) < 2**6
    assert all(p.feasible(c) for c in cands)
