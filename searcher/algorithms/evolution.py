"""EvoPress-style evolutionary search with multi-stage selection.

One parent per generation (elitist: it competes with its offspring). Offspring come from
level-switch mutations (lower one gene a level, raise another), repaired and filled so that
each stays within the budget and close to it. Selection runs in stages: every offspring is
scored on a few calibration windows, the best few of them on more windows, and so on; the
winner of the last stage becomes the next parent. Most candidates are therefore cheap.

Training-aware selection (``--select trained:STEPS``, after DarwinLM): every survivor that
reaches the last stage is scored there twice, as pruned and after STEPS steps of distillation
from the dense model, and ranked by the trained score. Rankings before training are not
rankings after (a layer that is cheap to lose before healing may be one that healing cannot
repair, and the other way round); the untrained score is kept for the Pareto front.
"""

from __future__ import annotations

from collections.abc import Sequence

from searcher.algorithms.allocations import SEEDS, OneShot
from searcher.algorithms.base import Algorithm, Request, Result
from searcher.algorithms.stages import DEFAULT_STAGES, STEP_COST, parse_select, parse_stages
from searcher.errors import SearcherError
from searcher.problem import Candidate, Problem

__all__ = ["DEFAULT_STAGES", "Evolution", "parse_stages"]


class Evolution(Algorithm):
    name = "evo"
    reads = ("offspring", "stages", "init", "select")

    def __init__(
        self,
        problem: Problem,
        seed: int,
        full_windows: int,
        offspring: int = 16,
        stages: Sequence[tuple[int, int]] = DEFAULT_STAGES,
        initial: Candidate | None = None,
        max_switches: int = 3,
        init: OneShot | None = None,
        trained: int = 0,
    ) -> None:
        """``init``: a one-shot allocation (owl, flap, additive) run first; its candidate is
        the first parent. Otherwise ``initial``, or the uniform allocation. ``trained``:
        distillation steps before the last stage's score (0: plain selection)."""
        super().__init__(problem, seed, full_windows)
        if stages[-1][0] != full_windows:
            raise ValueError("the last stage must score on full_windows")
        self.offspring = offspring
        self.stages = tuple(stages)
        self.max_switches = max_switches
        self.init = init
        self.trained = trained
        self.flips = 0  # generations whose trained winner is not the untrained ranking's
        start = initial if initial is not None else problem.uniform()
        # repaired too: a given start need not meet the budget (repair draws nothing when it
        # does, so a feasible start is only filled)
        self.parent: Candidate = problem.to_budget(start, self.rng)
        self.generation = 0
        self._stage = 0
        self._pool: list[Candidate] = [self.parent]

    @classmethod
    def configure(cls, problem, seed, full_windows, settings):
        stages = parse_stages(settings["stages"])
        name = settings.get("init") or "profile"
        if name not in SEEDS:
            raise SearcherError(f"unknown --init {name!r}: choose one of {', '.join(SEEDS)}")
        init = None
        if SEEDS[name] is not None:
            init = SEEDS[name].configure(problem, seed, full_windows, settings)
        trained = parse_select(settings.get("select"))
        return cls(
            problem, seed, full_windows, settings["offspring"], stages, init=init, trained=trained
        )

    @classmethod
    def check_settings(cls, settings):
        """The first generation must reach its last stage within --evals: until then no
        candidate is scored on all windows, and the run would end with nothing to show."""
        steps = parse_select(settings.get("select"))
        stages = parse_stages(settings["stages"])
        count, before, spent = settings["offspring"] + 1, 0, 0  # the parent is new too
        for windows, survivors in stages[:-1]:
            spent += count * (windows - before)
            count, before = survivors, windows
        full = stages[-1][0]
        if steps:
            # its first trained stage: every survivor scored, then trained and scored again
            step_windows = STEP_COST * settings.get("batch_size", 4)
            need = (spent + count * (2 * full - before + steps * step_windows)) / full
            if settings["evals"] <= need:
                raise SearcherError(
                    f"--evals {settings['evals']:g} is too few for --select trained:{steps}: "
                    f"evo's first generation needs {need:g} evaluations to reach its trained "
                    f"stage (a training step counts {step_windows} window evaluations); raise "
                    f"--evals well above {need:g}, or lower STEPS, --offspring or --stages"
                )
        if (settings.get("init") or "profile") != "uniform":
            return  # the seed allocation (uniform, for a short run) is scored on all windows first
        if settings["evals"] * full <= spent:
            need = spent / full
            raise SearcherError(
                f"--evals {settings['evals']:g} is too few for evo: with --offspring "
                f"{settings['offspring']} and --stages {settings['stages']} the first generation "
                f"spends {need:g} evaluations before it scores any candidate on all {full} "
                f"windows; raise --evals above {need:g}, or lower --offspring or --stages"
            )

    def _children(self) -> list[Candidate]:
        kids: list[Candidate] = []
        seen = {self.parent}
        for _ in range(10 * self.offspring):  # bounded: small spaces run out of new children
            if len(kids) == self.offspring:
                break
            switches = min(
                int(self.rng.integers(1, self.max_switches + 1)),
                int(self.rng.integers(1, self.max_switches + 1)),
            )
            child = self.problem.mutate(self.parent, self.rng, switches)
            if child not in seen:
                seen.add(child)
                kids.append(child)
        return kids

    def ask(self) -> list[Request]:
        if self.init is not None:
            requests = self.init.ask()
            if requests:
                return requests
            self._start_from_init()
        if self._stage == 0 and len(self._pool) == 1:
            children = self._children()
            if not children:  # every mutation gives back the parent: nothing left to try
                self.done = True
                return []
            self._pool = [self.parent, *children]
        windows = self.stages[self._stage][0]
        plain = [Request(c, windows) for c in self._pool]
        if self.trained and self._last_stage:
            return plain + [Request(c, windows, self.trained) for c in self._pool]
        return plain

    @property
    def _last_stage(self) -> bool:
        return self._stage == len(self.stages) - 1

    def _start_from_init(self) -> None:
        assert self.init is not None and self.init.chosen is not None
        self.parent = self.init.chosen
        self._pool = [self.parent]
        self.init = None

    def tell(self, results: list[Result]) -> None:
        if self.init is not None:
            self.init.tell(results)
            if self.init.done:
                self._start_from_init()
            return
        keep = self.stages[self._stage][1]
        if self.trained and self._last_stage:
            plain = min(results[: len(self._pool)], key=lambda r: r.kl)
            results = results[len(self._pool) :]  # ranked by the trained scores
        # Stable sort: ties keep the parent (listed first), so the search never drifts on ties.
        ranked = sorted(results, key=lambda r: r.kl)
        if self.trained and self._last_stage and ranked[0].candidate != plain.candidate:
            self.flips += 1
        self._pool = [r.candidate for r in ranked[:keep]]
        self._stage += 1
        if self._stage == len(self.stages):
            self.parent = self._pool[0]
            self._pool = [self.parent]
            self._stage = 0
            self.generation += 1

    def shared(self) -> frozenset[Candidate]:
        return self.init.shared() if self.init is not None else frozenset()

    def status(self) -> str:
        if self.init is not None:
            return f"{self.init.name} seed: {self.init.status() or 'scoring'}"
        return f"generation {self.generation + 1}"
