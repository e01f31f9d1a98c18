"""Problem: feasibility, repair / fill / mutate / uniform on hand-made, unequal cost tables."""

from __future__ import annotations

import numpy as np
import pytest

from latency_models.table import CostTable
from searcher.budget import Budget
from searcher.errors import SearcherError
from searcher.problem import Problem

# Eight genes with different numbers of levels and very different costs per gene.
N_LEVELS = (5, 5, 3, 5, 4, 5, 2, 6)
FLOPS_W = (3.0, 7.0, 11.0, 2.0, 5.0, 13.0, 1.0, 8.0)
FLOPS_Q = (1.0, 0.0, 4.0, 0.5, 2.0, 0.0, 3.0, 1.5)  # a quadratic part, like attention scores
PARAMS_W = (10.0, 1.0, 4.0, 8.0, 2.0, 6.0, 9.0, 0.5)
NONZERO_W = (2.0, 9.0, 1.0, 3.0, 7.0, 0.5, 4.0, 6.0)


def keep_grid(n: int) -> tuple[float, ...]:
    """Kept fraction per level: (l + 1) / n, so level 0 keeps something."""
    return tuple((lv + 1) / n for lv in range(n))


KEEP = tuple(keep_grid(n) for n in N_LEVELS)


def tables(metrics=("flops", "params")) -> dict[str, CostTable]:
    out = {}
    if "flops" in metrics:
        out["flops"] = CostTable.build(
            "flops",
            4.0,
            [[w * k + q * k * k for k in keep] for w, q, keep in zip(FLOPS_W, FLOPS_Q, KEEP)],
        )
    if "params" in metrics:
        out["params"] = CostTable.build(
            "params", 2.0, [[w * k for k in keep] for w, keep in zip(PARAMS_W, KEEP)]
        )
    if "nonzero" in metrics:
        out["nonzero"] = CostTable.build(
            "nonzero", 0.0, [[w * k for k in keep] for w, keep in zip(NONZERO_W, KEEP)]
        )
    return out


def make(budget: str, metrics=("flops", "params")) -> Problem:
    return Problem(N_LEVELS, tables(metrics), Budget.parse(budget), KEEP, space_name="toy")


def fraction(table: CostTable, genes) -> float:
    """Cost fraction of dense, computed here from the raw table."""
    cost = table.base + sum(float(table.levels[g][lv]) for g, lv in enumerate(genes))
    dense = table.base + sum(float(t[-1]) for t in table.levels)
    return cost / dense


def fits(problem: Problem, genes) -> bool:
    return all(
        fraction(problem.costs[m], genes) <= limit + 1e-9
        for m, limit in problem.budget.limits.items()
    )


def assert_valid(problem: Problem, genes) -> None:
    assert len(genes) == problem.n_genes
    assert all(isinstance(x, int) for x in genes)
    assert all(0 <= x < n for x, n in zip(genes, problem.n_levels)), genes


def assert_feasible(problem: Problem, genes) -> None:
    assert_valid(problem, genes)
    assert fits(problem, genes), (genes, problem.fractions(genes))
    assert problem.feasible(genes)


def assert_tight(problem: Problem, genes) -> None:
    """Feasible, and raising any single gene one level breaks the budget."""
    assert_feasible(problem, genes)
    for i, (x, n) in enumerate(zip(genes, problem.n_levels)):
        if x < n - 1:
            raised = list(genes)
            raised[i] += 1
            assert not fits(problem, raised), f"gene {i} of {genes} could still be raised"


BUDGETS = [
    "flops=0.5",
    "flops=0.3",
    "flops=0.8",
    "params=0.45",
    "flops=0.6,params=0.5",
    "flops=0.4,params=0.7",
    "flops=0.7,params=0.35",
]


def test_tables_really_are_unequal() -> None:
    t = tables()
    per_gene = [float(lv[-1] - lv[0]) for lv in t["flops"].levels]
    assert len(set(per_gene)) == len(per_gene)


def test_basic_accessors() -> None:
    p = make("flops=0.5")
    assert p.n_genes == len(N_LEVELS)
    assert p.dense() == tuple(n - 1 for n in N_LEVELS)
    assert p.fractions(p.dense()) == pytest.approx({"flops": 1.0, "params": 1.0})
    assert not p.feasible(p.dense())
    assert p.feasible((0,) * p.n_genes)
    assert p.budget_keys() == ["flops", "params"]
    assert make("sparsity=0.5", ("flops", "params", "nonzero")).budget_keys() == [
        "flops",
        "params",
        "sparsity",
    ]


@pytest.mark.parametrize("budget", ["flops=0.05", "params=0.1", "flops=0.9,params=0.1"])
def test_infeasible_budget_raises_at_construction(budget: str) -> None:
    floor = Problem(N_LEVELS, tables(), Budget.parse("flops=1"), KEEP).minimum_fractions()
    assert floor["flops"] > 0.05 and floor["params"] > 0.1
    with pytest.raises(SearcherError, match="infeasible"):
        make(budget)


def test_budget_at_the_floor_is_feasible() -> None:
    floor = Problem(N_LEVELS, tables(), Budget.parse("flops=1"), KEEP).minimum_fractions()
    p = make(f"flops={floor['flops'] + 1e-6:.9f}")
    assert p.feasible((0,) * p.n_genes)
    assert p.uniform() == (0,) * p.n_genes
    rng = np.random.default_rng(0)
    assert_tight(p, p.random(rng))


@pytest.mark.parametrize(
    ("budget", "metrics"),
    [("sparsity=0.5", ("flops", "params")), ("params=0.5", ("flops",)), ("flops=0.5", ())],
)
def test_budget_on_missing_metric_raises(budget: str, metrics) -> None:
    with pytest.raises(SearcherError):
        make(budget, metrics)


@pytest.mark.parametrize("budget", BUDGETS)
def test_repair_always_feasible(budget: str) -> None:
    p = make(budget)
    rng = np.random.default_rng(1)
    for _ in range(300):
        start = tuple(int(rng.integers(0, n)) for n in N_LEVELS)
        out = p.repair(start, rng)
        assert_feasible(p, out)
        assert all(a <= b for a, b in zip(out, start)), "repair only lowers genes"
        if fits(p, start):
            assert out == start, "a feasible candidate needs no repair"
    assert_feasible(p, p.repair(p.dense(), rng))


@pytest.mark.parametrize("budget", BUDGETS)
def test_fill_is_feasible_and_tight(budget: str) -> None:
    p = make(budget)
    rng = np.random.default_rng(2)
    starts = [(0,) * p.n_genes]
    for _ in range(200):
        starts.append(p.repair(tuple(int(rng.integers(0, n)) for n in N_LEVELS), rng))
    for start in starts:
        out = p.fill(start, rng)
        assert_tight(p, out)
        assert all(a >= b for a, b in zip(out, start)), "fill only raises genes"


def test_fill_of_a_tight_candidate_is_itself() -> None:
    p = make("flops=0.6,params=0.5")
    rng = np.random.default_rng(3)
    for _ in range(50):
        c = p.random(rng)
        assert p.fill(c, rng) == c


@pytest.mark.parametrize("budget", BUDGETS)
def test_random_is_feasible_and_tight(budget: str) -> None:
    p = make(budget)
    rng = np.random.default_rng(4)
    seen = {p.random(rng) for _ in range(100)}
    for c in seen:
        assert_tight(p, c)
    assert len(seen) > 5  # really random


@pytest.mark.parametrize("budget", BUDGETS + ["sparsity=0.6", "flops=0.5,sparsity=0.5"])
def test_mutation_feasibility(budget: str) -> None:
    """500 mutations, from random parents and along chains: every child feasible and tight."""
    p = make(budget, ("flops", "params", "nonzero"))
    rng = np.random.default_rng(5)
    parent = p.random(rng)
    children = set()
    for k in range(500):
        if k % 50 == 0:
            parent = p.random(rng)
        switches = int(rng.integers(1, 5))
        child = p.mutate(parent, rng, switches)
        assert_tight(p, child)
        children.add(child)
        parent = child if rng.random() < 0.5 else parent
    assert len(children) > 5  # mutations explore, they do not just return the parent


def test_mutation_with_equal_costs_preserves_total_when_budget_binds() -> None:
    """Equal unit costs: a level switch keeps the cost, so the child stays on the budget."""
    n_levels = (5,) * 6
    keep = tuple(keep_grid(5) for _ in n_levels)
    costs = {"flops": CostTable.build("flops", 0.0, [list(range(1, 6)) for _ in n_levels])}
    p = Problem(n_levels, costs, Budget.parse("flops=0.6"), keep)  # 18 of 30 units
    rng = np.random.default_rng(7)
    parent = p.random(rng)
    assert sum(parent) + 6 == 18
    for _ in range(200):
        child = p.mutate(parent, rng, int(rng.integers(1, 4)))
        assert sum(child) + 6 == 18
        parent = child


@pytest.mark.parametrize("seed", range(20))
def test_mutation_feasibility_random_problems(seed: int) -> None:
    """Random unequal tables and random one- or two-metric budgets."""
    rng = np.random.default_rng(1000 + seed)
    n_levels = tuple(int(x) for x in rng.integers(2, 7, size=int(rng.integers(3, 12))))
    keep = tuple(keep_grid(n) for n in n_levels)
    costs = {}
    for m in ("flops", "params"):
        rows = [np.cumsum(rng.uniform(0.1, 10.0, size=n)) for n in n_levels]
        costs[m] = CostTable.build(m, float(rng.uniform(0, 5)), rows)
    probe = Problem(n_levels, costs, Budget.parse("flops=1"), keep)
    floor = probe.minimum_fractions()
    terms = []
    for m in rng.permutation(["flops", "params"])[: int(rng.integers(1, 3))]:
        terms.append(f"{m}={rng.uniform(floor[m] + 0.01, 1.0):.6f}")
    p = Problem(n_levels, costs, Budget.parse(",".join(terms)), keep)
    parent = p.random(rng)
    for _ in range(100):
        child = p.mutate(parent, rng, int(rng.integers(1, 4)))
        assert_tight(p, child)
        parent = child
    assert_feasible(p, p.uniform())


def independent_uniform(problem: Problem) -> tuple[int, ...]:
    grid = sorted({f for row in problem.keep for f in row}, reverse=True)
    for target in grid:
        genes = []
        for row in problem.keep:
            # nearest kept fraction, ties broken towards the larger fraction
            best = min(range(len(row)), key=lambda lv, row=row: (abs(row[lv] - target), -row[lv]))
            genes.append(best)
        if fits(problem, genes):
            return tuple(genes)
    raise AssertionError("no feasible uniform candidate")


@pytest.mark.parametrize("budget", BUDGETS)
def test_uniform_on_a_shared_grid(budget: str) -> None:
    n_levels = (5,) * 8
    keep = tuple(keep_grid(5) for _ in n_levels)
    t = tables()
    costs = {
        m: CostTable.build(m, tb.base, [keep_levels(lv, 5) for lv in tb.levels])
        for m, tb in t.items()
    }
    p = Problem(n_levels, costs, Budget.parse(budget), keep)
    u = p.uniform()
    assert_feasible(p, u)
    if min(u) == 0 and len(set(u)) > 1:
        # Only the all-minimum common level fits: what fits is then spread over the genes.
        assert not fits(p, (1,) * len(u)), "a common level above the minimum must not fit"
        assert set(u) == {0, 1}
        return
    assert len(set(u)) == 1, "a shared grid gives every gene the same level"
    if u[0] < 4:
        assert not fits(p, tuple(x + 1 for x in u)), "the next larger fraction must not fit"


def test_uniform_on_a_keep_or_drop_grid_spreads_what_fits() -> None:
    n = 12
    levels = [[0.0, 1.0]] * n
    p = Problem(
        (2,) * n, {"flops": CostTable.build("flops", 0.0, levels)}, Budget.parse("flops=0.75"),
        ((0.0, 1.0),) * n,
    )  # fmt: skip
    u = p.uniform()
    assert sum(u) == 9  # as many kept as fit
    dropped = [i for i, x in enumerate(u) if x == 0]
    assert min(b - a for a, b in zip(dropped, dropped[1:])) >= 3  # spread, not bunched


def keep_levels(levels: np.ndarray, n: int) -> list[float]:
    """Resample a gene's cost row onto n levels (keeping it increasing)."""
    top = float(levels[-1])
    return [top * (lv + 1) / n for lv in range(n)]


@pytest.mark.parametrize("budget", BUDGETS)
def test_uniform_on_unequal_grids(budget: str) -> None:
    p = make(budget)
    u = p.uniform()
    assert_feasible(p, u)
    assert u == independent_uniform(p)
    # The common fraction is the largest grid value that fits: every larger one does not.
    grid = sorted({f for row in KEEP for f in row})
    nearest = [
        [
            min(range(len(row)), key=lambda lv, row=row, t=t: (abs(row[lv] - t), -row[lv]))
            for row in KEEP
        ]
        for t in grid
    ]
    chosen = max(i for i, genes in enumerate(nearest) if tuple(genes) == u)
    for genes in nearest[chosen + 1 :]:
        assert not fits(p, genes)


def test_uniform_dense_when_budget_allows() -> None:
    assert make("flops=1").uniform() == tuple(n - 1 for n in N_LEVELS)


@pytest.mark.parametrize("budget", BUDGETS)
def test_same_seed_same_sequence(budget: str) -> None:
    def run(seed: int) -> list[tuple[int, ...]]:
        p = make(budget)
        rng = np.random.default_rng(seed)
        out = [p.random(rng)]
        for _ in range(30):
            out.append(p.mutate(out[-1], rng, 2))
        out.append(p.repair(p.dense(), rng))
        out.append(p.fill((0,) * p.n_genes, rng))
        return out

    assert run(11) == run(11)
    assert run(11) != run(12)
