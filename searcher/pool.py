"""Where evaluations run. The in-process pool scores jobs one after another."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from searcher.fitness import Evaluator
from searcher.problem import Candidate

if TYPE_CHECKING:
    from searcher.trained_selection import TrainedScorer


@dataclass(frozen=True)
class Job:
    candidate: Candidate
    start: int  # first calibration window to score
    stop: int  # one past the last
    trained: int = 0  # distillation steps before scoring (``TrainedScorer``); 0: as pruned


@dataclass
class Outcome:
    kl: np.ndarray
    nll: np.ndarray
    seconds: float


OnOutcome = Callable[[int, Outcome], None]


class Pool(ABC):
    @abstractmethod
    def run(self, jobs: list[Job], on_outcome: OnOutcome | None = None) -> list[Outcome]:
        """Score every job; outcomes in job order. ``on_outcome(index, outcome)`` is called
        as each job finishes, so that it can be stored before the rest of the batch is done."""


def run_job(evaluator: Evaluator, trained: TrainedScorer | None, job: Job) -> Outcome:
    """One job's scores: of the candidate as pruned, or after ``job.trained`` steps of
    distillation (``trained`` must then be given)."""
    t0 = time.perf_counter()
    if job.trained:
        if trained is None:
            raise ValueError("a trained job needs a TrainedScorer")
        scores = trained.score(job.candidate, job.trained, job.start, job.stop)
    else:
        scores = evaluator.score(job.candidate, job.start, job.stop)
    return Outcome(scores.kl, scores.nll, time.perf_counter() - t0)


class LocalPool(Pool):
    """Scores jobs in this process on one resident model."""

    def __init__(self, evaluator: Evaluator, trained: TrainedScorer | None = None) -> None:
        self.evaluator = evaluator
        self.trained = trained

    def run(self, jobs: list[Job], on_outcome: OnOutcome | None = None) -> list[Outcome]:
        out = []
        for i, job in enumerate(jobs):
            out.append(run_job(self.evaluator, self.trained, job))
            if on_outcome is not None:
                on_outcome(i, out[-1])
        return out


class ReplayPool(Pool):
    """Answers jobs from an interrupted run's log where it can, and asks ``inner`` for the rest.

    Algorithms are deterministic given their seed and the scores they are told, so replaying
    the logged scores leads a resumed run through the same candidates, in the same order, as
    the interrupted one, and on from where it stopped: no completed evaluation is repeated
    and the result equals an uninterrupted run's. Trained scores (``trained``, by candidate
    and steps) are replayed whole or not at all: a trained job scores every window at once.
    """

    def __init__(
        self,
        inner: Pool,
        logged: dict[Candidate, Outcome],
        trained: dict[tuple[Candidate, int], Outcome] | None = None,
    ) -> None:
        self.inner = inner
        self.logged = logged
        self.trained = trained or {}
        self.replayed_windows = 0

    def run(self, jobs: list[Job], on_outcome: OnOutcome | None = None) -> list[Outcome]:
        fresh, owner, replayed = [], [], {}
        for i, job in enumerate(jobs):
            if job.trained:
                got = self.trained.get((job.candidate, job.trained))
                if got is not None and len(got.kl) >= job.stop:
                    span = slice(job.start, job.stop)
                    replayed[i] = Outcome(got.kl[span], got.nll[span], got.seconds)
                    self.replayed_windows += job.stop - job.start
                else:
                    fresh.append(job)
                    owner.append(i)
                continue
            got = self.logged.get(job.candidate)
            n = 0 if got is None else max(0, min(len(got.kl), job.stop) - job.start)
            if n:
                share = got.seconds * n / len(got.kl)
                span = slice(job.start, job.start + n)
                replayed[i] = Outcome(got.kl[span], got.nll[span], share)
                self.replayed_windows += n
            if job.start + n < job.stop:
                fresh.append(Job(job.candidate, job.start + n, job.stop))
                owner.append(i)
        out: list[Outcome | None] = [None] * len(jobs)

        def finish(i: int, computed: Outcome | None) -> None:
            parts = [p for p in (replayed.get(i), computed) if p is not None]
            out[i] = Outcome(
                np.concatenate([p.kl for p in parts]),
                np.concatenate([p.nll for p in parts]),
                sum(p.seconds for p in parts),
            )
            if on_outcome is not None:
                on_outcome(i, out[i])

        for i in sorted(set(range(len(jobs))) - set(owner)):
            finish(i, None)  # wholly replayed
        if fresh:
            self.inner.run(fresh, lambda k, outcome: finish(owner[k], outcome))
        return out  # type: ignore[return-value]
