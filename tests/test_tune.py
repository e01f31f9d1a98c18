"""A searcher search as a Ray Tune experiment: every trial reports, and the best candidate is
on budget and scored exactly as the core's Evaluator scores it."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from searcher.budget import Budget
from searcher.cluster import connected
from searcher.fitness import Evaluator
from searcher.run import SessionKey, open_session, problem_for
from searcher.spec import RunSpec
from searcher.tune import CandidateTrainable, best_candidate, portable, tune_search

FULL = 2  # the last stage's windows


@pytest.fixture(scope="module")
def ray_local():
    """One new local Ray instance for the module ("local": not a ``ray start`` cluster that may
    be running on this machine)."""
    with connected(None, 2):  # as `searcher run --workers 2` starts one
        yield


def tiny_spec(tiny_dir: Path) -> RunSpec:
    return RunSpec(
        model=str(tiny_dir), seq_len=32, importance_windows=2, validation_windows=2,
        stages=f"1:2,{FULL}:1", threads=1, budget="flops=0.5", seed=3,
    )  # fmt: skip


def test_tune_search_finds_an_on_budget_candidate_scored_exactly(
    ray_local, tiny_dir: Path, tmp_path: Path
) -> None:
    spec = tiny_spec(tiny_dir)
    grid = tune_search(spec, num_samples=6, storage_path=str(tmp_path), name="tiny")
    assert len(grid) == 6 and grid.num_errors == 0
    for result in grid:
        m = result.metrics
        assert math.isfinite(m["kl"]) and m["kl"] >= 0
        assert 1 <= m["windows"] <= FULL and m["feasible"]
    assert any(r.metrics["windows"] == FULL for r in grid)
    assert (tmp_path / "tiny").is_dir()

    best = best_candidate(grid)
    assert best["windows"] == FULL
    session = open_session(SessionKey.of(spec.resolved(), FULL))
    problem = problem_for(session.space, Budget.parse(spec.budget))
    genes = tuple(best["genes"])
    assert problem.feasible(genes)
    assert problem.fractions(genes)["flops"] <= 0.5 + 1e-9
    evaluator = Evaluator(
        session.loaded.model, session.windows.calibration[:FULL], session.space.apply,
        session.space.dense(), 4,
    )  # fmt: skip
    want = float(evaluator.score(genes, 0, FULL).kl.mean())
    assert best["kl"] == pytest.approx(want, abs=1e-9, rel=0)


def test_trainable_repairs_infeasible_proposals_and_switches_candidates(tiny_dir: Path) -> None:
    """In-process (no Ray actor): the dense proposal is repaired onto the budget, scored one
    window per step, and ``reset_config`` switches candidate without reloading."""
    spec = tiny_spec(tiny_dir).resolved()
    from searcher.tune import param_space, resident

    space = param_space(spec)
    levels = resident(spec).problem.n_levels
    dense = {"spec": space["spec"], **{f"g{i}": n - 1 for i, n in enumerate(levels)}}
    trainable = CandidateTrainable(config=dense)
    try:
        first = trainable.train()
        assert first["windows"] == 1 and first["repaired"] and first["feasible"]
        assert first["frac_flops"] <= 0.5 + 1e-9 and not first.get("done")
        last = trainable.train()
        assert last["windows"] == FULL and last["done"] and last["genes"] == first["genes"]
        state = trainable.state
        zeros = {"spec": space["spec"], **{f"g{i}": 0 for i in range(len(levels))}}
        assert trainable.reset(zeros)
        assert trainable.state is state  # the same resident model
        again = trainable.train()
        assert (
            again["windows"] == 1 and not again["repaired"] and again["genes"] == [0] * len(levels)
        )
    finally:
        trainable.stop()


def test_a_session_key_is_a_cache_key(tiny_dir: Path) -> None:
    """Equal settings give equal keys with one hash, space options compared by content;
    seed, threads and placement are not part of a session."""
    spec = tiny_spec(tiny_dir).resolved()
    key = SessionKey.of(spec, FULL)
    same = SessionKey.of(replace(spec, seed=9, threads=2, workers=2), FULL)
    assert same == key and hash(same) == hash(key) and len({key, same}) == 1
    a = replace(key, space_options={"mlp_steps": 4, "heads": [1, 2]})
    b = replace(key, space_options={"heads": [1, 2], "mlp_steps": 4})
    assert a == b and hash(a) == hash(b)
    assert replace(key, space_options={"mlp_steps": 8}) != a
    assert SessionKey.of(spec, FULL + 2) != key  # more windows to cut


def test_portable_spec_is_a_copy(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tiny_dir.parent)
    spec = replace(tiny_spec(tiny_dir), model=tiny_dir.name, storage=str(tmp_path / "j"))
    moved = portable(spec)
    assert moved.model == str(tiny_dir.resolve()) and moved.storage is None
    assert spec.model == tiny_dir.name and spec.storage == str(tmp_path / "j")  # unchanged
