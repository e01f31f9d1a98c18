"""The ask / evaluate / tell seam between search algorithms and evaluation.

An algorithm asks for candidates to be scored at some fidelity (a number of calibration
windows), the engine scores them wherever it likes, and the algorithm is told the results.
Algorithms see only a ``Problem`` (genes, levels, additive costs, budget): no torch, no
models, no workers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from searcher.problem import Candidate, Problem


@dataclass(frozen=True)
class Request:
    candidate: Candidate
    windows: int  # score on the first `windows` calibration windows
    trained: int = 0  # distillation steps before scoring (training-aware selection); 0: none


@dataclass(frozen=True)
class Result:
    candidate: Candidate
    windows: int
    kl: float  # mean KL to the dense model over those windows
    trained: int = 0  # distillation steps the candidate had before this score


class Algorithm(ABC):
    name: ClassVar[str]
    multi_objective: ClassVar[bool] = False  # can it minimise costs beside KL (--objectives)?
    baseline: ClassVar[bool] = False  # an allocation heuristic to compare against, not a search
    spaces: ClassVar[str] = ""  # the one space it works on ("": any)
    reads: ClassVar[tuple[str, ...]] = ()  # the run settings it reads (for --help)

    def __init__(self, problem: Problem, seed: int, full_windows: int) -> None:
        self.problem = problem
        self.rng = np.random.default_rng(seed)
        self.full_windows = full_windows
        self.done = False

    @classmethod
    def configure(
        cls, problem: Problem, seed: int, full_windows: int, settings: Mapping[str, Any]
    ) -> Algorithm:
        """Build from run settings (offspring, stages, random_batch, ...); each algorithm
        reads the ones it understands."""
        return cls(problem, seed, full_windows)

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> None:
        """Refuse settings that cannot give a result, before any model is loaded (a
        ``SearcherError``); what needs the problem is checked in ``configure``."""
        return None

    @abstractmethod
    def ask(self) -> list[Request]:
        """The next batch to score; an empty list when the algorithm has nothing to ask."""

    @abstractmethod
    def tell(self, results: list[Result]) -> None:
        """The scores of the last batch, in the order asked."""

    def status(self) -> str:
        """A few words on where the algorithm is, for progress displays."""
        return ""

    def shared(self) -> frozenset[Candidate]:
        """Candidates whose scores other runs may reuse: single-unit profiles, which score
        the same whatever the budget (see ``searcher.score_cache``)."""
        return frozenset()
