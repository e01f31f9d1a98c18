"""Evolution through the Engine on a synthetic objective, and parse_stages."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import numpy as np
import pytest

import searcher.algorithms
from searcher.algorithms.base import Request, Result
from searcher.algorithms.evolution import DEFAULT_STAGES, Evolution, parse_stages
from searcher.engine import Engine
from searcher.errors import SearcherError
from searcher.pool import Job, Outcome, Pool
from searcher.problem import Problem
from tests.helpers import toy_problem

N_LEVELS = (5, 5, 4, 5, 3, 5, 5, 4)
FLOPS = (3.0, 9.0, 1.5, 6.0, 12.0, 4.0, 2.0, 7.0)
PARAMS = (5.0, 2.0, 8.0, 1.0, 3.0, 7.0, 4.0, 6.0)
MATTERS = (0.2, 5.0, 0.1, 3.0, 0.5, 0.2, 4.0, 0.3)  # synthetic KL weight per level removed


def make_problem(budget: str = "flops=0.55") -> Problem:
    return toy_problem(budget, N_LEVELS, FLOPS, PARAMS)


def synthetic_kl(candidate, window: int) -> float:
    digest = hashlib.blake2b(repr((tuple(candidate), window)).encode(), digest_size=8).digest()
    noise = int.from_bytes(digest, "little") / 2**64
    return sum(m * (n - 1 - x) for m, n, x in zip(MATTERS, N_LEVELS, candidate)) + noise


def objective(candidate, windows: int) -> float:
    return float(np.mean([synthetic_kl(candidate, w) for w in range(windows)]))


class FakePool(Pool):
    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def run(self, jobs: list[Job], on_outcome=None) -> list[Outcome]:
        self.jobs.extend(jobs)
        out = []
        for job in jobs:
            kl = np.array([synthetic_kl(job.candidate, w) for w in range(job.start, job.stop)])
            out.append(Outcome(kl, kl, 0.0))
        return out


class Recording(Evolution):
    """Evolution that keeps every batch it asked and every result it was told."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.asked: list[list[Request]] = []
        self.told: list[list[Result]] = []
        self.parents = [self.parent]

    def ask(self) -> list[Request]:
        batch = super().ask()
        self.asked.append(batch)
        return batch

    def tell(self, results: list[Result]) -> None:
        self.told.append(results)
        super().tell(results)
        if self.parents[-1] != self.parent:
            self.parents.append(self.parent)


def tight(problem: Problem, c) -> bool:
    if not problem.feasible(c):
        return False
    for i, (x, n) in enumerate(zip(c, problem.n_levels)):
        if x < n - 1:
            up = list(c)
            up[i] += 1
            if problem.feasible(up):
                return False
    return True


def search(seed: int, budget: str = "flops=0.55", max_evals: float = 40, **kwargs):
    p = make_problem(budget)
    kwargs.setdefault("offspring", 8)
    algo = Recording(p, seed=seed, full_windows=4, **kwargs)
    pool = FakePool()
    engine = Engine(p, algo, pool, max_evals=max_evals)
    trials = engine.run()
    return p, algo, pool, engine, trials


def test_improves_over_its_initial_parent() -> None:
    p, algo, _, engine, _ = search(seed=0)
    first = algo.parents[0]
    assert tight(p, first) and all(a >= b for a, b in zip(first, p.uniform()))
    assert algo.generation >= 5
    assert objective(algo.parent, 4) < objective(first, 4) - 1.0
    best = engine.best()
    assert best is not None and best.fitness(4) <= objective(algo.parent, 4) + 1e-12
    # The synthetic objective rewards keeping genes 1, 3 and 6: the search found that.
    for g in (1, 3, 6):
        assert algo.parent[g] >= first[g]


def test_parents_improve_up_to_the_noise() -> None:
    """A parent can lose its place only to children within the noise (< 1 per window) of it."""
    _, algo, _, _, _ = search(seed=4)
    values = [objective(c, 4) for c in algo.parents]
    assert len(values) >= 3
    assert values[-1] < values[0]
    for before, after in zip(values, values[1:]):
        assert after < before + 2.0


@pytest.mark.parametrize("budget", ["flops=0.55", "flops=0.4,params=0.6", "params=0.5"])
def test_every_asked_candidate_is_feasible_and_tight(budget: str) -> None:
    p, algo, pool, _, trials = search(seed=1, budget=budget, max_evals=20)
    asked = [r.candidate for batch in algo.asked for r in batch]
    assert len(set(asked)) > 10
    for c in asked:
        assert tight(p, c), c
    assert all(t.feasible for t in trials.values())
    assert {j.candidate for j in pool.jobs} <= set(asked)


def test_initial_candidate_is_used_and_filled() -> None:
    p = make_problem()
    start = (0,) * p.n_genes
    algo = Evolution(p, seed=0, full_windows=4, initial=start)
    assert tight(p, algo.parent)
    assert all(a >= b for a, b in zip(algo.parent, start))


def test_stages_request_only_unscored_windows() -> None:
    stages = ((1, 4), (2, 2), (4, 1))
    _, algo, pool, _, trials = search(seed=2, stages=stages, max_evals=30)
    seen: dict[tuple[int, ...], int] = {}
    for job in pool.jobs:
        assert job.start == seen.get(job.candidate, 0), "a window was scored twice or skipped"
        assert job.stop > job.start
        assert job.stop in (1, 2, 4)
        seen[job.candidate] = job.stop
    assert seen == {c: t.windows for c, t in trials.items()}
    # Most candidates stay cheap: only stage survivors reach full fidelity.
    windows = [t.windows for t in trials.values()]
    assert windows.count(1) > windows.count(4)
    # Stage sizes: offspring + parent, then 4 survivors, then 2, then the next generation.
    sizes = [len(b) for b in algo.asked[:3]]
    assert sizes == [9, 4, 2]
    assert [r.windows for r in algo.asked[1]] == [2] * 4
    # Survivors are the best of the previous stage, in rank order.
    for prev, nxt, keep in zip(algo.told[:2], algo.asked[1:3], (4, 2)):
        ranked = sorted(prev, key=lambda r: r.kl)[:keep]
        assert [r.candidate for r in ranked] == [r.candidate for r in nxt]


def test_parent_is_the_winner_of_the_last_stage() -> None:
    _, algo, _, _, _ = search(seed=3, max_evals=15)
    n_stages = len(DEFAULT_STAGES)
    for gen in range(algo.generation):
        last = algo.told[gen * n_stages + n_stages - 1]
        winner = min(last, key=lambda r: r.kl).candidate
        nxt = algo.asked[(gen + 1) * n_stages] if (gen + 1) * n_stages < len(algo.asked) else None
        if nxt is not None:
            assert nxt[0].candidate == winner  # the parent is listed first


def test_same_seed_same_trials_different_seed_differs() -> None:
    def trials(seed: int):
        _, _, _, _, t = search(seed=seed, max_evals=15)
        return [(x.number, x.candidate, x.kl) for x in t.values()]

    assert trials(7) == trials(7)
    assert trials(7) != trials(8)


def test_last_stage_must_be_full() -> None:
    with pytest.raises(ValueError):
        Evolution(make_problem(), seed=0, full_windows=4, stages=((1, 4), (2, 1)))


@pytest.mark.parametrize(
    ("text", "stages"),
    [
        ("1:4,4:1", ((1, 4), (4, 1))),
        ("8:1", ((8, 1),)),
        ("1:8,2:4,4:2,8:1", ((1, 8), (2, 4), (4, 2), (8, 1))),
        ("1:4,2:4", ((1, 4), (2, 4))),
        (" 1:4 , 4:1 ", ((1, 4), (4, 1))),
    ],
)
def test_parse_stages_valid(text: str, stages) -> None:
    assert parse_stages(text) == stages


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1",
        "1:4,4",
        "1:4:2",
        "a:b",
        "1:4,",
        "1.5:4",
        "4:1,1:4",  # windows must increase
        "1:4,1:2",  # strictly
        "1:1,4:4",  # survivors must not increase
        "0:4,4:1",
        "1:0",
        "-1:4,4:1",
        "1;4",
    ],
)
def test_parse_stages_rejects(text: str) -> None:
    with pytest.raises(SearcherError):
        parse_stages(text)


def imports(name: str) -> tuple[set[str], set[str]]:
    """The searcher modules ``searcher/algorithms/NAME.py`` imports: at the top of the
    module, and inside functions."""
    path = Path(searcher.algorithms.__file__).parent / f"{name}.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    local = {
        n.module
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef)
        for n in ast.walk(f)
        if isinstance(n, ast.ImportFrom)
    }
    top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)}
    return {m for m in top if m.startswith("searcher")}, {
        m for m in local if m and m.startswith("searcher")
    }


def test_allocations_and_evolution_import_without_a_cycle() -> None:
    """evolution imports the one-shot allocations (its --init seeds) at its top; what both
    need, the stages, is a module of its own."""
    top, local = imports("allocations")
    assert "searcher.algorithms.evolution" not in top | local
    top, local = imports("evolution")
    assert "searcher.algorithms.allocations" in top and not local
