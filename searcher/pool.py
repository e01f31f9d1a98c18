"""Where evaluations run. The in-process pool scores jobs one after another."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from searcher.fitness import Evaluator
from searcher.problem import Candidate


@dataclass(frozen=True)
class Job:
    candidate: Candidate
    start: int  # first calibration window to score
    stop: int  # one past the last


@dataclass
class Outcome:
    kl: np.ndarray
    nll: np.ndarray
    seconds: float


class Pool(ABC):
    @abstractmethod
    def run(self, jobs: list[Job]) -> list[Outcome]:
        """Score every job; outcomes in job order."""


class LocalPool(Pool):
    """Scores jobs in this process on one resident model."""

    def __init__(self, evaluator: Evaluator) -> None:
        self.evaluator = evaluator

    def run(self, jobs: list[Job]) -> list[Outcome]:
        out = []
        for job in jobs:
            t0 = time.perf_counter()
            scores = self.evaluator.score(job.candidate, job.start, job.stop)
            out.append(Outcome(scores.kl, scores.nll, time.perf_counter() - t0))
        return out


class ReplayPool(Pool):
    """Answers jobs from an interrupted run's log where it can, and asks ``inner`` for the rest.

    Algorithms are deterministic given their seed and the scores they are told, so replaying
    the logged scores leads a resumed run through the same candidates, in the same order, as
    the interrupted one, and on from where it stopped: no completed evaluation is repeated
    and the result equals an uninterrupted run's.
    """

    def __init__(self, inner: Pool, logged: dict[Candidate, Outcome]) -> None:
        self.inner = inner
        self.logged = logged
        self.replayed_windows = 0

    def run(self, jobs: list[Job]) -> list[Outcome]:
        fresh, plan = [], []
        for job in jobs:
            got = self.logged.get(job.candidate)
            n = 0 if got is None else max(0, min(len(got.kl), job.stop) - job.start)
            if job.start + n < job.stop:
                fresh.append(Job(job.candidate, job.start + n, job.stop))
            plan.append((job, got, n))
        computed = iter(self.inner.run(fresh))
        out = []
        for job, got, n in plan:
            parts = []
            if n:
                share = got.seconds * n / len(got.kl)
                span = slice(job.start, job.start + n)
                parts.append(Outcome(got.kl[span], got.nll[span], share))
                self.replayed_windows += n
            if job.start + n < job.stop:
                parts.append(next(computed))
            out.append(
                Outcome(
                    np.concatenate([p.kl for p in parts]),
                    np.concatenate([p.nll for p in parts]),
                    sum(p.seconds for p in parts),
                )
            )
        return out
