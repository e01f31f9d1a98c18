"""Baselines: the same level everywhere, and random feasible candidates."""

from __future__ import annotations

from searcher.algorithms.base import Algorithm, Request, Result
from searcher.problem import Problem


class Uniform(Algorithm):
    """One candidate: every gene keeps the same fraction, as much as the budget allows."""

    name = "uniform"
    baseline = True

    def ask(self) -> list[Request]:
        return [] if self.done else [Request(self.problem.uniform(), self.full_windows)]

    def tell(self, results: list[Result]) -> None:
        self.done = True


class RandomSearch(Algorithm):
    """Random feasible candidates near the budget, all scored at full fidelity."""

    name = "random"
    reads = ("random_batch",)

    def __init__(self, problem: Problem, seed: int, full_windows: int, batch: int = 8) -> None:
        super().__init__(problem, seed, full_windows)
        self.batch = batch
        self.seen: set[tuple[int, ...]] = set()
        self.count = 0

    @classmethod
    def configure(cls, problem, seed, full_windows, settings):
        return cls(problem, seed, full_windows, batch=settings["random_batch"])

    def ask(self) -> list[Request]:
        out = []
        for _ in range(20 * self.batch):  # bounded: a small space may run out of new points
            if len(out) == self.batch:
                break
            c = self.problem.random(self.rng)
            if c not in self.seen:
                self.seen.add(c)
                out.append(Request(c, self.full_windows))
        self.done = not out
        return out

    def tell(self, results: list[Result]) -> None:
        self.count += len(results)

    def status(self) -> str:
        return f"sample {self.count}"
