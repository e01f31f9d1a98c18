"""Engine: caching, incremental fidelity, the evaluation budget, best and progress."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from searcher.algorithms.base import Algorithm, Request, Result
from searcher.algorithms.baselines import RandomSearch, Uniform
from searcher.algorithms.evolution import Evolution
from searcher.engine import Engine, Progress, Trial
from searcher.pool import Job, Outcome, Pool
from searcher.problem import Problem
from tests.helpers import toy_problem

N_LEVELS = (5, 4, 5, 3, 5, 5)
FLOPS = (3.0, 9.0, 1.0, 6.0, 12.0, 4.0)
PARAMS = (5.0, 2.0, 8.0, 1.0, 3.0, 7.0)
MATTERS = (4.0, 0.3, 2.5, 0.1, 1.0, 3.0)  # how much the synthetic KL cares about each gene


def make_problem(budget: str = "flops=0.6") -> Problem:
    return toy_problem(budget, N_LEVELS, FLOPS, PARAMS, flops_base=2.0)


def noise(candidate, window: int) -> float:
    digest = hashlib.blake2b(repr((tuple(candidate), window)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def synthetic_kl(candidate, window: int) -> float:
    loss = sum(m * (n - 1 - x) for m, n, x in zip(MATTERS, N_LEVELS, candidate))
    return loss + 0.5 * noise(candidate, window)


class FakePool(Pool):
    """Deterministic per-window KL; records every job and call."""

    def __init__(self, max_calls: int = 10_000) -> None:
        self.jobs: list[Job] = []
        self.calls: list[list[Job]] = []
        self.max_calls = max_calls

    def run(self, jobs: list[Job], on_outcome=None) -> list[Outcome]:
        self.calls.append(list(jobs))
        if len(self.calls) > self.max_calls:
            raise RuntimeError(f"engine still running after {len(self.calls)} pool calls")
        self.jobs.extend(jobs)
        out = []
        for job in jobs:
            kl = np.array([synthetic_kl(job.candidate, w) for w in range(job.start, job.stop)])
            out.append(Outcome(kl, kl + 1.0, 0.01 * (job.stop - job.start)))
        return out


class Scripted(Algorithm):
    """Asks a fixed list of batches, then stops; records what it is told."""

    name = "scripted"

    def __init__(self, problem: Problem, batches: list[list[Request]], full_windows: int) -> None:
        super().__init__(problem, 0, full_windows)
        self.batches = list(batches)
        self.told: list[list[Result]] = []

    def ask(self) -> list[Request]:
        if not self.batches:
            self.done = True
            return []
        return self.batches.pop(0)

    def tell(self, results: list[Result]) -> None:
        self.told.append(results)


def test_incremental_fidelity_and_caching() -> None:
    p = make_problem()
    a, b = (0, 0, 0, 0, 0, 0), (1, 0, 1, 0, 0, 0)
    batches = [
        [Request(a, 1), Request(b, 2)],
        [Request(a, 3), Request(b, 2), Request(a, 3)],  # b cached; a asked twice: scored once
        [Request(a, 1), Request(b, 4)],  # a has more than asked: nothing to score
    ]
    algo = Scripted(p, batches, full_windows=4)
    pool = FakePool()
    engine = Engine(p, algo, pool, max_evals=100)
    trials = engine.run()
    assert [(j.candidate, j.start, j.stop) for j in pool.calls[0]] == [(a, 0, 1), (b, 0, 2)]
    assert [(j.candidate, j.start, j.stop) for j in pool.calls[1]] == [(a, 1, 3)]
    assert [(j.candidate, j.start, j.stop) for j in pool.calls[2]] == [(b, 2, 4)]
    assert engine.spent_windows == 1 + 2 + 2 + 2
    assert trials[a].kl == pytest.approx([synthetic_kl(a, w) for w in range(3)])
    assert trials[b].kl == pytest.approx([synthetic_kl(b, w) for w in range(4)])
    assert trials[b].nll == pytest.approx([synthetic_kl(b, w) + 1 for w in range(4)])
    assert trials[a].seconds == pytest.approx(0.03)
    # Results report the mean KL over exactly the windows asked for, in request order.
    for batch, told in zip(batches, algo.told, strict=True):
        assert [r.candidate for r in told] == [r.candidate for r in batch]
        for req, res in zip(batch, told):
            expect = np.mean([synthetic_kl(req.candidate, w) for w in range(req.windows)])
            assert res.windows == req.windows
            assert res.kl == pytest.approx(expect)
    assert [t.number for t in trials.values()] == [0, 1]


def test_trials_know_costs_and_feasibility() -> None:
    p = make_problem("flops=0.6")
    dense = p.dense()
    small = (0,) * p.n_genes
    engine = Engine(p, Scripted(p, [[Request(dense, 1), Request(small, 1)]], 1), FakePool(), 10)
    trials = engine.run()
    assert not trials[dense].feasible and trials[small].feasible
    assert trials[dense].fractions == pytest.approx({"flops": 1.0, "params": 1.0})
    assert trials[small].costs == pytest.approx(p.cost(small))
    # best() ignores infeasible trials even when they score better.
    assert trials[dense].fitness() < trials[small].fitness()
    assert engine.best() is trials[small]


def test_best_is_the_lowest_full_fidelity_feasible_trial() -> None:
    p = make_problem()
    engine = Engine(p, RandomSearch(p, seed=3, full_windows=3, batch=5), FakePool(), 12)
    trials = engine.run()
    full = [t for t in trials.values() if t.windows >= 3 and t.feasible]
    assert len(full) >= 10
    best = engine.best()
    assert best is not None
    assert best.fitness(3) == min(float(np.mean(t.kl[:3])) for t in full)


def test_record_and_progress_callbacks() -> None:
    p = make_problem()
    recorded: list[tuple[int, int]] = []
    progress: list[Progress] = []

    def record(trial: Trial) -> None:
        recorded.append((trial.number, trial.windows))

    algo = Evolution(p, seed=1, full_windows=4, offspring=6, stages=((1, 3), (4, 1)))
    engine = Engine(p, algo, FakePool(), max_evals=6, record=record, on_progress=progress.append)
    engine.run()
    # A trial is recorded each time it gains windows, with its new window count.
    assert recorded and all(w in (1, 4) for _, w in recorded)
    assert progress, "progress is reported after every batch"
    spent = [pr.spent for pr in progress]
    assert spent == sorted(spent)
    assert progress[-1].spent == pytest.approx(engine.spent_windows / 4)
    assert progress[-1].budget == pytest.approx(6)
    assert progress[-1].trials == len(engine.trials)
    best = engine.best()
    assert best is not None and progress[-1].best_kl == pytest.approx(best.fitness(4))


def test_record_is_called_once_per_scoring_job() -> None:
    p = make_problem()
    pool = FakePool()
    calls: list[int] = []
    algo = Evolution(p, seed=2, full_windows=4, offspring=5, stages=((1, 2), (4, 1)))
    Engine(p, algo, pool, max_evals=5, record=lambda t: calls.append(t.number)).run()
    assert len(calls) == len(pool.jobs)


@pytest.mark.parametrize(
    ("max_evals", "full", "batch"), [(20, 4, 8), (2.5, 4, 3), (7, 1, 2), (4, 4, 2)]
)
def test_stops_at_max_evals(max_evals: float, full: int, batch: int) -> None:
    p = make_problem()
    pool = FakePool()
    algo = RandomSearch(p, seed=0, full_windows=full, batch=batch)
    engine = Engine(p, algo, pool, max_evals=max_evals)
    engine.run()
    limit = max_evals * full
    spent_per_call = [sum(j.stop - j.start for j in call) for call in pool.calls]
    assert engine.spent_windows == sum(spent_per_call)
    # A hard cap: never past it, and short of it by less than the job that did not fit.
    assert limit - full < engine.spent_windows <= limit
    assert not algo.done


def test_a_batch_cut_at_the_cap_is_not_told() -> None:
    """The last batch is scored while it fits; the algorithm never sees a part of a batch
    (Optuna and pymoo expect every result they asked for)."""
    p = make_problem()
    told: list[int] = []

    class Counting(RandomSearch):
        def tell(self, results):
            told.append(len(results))
            super().tell(results)

    pool = FakePool()
    engine = Engine(p, Counting(p, seed=0, full_windows=1, batch=4), pool, max_evals=10)
    engine.run()
    assert engine.spent_windows == 10 and engine.capped
    assert told == [4, 4]  # the third batch had room for 2 of its 4: scored, not told
    assert [len(call) for call in pool.calls] == [4, 4, 2]
    assert sum(t.windows for t in engine.trials.values()) == 10


def test_evolution_stops_at_max_evals() -> None:
    p = make_problem()
    pool = FakePool()
    algo = Evolution(p, seed=0, full_windows=4, offspring=8)
    engine = Engine(p, algo, pool, max_evals=10)
    engine.run()
    per_call = [sum(j.stop - j.start for j in call) for call in pool.calls]
    assert engine.spent_windows == sum(per_call)
    assert 40 - 4 < engine.spent_windows <= 40


def test_stops_when_the_algorithm_is_done() -> None:
    p = make_problem()
    pool = FakePool()
    engine = Engine(p, Uniform(p, seed=0, full_windows=4), pool, max_evals=1000)
    trials = engine.run()
    assert len(trials) == 1 and len(pool.jobs) == 1
    assert engine.spent_windows == 4


def test_engine_ends_when_evolution_has_no_new_children() -> None:
    p = make_problem("flops=1")  # only the dense candidate is tight: no child differs from it
    pool = FakePool(max_calls=500)
    algo = Evolution(p, seed=0, full_windows=2, offspring=4, stages=((1, 2), (2, 1)))
    Engine(p, algo, pool, max_evals=10).run()
    assert len(pool.calls) < 500


def test_duplicate_candidate_in_a_batch_gets_the_highest_fidelity() -> None:
    p = make_problem()
    a = (0,) * p.n_genes
    algo = Scripted(p, [[Request(a, 1), Request(a, 3)]], full_windows=4)
    engine = Engine(p, algo, FakePool(), max_evals=100)
    engine.run()
    low, high = algo.told[0]
    assert low.kl == pytest.approx(synthetic_kl(a, 0))
    assert engine.trials[a].windows == 3
    assert high.kl == pytest.approx(np.mean([synthetic_kl(a, w) for w in range(3)]))


def test_engine_stops_an_algorithm_that_only_re_asks_scored_candidates() -> None:
    p = make_problem()
    a = (0,) * p.n_genes
    algo = Scripted(p, [[Request(a, 2)]] * 1000, full_windows=2)
    engine = Engine(p, algo, FakePool(), max_evals=100)
    engine.run()
    assert len(algo.told) == 1 + engine.max_stalled  # one real batch, then the stall limit
    assert engine.spent_windows == 2


def test_each_finished_job_is_recorded_before_the_batch_ends() -> None:
    """A kill mid-batch must not lose the jobs of that batch that already finished."""

    class DyingPool(FakePool):
        def run(self, jobs: list[Job], on_outcome=None) -> list[Outcome]:
            out = super().run(jobs)
            for i in range(2):
                on_outcome(i, out[i])
            raise KeyboardInterrupt  # killed with the rest of the batch still running

    p = make_problem()
    batch = [Request(c, 1) for c in [(0,) * 6, (1, 0, 1, 0, 0, 0), (0, 1, 0, 1, 0, 0)]]
    recorded: list[Trial] = []
    engine = Engine(p, Scripted(p, [batch], 1), DyingPool(), 10, recorded.append)
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    assert [t.candidate for t in recorded] == [batch[0].candidate, batch[1].candidate]
    assert all(t.windows == 1 for t in recorded)
