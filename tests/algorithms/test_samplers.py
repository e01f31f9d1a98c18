"""Optuna samplers (tpe, gp, nsga2) through the Engine on a synthetic objective."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest

from searcher.algorithms import ALGORITHMS
from searcher.algorithms.base import Request
from searcher.algorithms.samplers import GPSearch, NSGA2Search, OptunaSearch, TPESearch
from searcher.engine import Engine
from searcher.errors import SearcherError
from searcher.pool import Job, Outcome, Pool
from searcher.problem import Problem
from searcher.spec import RunSpec
from tests.helpers import toy_problem

N_LEVELS = (5, 5, 4, 5, 3, 5, 5, 4)
FLOPS = (3.0, 9.0, 1.5, 6.0, 12.0, 4.0, 2.0, 7.0)
PARAMS = (5.0, 2.0, 8.0, 1.0, 3.0, 7.0, 4.0, 6.0)
MATTERS = (0.2, 5.0, 0.1, 3.0, 0.5, 0.2, 4.0, 0.3)  # synthetic KL weight per level removed
FULL = 2  # calibration windows at full fidelity

ALGOS = ["tpe", "nsga2", "gp"]
# (max_evals, batch) per test. The GP fits models per proposal (~0.3 s each here): keep it short.
LONG = {"tpe": (48, 8), "nsga2": (48, 8), "gp": (16, 4)}
SHORT = {"tpe": (24, 8), "nsga2": (24, 8), "gp": (12, 4)}


def make_problem(budget: str = "flops=0.55", n_levels=N_LEVELS) -> Problem:
    return toy_problem(budget, n_levels, FLOPS, PARAMS)


def synthetic_kl(candidate, window: int) -> float:
    digest = hashlib.blake2b(repr((tuple(candidate), window)).encode(), digest_size=8).digest()
    noise = int.from_bytes(digest, "little") / 2**64
    return sum(m * (n - 1 - x) for m, n, x in zip(MATTERS, N_LEVELS, candidate)) + noise


def objective(candidate) -> float:
    return float(np.mean([synthetic_kl(candidate, w) for w in range(FULL)]))


class FakePool(Pool):
    def __init__(self) -> None:
        self.calls: list[list[Job]] = []

    def run(self, jobs: list[Job], on_outcome=None) -> list[Outcome]:
        self.calls.append(list(jobs))
        out = []
        for job in jobs:
            kl = np.array([synthetic_kl(job.candidate, w) for w in range(job.start, job.stop)])
            out.append(Outcome(kl, kl, 0.0))
        return out


def recording(algo: OptunaSearch) -> list[list[Request]]:
    """Keep every batch ``algo`` asks for."""
    asked: list[list[Request]] = []
    ask = algo.ask

    def wrapper() -> list[Request]:
        batch = ask()
        asked.append(batch)
        return batch

    algo.ask = wrapper  # type: ignore[method-assign]
    return asked


def search(name: str, seed: int, max_evals: float, batch: int, budget: str = "flops=0.55"):
    p = make_problem(budget)
    algo = ALGORITHMS[name](p, seed=seed, full_windows=FULL, batch=batch)
    asked = recording(algo)
    pool = FakePool()
    engine = Engine(p, algo, pool, max_evals=max_evals)
    engine.run()
    return p, algo, asked, pool, engine


def test_registry_and_configure_from_run_settings() -> None:
    assert ALGORITHMS["tpe"] is TPESearch
    assert ALGORITHMS["gp"] is GPSearch
    assert ALGORITHMS["nsga2"] is NSGA2Search
    p = make_problem()
    for name in ("tpe", "nsga2", "gp"):
        settings = RunSpec(algo=name, seed=3, random_batch=5).resolved().to_dict()
        algo = ALGORITHMS[name].configure(p, settings["seed"], 4, settings)
        assert isinstance(algo, OptunaSearch) and algo.batch == 5
        batch = algo.ask()
        assert len(batch) == 5 and len({r.candidate for r in batch}) == 5
        assert all(r.windows == 4 for r in batch)
        # The first batch starts from the uniform allocation, filled to the budget.
        assert batch[0].candidate == p.fill(p.uniform(), np.random.default_rng(3))


@pytest.mark.parametrize("name", ALGOS)
def test_search_is_feasible_new_improving_and_stops_at_max_evals(name: str) -> None:
    max_evals, batch = LONG[name]
    p, algo, asked, pool, engine = search(name, 0, max_evals, batch)
    batches = [[r.candidate for r in b] for b in asked if b]
    flat = [c for b in batches for c in b]
    # Every candidate asked is feasible, at full fidelity, and new: nothing is asked twice.
    assert all(p.feasible(c) for c in flat)
    assert all(r.windows == FULL for b in asked for r in b)
    assert len(flat) == len(set(flat))
    assert all(len(b) == batch for b in batches)
    # The engine stops after the first batch that reaches max_evals.
    limit = max_evals * FULL
    per_call = [sum(j.stop - j.start for j in call) for call in pool.calls]
    assert engine.spent_windows >= limit > engine.spent_windows - per_call[-1]
    # It improves on its first batch: the best so far and the median of the last batch.
    first, last = [objective(c) for c in batches[0]], [objective(c) for c in batches[-1]]
    best = engine.best()
    assert best is not None and best.fitness() < min(first) - 1.0
    assert np.median(last) < np.median(first) - 1.0
    assert algo.best == pytest.approx(best.fitness())


@pytest.mark.parametrize("name", ALGOS)
def test_the_sampler_hears_about_proposals_and_repairs(name: str) -> None:
    p, algo, asked, _, engine = search(name, 1, *SHORT[name])
    scored = {c: t.fitness() for c, t in engine.trials.items()}
    trials = algo.study.get_trials(deepcopy=False)
    assert {t.state.name for t in trials} == {"COMPLETE"}
    infeasible = 0
    for t in trials:
        genes = tuple(t.params[f"g{i:03d}"] for i in range(p.n_genes))
        # Constraints are Optuna's (<= 0 feasible), one per budgeted metric, and agree with
        # the problem's own feasibility test.
        assert set(t.constraints) == {"flops"}
        assert (max(t.constraints.values()) <= 0) == p.feasible(genes)
        target = tuple(t.user_attrs["scored"])
        assert t.value == pytest.approx(scored[target])
        if p.feasible(genes):
            assert target == genes  # feasible proposals are scored as proposed
        else:
            infeasible += 1
            assert target != genes and p.feasible(target)
    assert infeasible > 0
    assert algo.repaired == infeasible
    # Every scored candidate is in the study as a feasible trial with its own params.
    feasible_params = {
        tuple(t.params[f"g{i:03d}"] for i in range(p.n_genes))
        for t in trials
        if max(t.constraints.values()) <= 0
    }
    assert set(scored) <= feasible_params


@pytest.mark.parametrize("name", ALGOS)
def test_same_seed_same_candidates_different_seed_differs(name: str) -> None:
    def candidates(seed: int, max_evals: int) -> list[tuple[int, ...]]:
        _, _, asked, _, _ = search(name, seed, max_evals, 4)
        return [r.candidate for b in asked for r in b]

    first = candidates(5, 12)  # three batches of 4: the third is model-based
    assert len(first) == 12
    assert candidates(5, 12) == first
    other = candidates(6, 4)
    assert other != first[: len(other)]


@pytest.mark.parametrize("budget", ["flops=0.4,params=0.6", "params=0.5"])
def test_every_budget_metric_is_a_constraint(budget: str) -> None:
    p, algo, asked, _, _ = search("tpe", 2, 16, 8, budget=budget)
    assert all(p.feasible(r.candidate) for b in asked for r in b)
    metrics = set(p.budget.limits)
    assert all(set(t.constraints) == metrics for t in algo.study.get_trials(deepcopy=False))


@pytest.mark.parametrize("name", ["tpe", "nsga2"])
def test_a_tiny_space_ends_the_search(name: str) -> None:
    p = make_problem("flops=1", n_levels=(2, 2, 1, 1, 1, 1, 1, 1))  # 4 candidates in all
    algo = ALGORITHMS[name](p, seed=0, full_windows=FULL, batch=3)
    engine = Engine(p, algo, FakePool(), max_evals=100)
    trials = engine.run()
    assert algo.done and len(trials) == 4


def test_nsga2_repairs_join_the_population() -> None:
    _, algo, _, _, _ = search("nsga2", 0, *SHORT["nsga2"])
    key = algo.sampler._get_generation_key()
    trials = algo.study.get_trials(deepcopy=False)
    added = [t for t in trials if "repair_of" in t.user_attrs]
    assert added and all(key in t.system_attrs for t in added)
    assert max(t.system_attrs[key] for t in trials) >= 2


def test_the_module_imports_neither_torch_nor_scipy() -> None:
    code = (
        "import sys, searcher.algorithms.samplers; "
        "assert not {'torch', 'scipy'} & set(sys.modules), 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


@pytest.mark.parametrize("name", ["tpe", "nsga2"])
def test_multi_objective_search_returns_a_front_within_budget(name: str) -> None:
    from searcher.pareto import pareto_front

    p = make_problem("flops=0.8")
    algo = ALGORITHMS[name](p, seed=0, full_windows=FULL, batch=8, objectives=("kl", "flops"))
    engine = Engine(p, algo, FakePool(), max_evals=48)
    trials = list(engine.run().values())
    assert all(t.feasible for t in trials)
    assert algo.study.directions == [optuna.study.StudyDirection.MINIMIZE] * 2
    for t in algo.study.trials:  # told (KL, FLOPs fraction) of the candidate actually scored
        scored = tuple(t.user_attrs["scored"])
        assert t.values[1] == pytest.approx(p.fractions(scored)["flops"])
    points = [(t.fractions["flops"], t.fitness()) for t in trials]
    front = [points[i] for i in pareto_front(points)]
    assert len(front) >= 3  # a front across costs, not one point at the budget
    assert max(f for f, _ in front) - min(f for f, _ in front) > 0.1


def test_objectives_must_start_with_kl_and_name_known_costs() -> None:
    p = make_problem()
    for bad in (("flops", "kl"), ("kl", "latency"), ("kl", "flops", "flops"), ()):
        with pytest.raises(SearcherError, match="bad --objectives"):
            TPESearch(p, seed=0, full_windows=FULL, objectives=bad)
    settings = RunSpec(algo="nsga2", objectives="kl,params").resolved().to_dict()
    assert ALGORITHMS["nsga2"].configure(p, 0, FULL, settings).objectives == ("kl", "params")
