"""Training-aware selection (``--select trained:STEPS``): the engine keeps trained scores
apart and charges their training to --evals, evo ranks its last stage by them, the trained
score is the KL of the distilled model on the scored windows (never trained on), and runs
with it resume, run on Ray workers, and refuse bad settings in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from searcher import data
from searcher.algorithms.base import Request
from searcher.algorithms.evolution import Evolution
from searcher.cli import main
from searcher.engine import Engine
from searcher.errors import SearcherError
from searcher.fitness import Evaluator
from searcher.pool import Job, LocalPool, Outcome, ReplayPool
from searcher.run import SessionKey, open_session
from searcher.store import TrialStore
from searcher.trained_selection import TrainedScorer, scorer_for, training_windows
from tests.test_engine import FakePool, Scripted, make_problem, synthetic_kl

TINY = ["--seq-len", "32", "--importance-windows", "2", "--validation-windows", "2",
        "--offspring", "4", "--stages", "1:2,2:1", "--threads", "1", "--seed", "3"]  # fmt: skip


class TrainedFakePool(FakePool):
    """Trained jobs score the reverse of the untrained ranking (what training flips)."""

    def run(self, jobs, on_outcome=None):
        out = super().run(jobs, on_outcome)
        for i, job in enumerate(jobs):
            if job.trained:
                kl = np.array([100.0 - synthetic_kl(job.candidate, w) for w in range(job.stop)])
                out[i] = Outcome(kl, kl, 1.0)
        return out


def test_engine_keeps_trained_scores_apart_and_charges_the_training() -> None:
    p = make_problem()
    a, b = (1, 0, 1, 0, 0, 0), (0, 1, 0, 1, 0, 0)
    batches = [
        [Request(a, 2), Request(b, 2), Request(a, 2, trained=3), Request(b, 2, trained=3)],
        [Request(a, 2, trained=3), Request(a, 2)],  # both known: nothing to score
    ]
    pool = TrainedFakePool()
    algo = Scripted(p, batches, full_windows=2)
    engine = Engine(p, algo, pool, max_evals=100, step_cost=8)
    engine.run()
    assert [(j.candidate, j.start, j.stop, j.trained) for j in pool.jobs] == [
        (a, 0, 2, 0), (b, 0, 2, 0), (a, 0, 2, 3), (b, 0, 2, 3),
    ]  # fmt: skip
    # two plain scores of 2 windows; two trained of 2 windows + 3 steps x 8 windows each
    assert engine.spent_windows == 2 * 2 + 2 * (2 + 3 * 8)
    ta, tb = engine.trials[a], engine.trials[b]
    assert ta.kl == [synthetic_kl(a, w) for w in range(2)]  # plain scores untouched
    assert ta.trained[3].kl == [100.0 - synthetic_kl(a, w) for w in range(2)]
    told = algo.told[0]
    assert [r.trained for r in told] == [0, 0, 3, 3]
    assert told[2].kl == pytest.approx(ta.trained[3].fitness())
    assert algo.told[1][0].kl == told[2].kl and pool.calls[1] == []
    # the best is ranked by the trained score, which reverses the untrained one here
    plain_best = min((ta, tb), key=lambda t: t.fitness())
    assert engine.best() is not plain_best
    assert engine.best_kl(engine.best()) == min(ta.trained[3].fitness(), tb.trained[3].fitness())


def test_a_trained_score_that_does_not_fit_the_budget_ends_the_run() -> None:
    p = make_problem()
    a = (1, 0, 1, 0, 0, 0)
    algo = Scripted(p, [[Request(a, 2)], [Request(a, 2, trained=5)]], full_windows=2)
    engine = Engine(p, algo, TrainedFakePool(), max_evals=10, step_cost=8)  # 20 windows
    engine.run()
    assert engine.capped and not engine.trials[a].trained and engine.spent_windows == 2


def test_evo_ranks_its_last_stage_by_the_trained_scores() -> None:
    p = make_problem()
    stages = ((1, 2), (3, 1))
    runs = {}
    for trained in (0, 4):
        algo = Evolution(p, seed=0, full_windows=3, offspring=6, stages=stages, trained=trained)
        engine = Engine(p, algo, TrainedFakePool(), max_evals=1000, step_cost=4)
        first = algo.ask()
        algo.tell(engine.evaluate(first))
        last = algo.ask()
        runs[trained] = (algo, engine, last)
        algo.tell(engine.evaluate(last))
    algo, engine, last = runs[4]
    survivors = [r.candidate for r in last if not r.trained]
    assert len(survivors) == 2 and [r.trained for r in last] == [0, 0, 4, 4]
    assert [r.candidate for r in last if r.trained] == survivors
    trained = {c: engine.trials[c].trained[4].fitness() for c in survivors}
    plain = {c: engine.trials[c].fitness(3) for c in survivors}
    assert algo.parent == min(trained, key=trained.get)  # the trained ranking chose
    assert algo.parent != min(plain, key=plain.get) and algo.flips == 1
    assert runs[0][0].parent == min(plain, key=plain.get) and runs[0][0].flips == 0
    assert not any(r.trained for r in runs[0][2])


@pytest.fixture(scope="module")
def session(tiny_dir: Path):
    key = SessionKey(str(tiny_dir), None, "width", {}, 32, 4, 2, 2, 4, "cpu", "float32", False)
    s = open_session(key)
    evaluator = Evaluator(s.loaded.model, s.windows.calibration, s.space.apply, s.space.dense(), 4)
    return s, evaluator


def test_trained_scores_are_exact_kl_on_windows_never_trained_on(session) -> None:
    s, evaluator = session
    text_windows = training_windows(s.loaded.tokenizer, data.read_text(None), 32, 4, 2)
    scored = {tuple(w.tolist()) for w in torch.cat([s.windows.calibration, s.windows.validation])}
    assert len(text_windows) > 100
    assert not scored & {tuple(w.tolist()) for w in text_windows}  # disjoint, by content
    head = s.loaded.model.get_output_embeddings().weight.detach().clone()
    scorer = TrainedScorer(s.space, evaluator, text_windows, 4, seed=0, lr=1e-2)
    c = tuple(max(0, n - 3) for n in s.space.n_levels)
    plain = evaluator.score(c, 0, 4)
    got = scorer.score(c, 10, 0, 4)
    assert got.kl.mean() < 0.9 * plain.kl.mean()  # distillation lowered the scored KL
    again = scorer.score(c, 10, 0, 4)
    np.testing.assert_array_equal(got.kl, again.kl)  # same seed, same batches: same score
    # the resident model is the dense teacher again, its head untouched
    assert torch.equal(s.loaded.model.get_output_embeddings().weight, head)
    np.testing.assert_array_equal(evaluator.score(c, 0, 4).kl, plain.kl)
    # the W^T p reference is exact for the trained model: the same KL from full logits
    trained = scorer.trained_model(c, 10)
    assert torch.equal(trained.get_output_embeddings().weight, head)
    full = Evaluator(trained, evaluator.windows, lambda c: None, (), 4, hidden_reference=False)
    dense = Evaluator(
        s.loaded.model, evaluator.windows, lambda c: None, (), 4, hidden_reference=False
    )
    check = Evaluator(trained, evaluator.windows, lambda c: None, (), 4,
                      reference=dense.reference())  # fmt: skip
    np.testing.assert_allclose(check.score((), 0, 4).kl, got.kl, rtol=1e-4, atol=1e-6)
    assert full.n_windows == 4


def test_replay_gives_back_trained_scores_and_the_store_keeps_them(tmp_path: Path) -> None:
    p = make_problem()
    a = (1, 0, 1, 0, 0, 0)
    store = TrialStore(str(tmp_path / "t.journal"), "s", p.n_levels)
    algo = Scripted(p, [[Request(a, 2), Request(a, 2, trained=3)]], full_windows=2)
    engine = Engine(p, algo, TrainedFakePool(), 100, record=store.append, step_cost=8)
    engine.run()
    store.close()
    again = TrialStore(str(tmp_path / "t.journal"), "s", p.n_levels, resume=True)
    logged = again.logged_trained()
    np.testing.assert_array_equal(logged[a, 3].kl, engine.trials[a].trained[3].kl)
    assert set(logged) == {(a, 3)}
    inner = TrainedFakePool()
    replay = ReplayPool(inner, again.logged(), logged)
    out = replay.run([Job(a, 0, 2, 3), Job(a, 0, 2, 5)])
    np.testing.assert_array_equal(out[0].kl, engine.trials[a].trained[3].kl)
    assert [j.trained for j in inner.jobs] == [5]  # only the unknown training ran
    again.close()


def test_a_run_with_trained_selection_resumes_to_the_same_result(
    tiny_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    whole, out = tmp_path / "whole", tmp_path / "run"
    args = ["run", "--model", str(tiny_dir), "--evals", "120", "--select", "trained:2", *TINY]
    assert main([*args, "--out", str(whole)]) == 0
    best = json.loads((whole / "best.json").read_text())
    assert best["select"] == "trained:2" and best["calibration"]["trained"]["steps"] == 2
    info = json.loads((whole / "run.json").read_text())["selection"]
    assert info["trained_candidates"] >= 2 and info["window_evaluations_per_step"] == 16
    trials = pd.read_parquet(whole / "trials.parquet")
    ranked = trials.dropna(subset=["trained_kl"])
    assert best["trial"] == int(ranked.loc[ranked["trained_kl"].idxmin(), "number"])

    real_run, calls = LocalPool.run, {"n": 0, "trained": 0}

    def crashing(self, jobs, on_outcome=None):
        if any(j.trained for j in jobs):
            calls["trained"] += 1
            if calls["trained"] == 3:
                raise KeyboardInterrupt  # mid-search, after two trained batches are stored
        return real_run(self, jobs, on_outcome)

    monkeypatch.setattr(LocalPool, "run", crashing)
    assert main([*args, "--out", str(out)]) == 130
    fresh: list[Job] = []

    def counting(self, jobs, on_outcome=None):
        fresh.extend(jobs)
        return real_run(self, jobs, on_outcome)

    monkeypatch.setattr(LocalPool, "run", counting)
    assert main(["run", "--resume", str(out)]) == 0
    again = pd.read_parquet(out / "trials.parquet")
    assert again["genes"].map(tuple).tolist() == trials["genes"].map(tuple).tolist()
    pd.testing.assert_series_equal(again["trained_kl"], trials["trained_kl"])
    assert json.loads((out / "best.json").read_text())["genes"] == best["genes"]
    trained_before = set(ranked["genes"].map(tuple)) - {tuple(j.candidate) for j in fresh}
    assert len(trained_before) >= 2  # the trained scores stored before the kill: not redone


def test_trained_selection_on_ray_workers_matches_in_process(tiny_dir: Path) -> None:
    from searcher.cluster import connected
    from searcher.workers import RayPool, WorkerSetup

    key = SessionKey(str(tiny_dir), None, "width", {}, 32, 4, 2, 2, 4, "cpu", "float32", False)
    s = open_session(key)
    evaluator = Evaluator(s.loaded.model, s.windows.calibration, s.space.apply, s.space.dense(), 4)
    local = LocalPool(evaluator, scorer_for(key, s.space, evaluator, s.loaded.tokenizer, 0))
    c = tuple(max(0, n - 2) for n in s.space.n_levels)
    jobs = [Job(c, 0, 4, 2), Job(c, 0, 4)]
    setup = WorkerSetup(key, 4, s.space.fingerprint(), trained_seed=0)
    with connected(None, 1):
        pool = RayPool(setup, s.windows.calibration, evaluator.reference(), workers=1)
        try:
            remote = pool.run(jobs)
        finally:
            pool.close()
    for got, want in zip(remote, local.run(jobs), strict=True):
        np.testing.assert_allclose(got.kl, want.kl, rtol=1e-5)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--select", "trained:0"], "bad --select 'trained:0'"),
        (["--select", "darwin"], "bad --select 'darwin'"),
        (["--select", "trained:3", "--algo", "random"], "is evo's selection"),
    ],
)
def test_bad_select_is_one_line(tiny_dir: Path, tmp_path: Path, capsys, flags, message) -> None:
    code = main(["run", "--model", str(tiny_dir), *TINY, "--out", str(tmp_path / "r"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_training_windows_refuse_a_text_with_none_left(session) -> None:
    s, _ = session
    with pytest.raises(SearcherError, match="needs text beyond"):
        training_windows(s.loaded.tokenizer, ("a b c d " * 40, "short"), 32, 4, 2)


def test_too_few_evals_for_the_first_trained_stage_is_one_line(
    tiny_dir: Path, tmp_path: Path, capsys
) -> None:
    args = ["run", "--model", str(tiny_dir), *TINY, "--out", str(tmp_path / "r")]
    code = main([*args, "--evals", "30", "--select", "trained:2"])
    err = capsys.readouterr().err.strip()
    # 5 windows in the first stage, then 2 survivors x (1 + 2 + 2 steps x 16) windows: 37.5
    assert code == 2 and "needs 37.5 evaluations" in err and len(err.splitlines()) == 1
