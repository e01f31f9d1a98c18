"""The search loop: ask, score (with caching and incremental fidelity), tell, record.

``--evals`` is a hard cap: a batch is scored in the order asked while it fits in what is
left, and a batch that does not fit whole is the run's last (its algorithm is not told a
part of it). Runs that overspend their last batch would compare unfairly with methods that
stop on the dot: before the cap, evo finished up to 1.75 evaluations past a 40-evaluation
budget, and replayed under the cap 8 of the 58 benchmark runs that had spent past it ended
at another best config.

Training-aware selection (``Request.trained``): a candidate distilled for some steps before it
is scored. Its scores are kept apart from the plain ones (``Trial.trained``), and a trained
score costs the windows it scores plus ``step_cost`` windows per training step (see
``searcher.trained_selection``), so that ``--evals`` caps training too."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from searcher.algorithms.base import Algorithm, Request, Result
from searcher.pool import Job, Outcome, Pool
from searcher.problem import Candidate, Problem

log = logging.getLogger(__name__)


@dataclass
class TrainedScore:
    """A candidate's per-window scores after some steps of distillation."""

    kl: list[float]
    nll: list[float]
    seconds: float

    def fitness(self) -> float:
        return float(np.mean(self.kl))


@dataclass
class Trial:
    """Everything known about one candidate. Scores are per calibration window, so raising a
    candidate's fidelity scores only the windows it has not seen yet."""

    number: int
    candidate: Candidate
    costs: dict[str, float]
    fractions: dict[str, float]
    feasible: bool
    origin: str
    kl: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    seconds: float = 0.0
    trained: dict[int, TrainedScore] = field(default_factory=dict)  # by training steps

    @property
    def windows(self) -> int:
        return len(self.kl)

    def fitness(self, windows: int | None = None) -> float:
        """Mean KL over the first ``windows`` windows (all scored windows by default)."""
        return float(np.mean(self.kl[: windows or len(self.kl)]))


@dataclass
class Progress:
    spent: float  # full-fidelity-equivalent evaluations used
    budget: float
    trials: int
    best_kl: float | None
    status: str


class Engine:
    def __init__(
        self,
        problem: Problem,
        algorithm: Algorithm,
        pool: Pool,
        max_evals: float,
        record: Callable[[Trial], None] = lambda trial: None,
        on_progress: Callable[[Progress], None] = lambda progress: None,
        measure: Callable[[Candidate], Mapping[str, float]] | None = None,
        step_cost: float = 0.0,
    ) -> None:
        """``measure``: costs timed on the device for each new candidate, replacing the
        problem's predicted ones. A candidate measured over budget is not scored, and is told
        to the algorithm as infinitely bad, so that it moves away from it. ``step_cost``: the
        windows one training step of a trained request counts as."""
        self.problem = problem
        self.algorithm = algorithm
        self.pool = pool
        self.full = algorithm.full_windows
        self.max_windows = max_evals * self.full
        self.record = record
        self.on_progress = on_progress
        self.measure = measure
        self.step_cost = step_cost
        self.trials: dict[Candidate, Trial] = {}
        # single-unit profile candidates (dense but for one layer) are over any budget by
        # design: they are scored for what they teach, never timed on the device
        self.untimed = algorithm.shared()
        self.spent_windows = 0
        self.capped = False  # a batch was cut short at the cap: the run is over
        self.jobs = 0  # scoring jobs sent to the pool
        self.max_stalled = 20

    def run(self) -> dict[Candidate, Trial]:
        stalled = 0
        while not self.algorithm.done and self.spent_windows < self.max_windows:
            requests = self.algorithm.ask()
            if not requests:
                break
            before = self.spent_windows
            results = self.evaluate(requests)
            if self.capped:
                self._progress()
                break
            self.algorithm.tell(results)
            self._progress()
            # An algorithm that only re-asks what is scored already has converged (or its
            # space is exhausted): stop rather than loop without spending the budget.
            stalled = stalled + 1 if self.spent_windows == before else 0
            if stalled >= self.max_stalled:
                log.info("stopping: %d batches in a row asked nothing new", stalled)
                break
        return self.trials

    def evaluate(self, requests: list[Request]) -> list[Result]:
        wanted: dict[tuple[Candidate, int], int] = {}
        for req in requests:
            key = (req.candidate, req.trained)
            wanted[key] = max(req.windows, wanted.get(key, 0))
        jobs, owners, costs = [], [], []
        room = self.max_windows - self.spent_windows
        for (candidate, steps), windows in wanted.items():
            known = self.trials.get(candidate)
            if steps:  # trained: scored on all its windows at once, or known already
                done = known is not None and steps in known.trained
                more = 0 if done else windows + steps * self.step_cost
            else:
                more = windows - (known.windows if known is not None else 0)
            if more > room + 1e-9:
                self.capped = True
                break
            trial = self._trial(candidate)
            if self._measured(candidate) and not trial.feasible:
                continue  # measured over budget: not worth scoring
            if more > 0:
                room -= more
                start = 0 if steps else trial.windows
                jobs.append(Job(candidate, start, windows, steps))
                owners.append(trial)
                costs.append(more)
        self.jobs += len(jobs)

        fired: set[int] = set()

        def done(i: int, outcome: Outcome) -> None:  # as each job finishes: stored at once
            fired.add(i)
            trial, steps = owners[i], jobs[i].trained
            if steps:
                trial.trained[steps] = TrainedScore(
                    outcome.kl.tolist(), outcome.nll.tolist(), outcome.seconds
                )
                self.spent_windows += costs[i]
            else:
                trial.kl.extend(outcome.kl.tolist())
                trial.nll.extend(outcome.nll.tolist())
                trial.seconds += outcome.seconds
                self.spent_windows += len(outcome.kl)
            self.record(trial)

        outcomes = self.pool.run(jobs, done)
        for i in sorted(set(range(len(jobs))) - fired):  # a pool that reports only at the end
            done(i, outcomes[i])
        if self.capped:
            return []  # not told: see the module docstring
        return [Result(r.candidate, r.windows, self._told(self.trials[r.candidate], r),
                       r.trained) for r in requests]  # fmt: skip

    def _measured(self, candidate: Candidate) -> bool:
        return self.measure is not None and candidate not in self.untimed

    def _told(self, trial: Trial, request: Request) -> float:
        if self._measured(trial.candidate) and not trial.feasible:
            return math.inf
        if request.trained:
            return trial.trained[request.trained].fitness()
        return trial.fitness(request.windows)

    def _trial(self, candidate: Candidate) -> Trial:
        if candidate not in self.trials:
            costs = self.problem.cost(candidate)
            if self._measured(candidate):
                assert self.measure is not None
                costs.update(self.measure(candidate))
            fractions = self.problem.fractions_of(costs)
            self.trials[candidate] = Trial(
                number=len(self.trials),
                candidate=candidate,
                costs=costs,
                fractions=fractions,
                feasible=self.problem.budget.satisfied(fractions),
                origin=self.algorithm.status(),
            )
        return self.trials[candidate]

    def best(self) -> Trial | None:
        """The feasible candidate of least full-fidelity KL; in a training-aware run, of least
        KL after the most training steps any candidate had (the ranking its selection used)."""
        feasible = [t for t in self.trials.values() if t.feasible]
        steps = max((s for t in feasible for s in t.trained), default=0)
        if steps:
            trained = [t for t in feasible if steps in t.trained]
            return min(trained, key=lambda t: t.trained[steps].fitness())
        full = [t for t in feasible if t.windows >= self.full]
        return min(full, key=lambda t: t.fitness(self.full), default=None)

    def best_kl(self, trial: Trial) -> float:
        """The score ``best`` ranked ``trial`` by."""
        steps = max(trial.trained, default=0)
        return trial.trained[steps].fitness() if steps else trial.fitness(self.full)

    def _progress(self) -> None:
        best = self.best()
        self.on_progress(
            Progress(
                spent=self.spent_windows / self.full,
                budget=self.max_windows / self.full,
                trials=len(self.trials),
                best_kl=None if best is None else self.best_kl(best),
                status=self.algorithm.status(),
            )
        )
