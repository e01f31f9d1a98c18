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
