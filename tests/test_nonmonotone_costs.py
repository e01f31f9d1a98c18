"""Costs that are not monotone in level: a latency table whose block times fall as size grows
(GPUs, some quantized kernels) must still give feasible candidates from repair, fill, the
starts and every algorithm, whenever a feasible candidate exists. And on tables whose costs do
grow with the level, the same seeds still give the same candidates as before the change."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest

from latency_models.table import CostTable
from searcher.algorithms import ALGORITHMS
from searcher.algorithms.allocations import Additive
from searcher.algorithms.evolution import Evolution
from searcher.budget import Budget
from searcher.engine import Engine
from searcher.errors import SearcherError
from searcher.pool import Outcome, Pool
from searcher.problem import Problem
from tests.helpers import toy_problem

# Eight genes; block times that rise, fall, dip in the middle, dip at the top, and plateau.
N_LEVELS = (5, 5, 5, 5, 4, 4, 6, 3)
LATENCY = (
    (1.0, 2.0, 3.0, 4.0, 5.0),  # rises
    (6.0, 5.0, 4.0, 2.0, 1.0),  # falls: dense is cheapest
    (8.0, 6.0, 4.0, 3.0, 2.0),  # falls
    (3.0, 2.0, 0.5, 2.0, 4.0),  # a valley in the middle
    (1.0, 2.0, 3.0, 4.0),  # rises
    (1.0, 3.0, 4.0, 0.5),  # rises, then the largest size is fastest
    (0.5, 1.0, 1.0, 2.0, 3.0, 4.0),  # rises, with a plateau
    (3.0, 3.0, 1.0),  # a plateau, then falls
)
LATENCY_BASE = 2.0  # cheapest candidate: 9.5 = 0.404 of dense (23.5); level 0 everywhere: 25.5
FLOPS_W = (3.0, 9.0, 1.5, 6.0, 12.0, 4.0, 2.0, 7.0)
KEEP = tuple(tuple((lv + 1) / n for lv in range(n)) for n in N_LEVELS)
MATTERS = (0.2, 5.0, 0.1, 3.0, 0.5, 0.2, 4.0, 0.3)  # synthetic KL per level removed

BUDGET = "latency=0.5"  # 11.75: only near the per-gene cheapest levels, several of them high
BUDGETS = [BUDGET, "latency=0.6", "latency=0.45,flops=0.8", "latency=0.6,flops=0.5"]


def tables(flops_falls: bool = False) -> dict[str, CostTable]:
    """Latency as above; FLOPs growing with the kept fraction (or, with ``flops_falls``,
    rising and falling where latency does, so that each gene has a level cheapest in both)."""
    flops = []
    for w, keep, lat in zip(FLOPS_W, KEEP, LATENCY, strict=True):
        # agreeing: ordered like the latency row, but shaped differently
        agree = [w * (x / max(lat)) ** 2 for x in lat]
        flops.append(agree if flops_falls else [w * k for k in keep])
    return {
        "latency": CostTable.build("latency", LATENCY_BASE, LATENCY),
        "flops": CostTable.build("flops", 1.0, flops),
    }


def make(budget: str = BUDGET, flops_falls: bool = False) -> Problem:
    return Problem(N_LEVELS, tables(flops_falls), Budget.parse(budget), KEEP, space_name="toy")


def every_candidate(p: Problem) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """All candidates (one row each) and their cost fractions, computed here from the rows."""
    grid = np.array(list(itertools.product(*map(range, p.n_levels))))
    fractions = {}
    for m, t in p.costs.items():
        cost = t.base + sum(np.asarray(row)[grid[:, g]] for g, row in enumerate(t.levels))
        fractions[m] = cost / (t.base + sum(row[-1] for row in t.levels))
    return grid, fractions


def fits(p: Problem, genes) -> bool:
    return all(
        p.costs[m].cost(genes) / p.costs[m].dense() <= limit + 1e-9
        for m, limit in p.budget.limits.items()
    )


def assert_feasible(p: Problem, genes) -> None:
    assert len(genes) == p.n_genes and all(isinstance(x, int) for x in genes)
    assert all(0 <= x < n for x, n in zip(genes, p.n_levels)), genes
    assert fits(p, genes), (genes, p.fractions(genes))
    assert p.feasible(genes)


def assert_tight(p: Problem, genes) -> None:
    """Feasible, and no gene can be raised to any higher level within the budget."""
    assert_feasible(p, genes)
    for i, (x, n) in enumerate(zip(genes, p.n_levels)):
        for lv in range(x + 1, n):
            up = list(genes)
            up[i] = lv
            assert not fits(p, up), f"gene {i} of {genes} could still go to level {lv}"


# -- the table -------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", BUDGETS)
def test_the_budgets_need_the_levels_whose_costs_fall(budget: str) -> None:
    """A feasible candidate exists, but none with genes 1 and 2 at or below their middle
    levels, and none at a common kept fraction: a search that only lowers levels, or starts
    from the uniform grid, cannot find one."""
    p = make(budget)
    grid, fractions = every_candidate(p)
    ok = np.ones(len(grid), dtype=bool)
    for m, limit in p.budget.limits.items():
        ok &= fractions[m] <= limit + 1e-9
    assert ok.any()
    assert not (ok & (grid[:, 1] <= 2) & (grid[:, 2] <= 2)).any()
    if budget in (BUDGET, "latency=0.6,flops=0.5"):
        for f in sorted({f for row in KEEP for f in row}):
            same = [int(np.argmin([abs(k - f) - 1e-12 * k for k in row])) for row in KEEP]
            assert not fits(p, same)


def test_minimum_and_floor_are_per_gene_minima_at_any_level() -> None:
    p = make()
    t = p.costs["latency"]
    assert t.minimum() == pytest.approx(LATENCY_BASE + sum(min(r) for r in LATENCY))
    assert t.cheapest() == tuple(int(np.argmin(r)) for r in LATENCY)
    assert p.floor() == t.cheapest() == (0, 4, 4, 2, 0, 3, 0, 2)
    assert_feasible(p, p.floor())
    assert p.minimum_fractions()["latency"] == pytest.approx(9.5 / 23.5)


def test_a_budget_below_the_cheapest_candidate_is_still_refused() -> None:
    with pytest.raises(SearcherError, match="infeasible.*cheapest candidate"):
        make("latency=0.4")
    make("latency=0.405")  # just above 9.5 / 23.5


# -- repair, fill and the starts ---------------------------------------------------------------


@pytest.mark.parametrize("budget", BUDGETS)
def test_repair_always_ends_feasible(budget: str) -> None:
    p = make(budget)
    rng = np.random.default_rng(1)
    starts = [(0,) * p.n_genes, p.dense()]
    starts += [tuple(int(rng.integers(0, n)) for n in N_LEVELS) for _ in range(200)]
    for start in starts:
        out = p.repair(start, rng)
        assert_feasible(p, out)
        if fits(p, start):
            assert out == start, "a feasible candidate needs no repair"


@pytest.mark.parametrize("budget", BUDGETS)
def test_fill_stays_feasible_and_raises_past_levels_that_do_not_fit(budget: str) -> None:
    p = make(budget)
    rng = np.random.default_rng(2)
    for _ in range(100):
        start = p.repair(tuple(int(rng.integers(0, n)) for n in N_LEVELS), rng)
        out = p.fill(start, rng)
        assert_tight(p, out)
        assert all(a >= b for a, b in zip(out, start)), "fill only raises genes"


def test_fill_jumps_a_level_that_does_not_fit_to_one_above_that_does() -> None:
    p = make()  # 11.75
    start = (0, 4, 4, 2, 0, 0, 0, 2)  # 10.0: gene 5 at level 1 or 2 would not fit, 3 does
    assert fits(p, start) and not fits(p, (0, 4, 4, 2, 0, 1, 0, 2))
    for seed in range(5):
        assert p.fill(start, np.random.default_rng(seed))[5] == 3


@pytest.mark.parametrize("budget", BUDGETS)
def test_uniform_and_random_are_feasible(budget: str) -> None:
    p = make(budget)
    assert_feasible(p, p.uniform())
    assert p.uniform() == p.uniform()  # deterministic
    rng = np.random.default_rng(4)
    seen = {p.random(rng) for _ in range(50)}
    for c in seen:
        assert_tight(p, c)
    assert len(seen) > 1  # random (at latency=0.5 only 51 candidates fit at all)


@pytest.mark.parametrize("budget", BUDGETS)
def test_mutations_stay_feasible(budget: str) -> None:
    p = make(budget)
    rng = np.random.default_rng(5)
    parent = p.random(rng)
    for _ in range(200):
        child = p.mutate(parent, rng, int(rng.integers(1, 4)))
        assert_tight(p, child)
        parent = child


def test_limits_that_agree_per_gene_give_an_exact_floor() -> None:
    """FLOPs falling where latency falls: each gene has one level cheapest in both, so the
    floor minimises both at once; the tightest budgets around it are feasible."""
    p = make("latency=0.5,flops=0.5", flops_falls=True)
    floor = p.floor()
    f = p.fractions(floor)
    assert f["latency"] == pytest.approx(p.minimum_fractions()["latency"])
    assert f["flops"] == pytest.approx(p.minimum_fractions()["flops"])
    tight = make(f"latency={f['latency'] + 1e-6:.9f},flops={f['flops'] + 1e-6:.9f}", True)
    rng = np.random.default_rng(0)
    for _ in range(30):
        assert_tight(tight, tight.random(rng))
    assert_feasible(tight, tight.uniform())


def test_limits_that_pull_genes_different_ways() -> None:
    """Latency falling where FLOPs rise: no level is cheapest in both. Near the edge of what
    is feasible (found by brute force here) the floor, repair and starts still meet both."""
    p = make("latency=1,flops=1")
    grid, fractions = every_candidate(p)
    # the tightest FLOPs limit that still leaves a candidate within latency 0.5
    within = fractions["latency"] <= 0.5
    least = float(fractions["flops"][within].min())
    budget = f"latency=0.5,flops={least * 1.02:.6f}"
    q = make(budget)
    assert_feasible(q, q.floor())
    rng = np.random.default_rng(3)
    for _ in range(100):
        assert_feasible(q, q.repair(tuple(int(rng.integers(0, n)) for n in N_LEVELS), rng))
        assert_tight(q, q.random(rng))
    assert_feasible(q, q.uniform())
    with pytest.raises(SearcherError, match="infeasible.*no candidate was found that meets"):
        make(f"latency=0.5,flops={least * 0.98:.6f}")


# -- algorithms through the engine -------------------------------------------------------------


def synthetic_kl(candidate, window: int) -> float:
    digest = hashlib.blake2b(repr((tuple(candidate), window)).encode(), digest_size=8).digest()
    noise = int.from_bytes(digest, "little") / 2**64
    return sum(m * (n - 1 - x) for m, n, x in zip(MATTERS, N_LEVELS, candidate)) + noise


class FakePool(Pool):
    def run(self, jobs, on_outcome=None):
        out = []
        for job in jobs:
            kl = np.array([synthetic_kl(job.candidate, w) for w in range(job.start, job.stop)])
            out.append(Outcome(kl, kl, 0.0))
        return out


SETTINGS = {"offspring": 6, "stages": "1:3,2:1", "init": None, "select": None, "evals": 24,
            "random_batch": 4, "objectives": "kl"}  # fmt: skip


def run(p: Problem, name: str, evals: float = 24, **settings):
    s = {**SETTINGS, "evals": evals, **settings}
    algo = ALGORITHMS[name].configure(p, 0, 2, s)
    engine = Engine(p, algo, FakePool(), max_evals=evals)
    trials = engine.run()
    return algo, engine, trials


@pytest.mark.parametrize(
    ("name", "settings"),
    [
        ("evo", {}),  # the default search: a profile start, then evolution
        ("evo", {"init": "uniform"}),
        ("random", {}),
        ("uniform", {}),
        ("tpe", {}),
        ("nsga2", {}),
        ("gp", {"evals": 4}),  # its start; the GP itself is slow on a space this small
        ("pymoo-ga", {}),
        ("pymoo-nsga2", {}),
        ("additive", {"evals": 40}),
    ],
)
@pytest.mark.parametrize("budget", [BUDGET, "latency=0.6,flops=0.5"])
def test_every_algorithm_finishes_with_a_feasible_best(name: str, settings, budget: str) -> None:
    p = make(budget)
    algo, engine, trials = run(p, name, **settings)
    # single-unit profiles are over any budget by design
    assert all(t.feasible for c, t in trials.items() if c not in engine.untimed)
    best = engine.best()
    assert best is not None and best.feasible and fits(p, best.candidate)
    if isinstance(algo, Evolution):
        assert algo.generation >= 1 and fits(p, algo.parent)


def test_a_width_search_on_a_latency_table_whose_mlp_gets_faster_with_size() -> None:
    """The engine's default search on a real space priced by a device table (hand-made) in
    which an MLP block runs faster the more neurons it keeps: a budget that only large MLPs
    meet ends with a feasible best."""
    import torch

    import spaces
    from latency_models.latency_table import WorkloadTable
    from latency_models.workload import Workload
    from searcher.latency import space_shapes
    from searcher.run import problem_for
    from tests.helpers import tiny_model

    model = tiny_model()
    win = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(0))
    space = spaces.build("width", spaces.Structure.of(model), 32, win, 2, {"mlp_steps": 4})
    shapes = space_shapes(space)
    blocks = {  # attention: 1.33 to 2 ms, rising; MLP: 2.5 ms at 1/4 of its width to 1 ms dense
        "attn": {s: 1.0 + s / max(shapes["attn"]) for s in shapes["attn"]},
        "mlp": {s: 3.0 - 2.0 * s / max(shapes["mlp"]) for s in shapes["mlp"]},
    }
    table = WorkloadTable(Workload("prefill", 1, 32), 1.0, blocks)
    p = problem_for(space, Budget.parse("latency=0.85"), {"latency": table.costs(*space.blocks())})
    mlp = [i for i, gene in enumerate(space.blocks()[1]) if gene[-1][0] == "mlp"]
    assert mlp and all(p.floor()[i] == p.n_levels[i] - 1 for i in mlp)
    grid = sorted({f for row in p.keep for f in row})
    for f in grid:  # no common kept fraction meets the budget
        same = [int(np.argmin([abs(k - f) - 1e-12 * k for k in row])) for row in p.keep]
        assert not p.feasible(same)
    kl = lambda c: float(sum(p.n_levels[i] - 1 - x for i, x in enumerate(c)))  # noqa: E731

    class Pool1(Pool):
        def run(self, jobs, on_outcome=None):
            return [Outcome(np.full(j.stop - j.start, kl(j.candidate)), np.zeros(1), 0.0)
                    for j in jobs]  # fmt: skip

    algo = Evolution.configure(p, 0, 2, {**SETTINGS, "evals": 20})
    engine = Engine(p, algo, Pool1(), max_evals=20)
    trials = engine.run()
    assert all(t.feasible for c, t in trials.items() if c not in engine.untimed)
    best = engine.best()
    assert best is not None and best.feasible and algo.generation >= 1
    assert all(best.candidate[i] == p.n_levels[i] - 1 for i in mlp)


def test_evolution_and_additive_starts_are_feasible() -> None:
    p = make()
    stages = ((1, 2), (2, 1))
    evo = Evolution(p, seed=0, full_windows=2, stages=stages)  # from the uniform allocation
    assert_tight(p, evo.parent)
    evo = Evolution(p, seed=0, full_windows=2, stages=stages, initial=(0,) * p.n_genes)
    assert_tight(p, evo.parent)  # level 0 everywhere is the most expensive here: repaired
    additive = Additive(p, seed=0, full_windows=2)
    scores = {c: synthetic_kl(c, 0) for c in additive.profile.candidates()}
    additive.scores = scores
    assert_feasible(p, p.to_budget(additive.allocate(), np.random.default_rng(0)))


# -- costs that grow with the level: unchanged -------------------------------------------------


def plateau_problem(budget: str) -> Problem:
    """Latency that never falls with the level but stays flat between some levels (as a
    pooled measured table does), and FLOPs that grow."""
    rows = [[0.0, 1.0, 1.0, 2.5, 2.5], [0.5, 0.5, 0.5, 3.0, 4.0], [1.0, 2.0, 2.0, 2.0],
            [0.2, 0.9, 0.9, 0.9, 1.1], [0.0, 0.0, 3.0], [1.0, 1.0, 2.0, 3.0, 3.0],
            [0.4, 0.8, 1.2, 1.2, 1.6], [2.0, 2.0, 2.0, 2.0]]  # fmt: skip
    n_levels = tuple(len(r) for r in rows)
    keep = tuple(tuple((lv + 1) / n for lv in range(n)) for n in n_levels)
    costs = {
        "latency": CostTable.build("latency", 1.0, rows),
        "flops": CostTable.build(
            "flops", 1.0, [[w * k for k in ks] for w, ks in zip(FLOPS_W, keep)]
        ),
    }
    return Problem(n_levels, costs, Budget.parse(budget), keep, space_name="toy")


MONOTONE = {
    "toy flops=0.55": lambda: toy_problem("flops=0.55", N_LEVELS, FLOPS_W, FLOPS_W[::-1]),
    "toy flops=0.6,params=0.5": lambda: toy_problem(
        "flops=0.6,params=0.5", N_LEVELS, FLOPS_W, FLOPS_W[::-1]
    ),
    "plateau latency=0.5": lambda: plateau_problem("latency=0.5"),
    "plateau latency=0.6,flops=0.5": lambda: plateau_problem("latency=0.6,flops=0.5"),
}


def problem_calls(p: Problem, seed: int = 7) -> list[tuple[int, ...]]:
    """uniform, random x2, repair of dense, fill of level 0, repair and fill of a random
    candidate, two mutations: one generator throughout."""
    rng = np.random.default_rng(seed)
    out = [p.uniform(), p.random(rng), p.random(rng), p.repair(p.dense(), rng)]
    out.append(p.fill((0,) * p.n_genes, rng))
    out.append(p.repair(tuple(int(rng.integers(0, n)) for n in p.n_levels), rng))
    out.append(p.fill(out[-1], rng))
    out.append(p.mutate(out[1], rng, 2))
    out.append(p.mutate(out[-1], rng, 3))
    return out


def algorithm_calls(p: Problem) -> dict[str, list[tuple[int, ...]]]:
    """The first candidates each algorithm scores (evo: its profile start and first children)."""
    out = {}
    runs = [("evo", {}, 12), ("evo", {"init": "uniform"}, 8), ("tpe", {}, 6),
            ("pymoo-ga", {}, 6), ("random", {}, 4)]  # fmt: skip
    for name, settings, count in runs:
        algo, engine, trials = run(p, name, evals=12, **settings)
        key = name + (f" init={settings['init']}" if settings else "")
        out[key] = list(trials)[:count]
    return out


# Recorded from the code before costs could fall with the level (same calls, same seeds).
EXPECTED: dict[str, dict[str, list[tuple[int, ...]]]] = {
    "plateau latency=0.5": {
        "evo": [
            (0, 4, 3, 4, 2, 4, 4, 3),
            (4, 0, 3, 4, 2, 4, 4, 3),
            (4, 4, 0, 4, 2, 4, 4, 3),
            (4, 4, 3, 0, 2, 4, 4, 3),
            (4, 4, 3, 4, 0, 4, 4, 3),
            (4, 4, 3, 4, 2, 0, 4, 3),
            (4, 4, 3, 4, 2, 4, 0, 3),
            (4, 4, 3, 4, 2, 4, 4, 0),
            (2, 2, 3, 3, 1, 1, 4, 3),
            (0, 2, 3, 4, 1, 1, 4, 3),
            (0, 3, 0, 3, 1, 1, 3, 3),
            (2, 2, 3, 4, 1, 1, 3, 3),
        ],
        "evo init=uniform": [
            (2, 2, 3, 4, 1, 1, 3, 3),
            (2, 2, 3, 4, 1, 2, 0, 3),
            (0, 2, 3, 4, 1, 2, 3, 3),
            (2, 2, 3, 3, 1, 1, 4, 3),
            (0, 2, 3, 3, 1, 2, 4, 3),
            (4, 2, 0, 3, 1, 1, 3, 3),
            (0, 3, 3, 0, 1, 1, 1, 3),
            (2, 2, 0, 4, 1, 1, 4, 3),
        ],
        "problem": [
            (1, 1, 1, 1, 0, 1, 1, 1),
            (0, 2, 3, 4, 1, 2, 3, 3),
            (4, 2, 3, 0, 1, 1, 1, 3),
            (0, 2, 2, 2, 1, 2, 2, 3),
            (2, 2, 3, 3, 1, 1, 4, 3),
            (2, 1, 1, 0, 1, 0, 3, 3),
            (2, 2, 3, 3, 1, 1, 4, 3),
            (0, 2, 3, 4, 1, 1, 4, 3),
            (0, 2, 3, 4, 1, 1, 4, 3),
        ],
        "pymoo-ga": [
            (2, 2, 3, 4, 1, 1, 3, 3),
            (4, 2, 0, 3, 1, 1, 3, 3),
            (2, 2, 0, 3, 1, 2, 4, 3),
            (2, 3, 0, 0, 1, 1, 1, 3),
            (2, 2, 0, 4, 1, 1, 4, 3),
            (4, 2, 0, 0, 1, 2, 1, 3),
        ],
        "random": [
            (4, 2, 3, 0, 1, 1, 1, 3),
            (2, 2, 3, 4, 1, 2, 0, 3),
            (0, 3, 3, 0, 1, 1, 1, 3),
            (0, 2, 3, 4, 1, 2, 3, 3),
        ],
        "tpe": [
            (2, 2, 3, 4, 1, 1, 3, 3),
            (2, 2, 0, 0, 1, 4, 3, 3),
            (2, 2, 3, 0, 1, 2, 3, 3),
            (0, 2, 0, 0, 2, 1, 3, 3),
            (0, 3, 0, 3, 1, 1, 3, 3),
            (2, 2, 3, 0, 1, 4, 0, 3),
        ],
    },
    "plateau latency=0.6,flops=0.5": {
        "evo": [
            (0, 4, 3, 4, 2, 4, 4, 3),
            (4, 0, 3, 4, 2, 4, 4, 3),
            (4, 4, 0, 4, 2, 4, 4, 3),
            (4, 4, 3, 0, 2, 4, 4, 3),
            (4, 4, 3, 4, 0, 4, 4, 3),
            (4, 4, 3, 4, 2, 0, 4, 3),
            (4, 4, 3, 4, 2, 4, 0, 3),
            (4, 4, 3, 4, 2, 4, 4, 0),
            (0, 1, 1, 2, 0, 0, 2, 3),
            (0, 3, 0, 4, 0, 0, 1, 0),
            (0, 2, 0, 4, 0, 1, 4, 0),
            (1, 2, 1, 3, 0, 1, 0, 1),
        ],
        "evo init=uniform": [
            (2, 1, 3, 2, 0, 2, 2, 1),
            (2, 0, 3, 2, 0, 3, 4, 1),
            (2, 1, 3, 1, 0, 1, 3, 2),
            (3, 1, 3, 2, 0, 1, 2, 1),
            (2, 1, 3, 2, 0, 3, 0, 1),
            (4, 1, 3, 1, 0, 2, 2, 1),
            (1, 2, 2, 2, 0, 1, 2, 1),
            (1, 1, 3, 2, 0, 3, 1, 1),
        ],
        "problem": [
            (1, 1, 1, 1, 0, 1, 1, 1),
            (0, 2, 0, 2, 1, 0, 2, 0),
            (1, 1, 2, 1, 0, 2, 3, 2),
            (0, 2, 1, 2, 0, 3, 0, 1),
            (0, 1, 0, 3, 0, 1, 2, 2),
            (2, 1, 0, 3, 0, 0, 0, 2),
            (3, 1, 0, 3, 0, 0, 0, 2),
            (2, 2, 0, 2, 0, 3, 3, 0),
            (2, 2, 0, 1, 0, 4, 4, 0),
        ],
        "pymoo-ga": [
            (2, 1, 3, 2, 0, 2, 2, 1),
            (0, 0, 1, 4, 1, 2, 0, 0),
            (1, 1, 1, 1, 1, 1, 0, 1),
            (2, 2, 1, 0, 0, 1, 3, 2),
            (2, 1, 3, 0, 0, 3, 2, 2),
            (2, 2, 0, 2, 0, 1, 2, 1),
        ],
        "random": [
            (3, 3, 2, 0, 0, 1, 0, 1),
            (2, 2, 2, 1, 0, 0, 1, 2),
            (4, 0, 1, 2, 1, 2, 0, 0),
            (3, 2, 1, 1, 0, 2, 1, 1),
        ],
        "tpe": [
            (2, 1, 3, 2, 0, 2, 2, 1),
            (0, 3, 1, 2, 0, 1, 0, 1),
            (4, 0, 2, 0, 1, 4, 1, 0),
            (0, 0, 2, 3, 1, 3, 0, 0),
            (1, 1, 1, 2, 0, 0, 1, 3),
            (0, 2, 0, 1, 0, 1, 4, 2),
        ],
    },
    "toy flops=0.55": {
        "evo": [
            (0, 4, 4, 4, 3, 3, 5, 2),
            (4, 0, 4, 4, 3, 3, 5, 2),
            (4, 4, 0, 4, 3, 3, 5, 2),
            (4, 4, 4, 0, 3, 3, 5, 2),
            (4, 4, 4, 4, 0, 3, 5, 2),
            (4, 4, 4, 4, 3, 0, 5, 2),
            (4, 4, 4, 4, 3, 3, 0, 2),
            (4, 4, 4, 4, 3, 3, 5, 0),
            (1, 4, 1, 3, 0, 0, 5, 0),
            (0, 4, 3, 3, 0, 0, 5, 0),
            (1, 4, 1, 1, 0, 0, 5, 1),
            (1, 3, 1, 1, 1, 1, 5, 0),
        ],
        "evo init=uniform": [
            (2, 1, 1, 1, 2, 2, 2, 0),
            (1, 1, 1, 1, 2, 2, 4, 0),
            (2, 1, 2, 2, 1, 1, 3, 1),
            (0, 1, 1, 3, 2, 1, 2, 0),
            (1, 1, 2, 2, 1, 2, 2, 1),
            (1, 3, 1, 2, 1, 1, 2, 0),
            (2, 0, 0, 2, 2, 3, 2, 0),
            (1, 3, 1, 2, 0, 2, 1, 1),
        ],
        "problem": [
            (1, 1, 1, 1, 1, 1, 1, 0),
            (0, 2, 1, 2, 2, 0, 3, 0),
            (1, 1, 3, 2, 1, 1, 4, 1),
            (1, 1, 3, 2, 0, 2, 2, 1),
            (1, 0, 0, 3, 1, 1, 1, 2),
            (2, 1, 1, 4, 0, 0, 1, 2),
            (2, 1, 1, 4, 0, 0, 2, 2),
            (0, 3, 2, 3, 1, 0, 2, 0),
            (0, 0, 1, 3, 3, 0, 1, 0),
        ],
        "pymoo-ga": [
            (2, 1, 1, 1, 2, 2, 2, 0),
            (1, 0, 0, 3, 0, 3, 4, 2),
            (3, 2, 1, 3, 1, 0, 3, 0),
            (1, 4, 0, 2, 0, 0, 2, 1),
            (4, 2, 3, 2, 1, 0, 3, 0),
            (1, 3, 2, 2, 0, 1, 3, 1),
        ],
        "random": [
            (4, 3, 3, 1, 1, 0, 1, 0),
            (1, 3, 1, 2, 1, 1, 2, 0),
            (2, 3, 4, 0, 0, 3, 0, 1),
            (1, 2, 4, 3, 1, 1, 1, 0),
        ],
        "tpe": [
            (2, 1, 1, 1, 2, 2, 2, 0),
            (0, 2, 1, 2, 1, 1, 2, 1),
            (4, 1, 3, 1, 1, 3, 3, 0),
            (0, 1, 3, 3, 2, 1, 0, 0),
            (2, 1, 3, 3, 1, 0, 1, 1),
            (1, 1, 0, 3, 0, 1, 5, 2),
        ],
    },
    "toy flops=0.6,params=0.5": {
        "evo": [
            (0, 4, 4, 4, 3, 3, 5, 2),
            (4, 0, 4, 4, 3, 3, 5, 2),
            (4, 4, 0, 4, 3, 3, 5, 2),
            (4, 4, 4, 0, 3, 3, 5, 2),
            (4, 4, 4, 4, 0, 3, 5, 2),
            (4, 4, 4, 4, 3, 0, 5, 2),
            (4, 4, 4, 4, 3, 3, 0, 2),
            (4, 4, 4, 4, 3, 3, 5, 0),
            (0, 1, 1, 2, 0, 1, 4, 0),
            (1, 4, 0, 2, 0, 0, 3, 0),
            (0, 4, 1, 2, 0, 1, 3, 0),
            (1, 4, 0, 1, 0, 3, 3, 1),
        ],
        "evo init=uniform": [
            (1, 2, 1, 1, 2, 2, 2, 0),
            (0, 3, 1, 1, 2, 2, 2, 0),
            (1, 2, 1, 1, 1, 3, 2, 1),
            (1, 1, 2, 0, 3, 3, 2, 0),
            (0, 2, 1, 2, 2, 3, 1, 0),
            (0, 1, 3, 0, 3, 1, 2, 1),
            (2, 2, 2, 0, 2, 3, 2, 0),
            (0, 3, 0, 0, 3, 1, 1, 0),
        ],
        "problem": [
            (1, 1, 1, 1, 1, 1, 1, 0),
            (0, 2, 0, 1, 2, 0, 4, 0),
            (1, 4, 1, 1, 1, 0, 3, 0),
            (1, 1, 4, 1, 1, 1, 2, 0),
            (0, 3, 1, 3, 1, 1, 0, 1),
            (0, 2, 2, 3, 0, 0, 1, 1),
            (0, 2, 2, 3, 0, 0, 1, 1),
            (0, 1, 0, 1, 3, 1, 3, 0),
            (0, 0, 0, 2, 1, 0, 4, 0),
        ],
        "pymoo-ga": [
            (1, 2, 1, 1, 2, 2, 2, 0),
            (1, 0, 1, 1, 0, 3, 3, 2),
            (1, 3, 4, 0, 2, 0, 0, 1),
            (3, 1, 2, 0, 1, 1, 2, 1),
            (2, 3, 2, 0, 2, 0, 0, 1),
            (1, 4, 4, 0, 1, 3, 2, 0),
        ],
        "random": [
            (4, 3, 2, 1, 1, 0, 0, 0),
            (0, 2, 2, 2, 0, 1, 3, 0),
            (4, 3, 4, 0, 0, 3, 0, 1),
            (1, 3, 2, 2, 1, 3, 0, 0),
        ],
        "tpe": [
            (1, 2, 1, 1, 2, 2, 2, 0),
            (0, 2, 1, 2, 1, 1, 1, 2),
            (4, 1, 3, 0, 2, 2, 0, 0),
            (1, 3, 1, 3, 1, 0, 0, 0),
            (0, 3, 0, 4, 1, 0, 0, 0),
            (0, 0, 0, 1, 2, 1, 3, 2),
        ],
    },
}


@pytest.mark.parametrize("name", list(MONOTONE))
def test_costs_that_grow_with_the_level_give_the_same_candidates_as_before(name: str) -> None:
    p = MONOTONE[name]()
    assert all(np.all(np.diff(r) >= 0) for t in p.costs.values() for r in t.levels)
    assert problem_calls(p) == EXPECTED[name]["problem"]
    assert algorithm_calls(p) == {k: v for k, v in EXPECTED[name].items() if k != "problem"}
