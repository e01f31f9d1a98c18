"""Single-unit profiles sized to the evaluations, and evo's default start from them (no torch)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from searcher.algorithms.allocations import ProfileSeed
from searcher.algorithms.evolution import Evolution
from searcher.algorithms.profile import (
    SPLIT_EXPONENTS,
    Profile,
    curve,
    knapsack,
    plan,
    sized,
    spaced_picks,
)
from searcher.engine import Engine
from tests.algorithms.test_allocations import (
    N_LEVELS,
    FakePool,
    additive_kl,
    brute_force,
    problem,
)

LAYERS = (0, 0, 1, 1, 2, 2)  # two genes per decoder layer
SETTINGS = {"stages": "1:2,2:1", "offspring": 4}


def layered(budget: str = "flops=0.55"):
    return dataclasses.replace(problem(budget), layers=LAYERS)


def test_spaced_picks_start_one_step_below_the_uniform_allocation() -> None:
    sparsity = [0.1 * k for k in range(1, 11)]  # kept 10% ... 100% (dense)
    assert spaced_picks(sparsity, 0.3, 1) == (1,)  # kept 20%: sparsity 80% under 70%
    assert spaced_picks(sparsity, 0.3, 2) == (1, 2)
    assert spaced_picks(sparsity, 0.3, 3) == (1, 2, 3)
    assert spaced_picks(sparsity, 0.9, 3) == (5, 7, 8)  # shifted down: never dense
    mlp = [k / 16 for k in range(1, 17)]
    assert spaced_picks(mlp, 6 / 16, 1) == (3,)  # two 1/16 steps below 6/16
    assert spaced_picks([0.0, 1.0], 1.0, 3) == (0,)  # keep or drop: the drop
    assert spaced_picks([1.0], 1.0, 2) == ()  # nothing below dense
    # nearby budgets share options: their candidates meet in the score cache
    assert set(spaced_picks(sparsity, 0.3, 2)) & set(spaced_picks(sparsity, 0.4, 2))


def test_plan_is_the_finest_profile_within_its_share() -> None:
    p = layered()
    found = {}
    for evals in (1000, 16, 12, 6, 4, 2):
        profiles = plan(p, full_windows=2, windows=1, evals=evals)
        spent = sum(x.cost(2) for x in profiles) + 2 * (len(profiles) - 1)
        assert spent <= min(0.6 * evals, evals - 2)  # with two full starts per extra profile
        found[evals] = [(len(x.groups), max(len(k) for k in x.picks)) for x in profiles]
    # per gene, as many options as fit beside one per layer; per layer, as many as then fit
    assert found[1000] == [(3, 4), (6, 4)]
    assert found[16] == [(3, 1), (6, 2)] and found[12] == [(3, 1), (6, 1)]
    assert found[6][0][0] == 3 and len(found[6]) == 1 and found[2] == []
    flat = dataclasses.replace(p, layers=())  # layers unknown: one gene per group
    assert [len(x.groups) for x in plan(flat, 2, 1, 1000)] == [p.n_genes]


def test_profile_candidates_lower_one_group_from_dense() -> None:
    p = layered()
    prof = sized(p, ((0, 1), (2, 3), (4, 5)), 2, windows=1)
    dense = p.dense()
    for c in prof.candidates():
        changed = {g for g in range(p.n_genes) if c[g] != dense[g]}
        assert changed and any(changed <= set(group) for group in prof.groups)
    for opts in prof.options:  # ascending kept fraction, ending dense
        assert opts[-1] == {g: dense[g] for g in opts[-1]}
        kept = [np.mean([p.keep[g][lv] for g, lv in o.items()]) for o in opts]
        assert kept == sorted(kept)


def test_no_option_below_the_lowest_scored_one() -> None:
    """Errors are interpolated between scored options and the dense end, never
    extrapolated below: the solver cannot take an unmeasured extreme for free."""
    p = problem()
    g = 1  # 5 levels; only level 2 scored (kept 0.6): error 1 there, 0 dense
    prof = Profile(p, ((g,),), ((2,),), 1)
    err = prof.errors(0, {prof.alone(0, 2): 1.0})
    assert np.isinf(err[:2]).all()
    assert list(err[2:]) == pytest.approx([1.0, 0.25, 0.0])  # quadratic from the dense end
    # the solution keeps to the scored range even where the errors would reward going lower
    picks = tuple((2,) if i == g else tuple(range(n - 1)) for i, n in enumerate(N_LEVELS))
    whole = Profile(p, tuple((i,) for i in range(p.n_genes)), picks, 1)
    scores = {whole.alone(i, o): (0.001 if i == g else 1.0) * (n - 1 - o)
              for i, n in enumerate(N_LEVELS) for o in whole.picks[i]}  # fmt: skip
    chosen = whole.solve(scores)
    assert chosen[g] == 2 and p.feasible(chosen)


def test_curve_is_a_power_law_through_neighbouring_scores() -> None:
    at, err = np.array([0.8, 0.4, 0.2]), np.array([8.0, 2.0, 0.5])  # error = 12.5 * r^2
    for r in (0.1, 0.2, 0.3, 0.5, 0.8):
        assert curve(r, at, err) == pytest.approx(12.5 * r**2)
    cubic = np.array([0.8**3, 0.4**3, 0.2**3])  # a steeper law between scores is kept
    assert curve(0.6, at, cubic) == pytest.approx(0.6**3)
    assert curve(0.3, np.array([0.4, 0.2]), np.array([1.0, 0.0])) == pytest.approx(0.5)


def test_knapsack_picks_the_cheapest_when_nothing_fits() -> None:
    costs = [np.array([1.0, 2.0]), np.array([3.0, 1.0])]
    errors = [np.array([5.0, 0.0]), np.array([0.0, 5.0])]
    assert knapsack(costs, errors, room=1.5, bins=100) == [0, 1]
    assert knapsack(costs, errors, room=5.0, bins=100) == [1, 0]


@pytest.mark.parametrize("budget", ["flops=0.55", "params=0.4", "flops=0.7"])
def test_the_default_start_is_optimal_when_errors_add_up(budget: str) -> None:
    """With evaluations for the full profile, the start is the additive optimum."""
    p = problem(budget)
    seed = ProfileSeed.configure(p, 0, 2, {**SETTINGS, "evals": 1000})
    assert [len(x.groups) for x in seed.profiles] == [p.n_genes]
    Engine(p, seed, FakePool(), max_evals=1000).run()
    assert seed.done and p.feasible(seed.chosen)
    assert additive_kl(seed.chosen) == pytest.approx(brute_force(p))


def test_default_evo_fits_its_profile_into_the_evaluations() -> None:
    p = layered()
    for evals in (6.0, 12.0, 40.0):
        evo = Evolution.configure(p, 0, 2, {**SETTINGS, "evals": evals})
        pool = FakePool()
        engine = Engine(p, evo, pool, max_evals=evals)
        engine.run()
        assert engine.spent_windows <= evals * 2  # --evals is a hard cap
        best = engine.best()
        assert best is not None and p.feasible(best.candidate)
        profiled = [j for j in pool.jobs if j.stop - j.start == 1 and j.start == 0]
        assert len(profiled) >= 3  # some profile ran, even at 6 evaluations (per layer)


def test_default_evo_without_room_for_a_profile_still_gives_a_result() -> None:
    p = layered()
    evo = Evolution.configure(p, 0, 2, {**SETTINGS, "evals": 1.0})
    assert evo.init is not None and evo.init.profiles == []
    engine = Engine(p, evo, FakePool(), max_evals=1.0)
    engine.run()
    best = engine.best()
    assert best is not None and best.number == 0  # the uniform allocation, filled to budget
    assert all(lv >= u for lv, u in zip(best.candidate, p.uniform(), strict=True))


def test_default_evo_is_deterministic_for_a_seed() -> None:
    def jobs(seed: int) -> list:
        p = layered()
        evo = Evolution.configure(p, seed, 2, {**SETTINGS, "evals": 30.0})
        pool = FakePool(lambda c: additive_kl(c) * (1 + 0.1 * np.sin(sum(c))))
        Engine(p, evo, pool, max_evals=30.0).run()
        return [(j.candidate, j.start, j.stop) for j in pool.jobs]

    assert jobs(3) == jobs(3)
    assert jobs(3) != jobs(4)


def test_shared_candidates_are_the_profile() -> None:
    p = layered()
    evo = Evolution.configure(p, 0, 2, {**SETTINGS, "evals": 40.0})
    assert evo.shared() == frozenset(c for x in evo.init.profiles for c in x.candidates())
    uniform_start = Evolution.configure(p, 0, 2, {**SETTINGS, "evals": 40.0, "init": "uniform"})
    assert uniform_start.shared() == frozenset()


def test_profile_candidates_are_neither_timed_nor_skipped_under_a_measured_budget() -> None:
    p = layered()
    evo = Evolution.configure(p, 0, 2, {**SETTINGS, "evals": 20.0})
    timed: list = []

    def measure(c):  # the device says: whatever the table predicts
        timed.append(c)
        return p.cost(c)

    pool = FakePool()
    profile = set(evo.shared())
    engine = Engine(p, evo, pool, max_evals=20.0, measure=measure)
    engine.run()
    assert profile and not profile & set(timed)  # never timed
    assert profile <= {j.candidate for j in pool.jobs}  # but scored
    assert engine.best() is not None and p.feasible(engine.best().candidate)


def test_no_profile_where_no_gene_can_be_lowered() -> None:
    p = dataclasses.replace(
        problem(), n_levels=(1,) * 6, keep=((1.0,),) * 6, layers=LAYERS
    )  # fmt: skip
    assert plan(p, 2, 1, 1000) == []


def test_knapsack_says_so_when_every_choice_that_fits_is_unknown() -> None:
    costs = [np.array([1.0, 2.0]), np.array([1.0, 2.0])]
    errors = [np.array([np.inf, 0.0]), np.array([np.inf, 0.0])]
    assert knapsack(costs, errors, room=3.0, bins=100) is None
    assert knapsack(costs, errors, room=4.0, bins=100) == [1, 1]


def test_split_charges_each_gene_its_share_of_its_layer() -> None:
    """A per-layer profile's errors split among each layer's genes by a prior: a gene is
    charged its share of the layer's error at the share its level removes; a gene with no
    share is free down to the layer's lowest scored option, so the solution lowers those
    before it touches the others."""
    p = layered("flops=0.8")
    prof = sized(p, ((0, 1), (2, 3), (4, 5)), 2, windows=1)
    scores = {c: additive_kl(c) for c in prof.candidates()}
    free = (0.0, 1.0) * 3  # the first gene of every layer: no share
    options, errors = prof.split_errors(scores, free)
    assert [list(o[0]) for o in options] == [[g] for g in range(6)]
    for g, err in enumerate(errors):
        layer = g // 2
        floor = 1 - prof.kept(layer, prof.picks[layer][0])
        removed = np.array([1 - k for k in p.keep[g]])
        assert np.isinf(err[removed > floor + 1e-12]).all()  # never below what was scored
        finite = err[removed <= floor + 1e-12]
        assert finite[-1] == 0.0  # dense
        if free[g] == 0:
            assert (finite == 0).all()
        else:  # the whole layer's error at that share: the other gene has none
            layer_err = prof.error_at(layer, removed[removed <= floor + 1e-12], scores)
            assert finite == pytest.approx(layer_err)
    got = prof.split(scores, free)
    assert p.feasible(got)
    lowest = [int(np.flatnonzero(np.isfinite(e))[0]) for e in errors]
    charged = [g for g in range(6) if free[g] > 0 and got[g] < p.dense()[g]]
    not_floored = [g for g in range(6) if free[g] == 0 and got[g] > lowest[g]]
    assert not (charged and not_floored), (got, lowest)


def test_the_default_start_adds_the_split_solution_where_the_space_has_the_prior() -> None:
    plain = layered("flops=0.7")
    starts = {}
    for name, prior in (("plain", None), ("first", [0.1, 1.0] * 3), ("second", [1.0, 0.1] * 3)):
        p = plain if prior is None else dataclasses.replace(plain, priors={"residual_ratio": prior})
        seed = ProfileSeed.configure(p, 0, 2, {**SETTINGS, "evals": 12.0})
        assert any(len(g) > 1 for x in seed.profiles for g in x.groups)  # a per-layer profile
        Engine(p, seed, FakePool(), max_evals=12.0).run()
        assert seed.done and p.feasible(seed.chosen) and seed.chosen in seed.starts
        starts[name] = seed.starts
    n = len(starts["plain"])
    for name in ("first", "second"):  # the same starts, then the split solutions
        assert starts[name][:n] == starts["plain"]
        assert 1 <= len(starts[name]) - n <= len(SPLIT_EXPONENTS)
    # a small share makes a gene cheap to lower: the split lowers the genes the prior spares
    for first in starts["first"][n:]:
        for second in starts["second"][n:]:
            assert sum(first[0::2]) < sum(second[0::2]) and sum(second[1::2]) < sum(first[1::2])


def test_a_sharper_split_charges_the_larger_share_more() -> None:
    """``exponent`` sharpens the prior: with shares 1 and 2 in every layer, exponent 2
    charges the second gene 4/5 of its layer's error where exponent 1 charges it 2/3."""
    p = layered("flops=0.8")
    prof = sized(p, ((0, 1), (2, 3), (4, 5)), 2, windows=1)
    scores = {c: additive_kl(c) for c in prof.candidates()}
    shares = (1.0, 2.0) * 3
    _, linear = prof.split_errors(scores, shares)
    _, square = prof.split_errors(scores, [s**2 for s in shares])
    for g in range(6):
        known = np.isfinite(linear[g]) & (linear[g] > 0)
        want = (0.8 / (2 / 3) if g % 2 else 0.2 / (1 / 3)) * linear[g][known]
        assert square[g][known] == pytest.approx(want)
    for exponent in SPLIT_EXPONENTS:
        assert p.feasible(prof.split(scores, shares, exponent))
