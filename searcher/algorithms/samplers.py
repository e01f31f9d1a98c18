"""Optuna's samplers (TPE, GP, NSGA-II) behind the ask/tell seam, under a hard budget.

Each gene is an integer parameter named by its index (``g000``, ``g001``, ...) with
``IntDistribution(0, n_levels - 1)``: levels are ordered, so integer (not categorical)
parameters let TPE's kernels, the GP's distances and NSGA-II's crossover see that level 3 is
between 2 and 4. The single objective is the calibration KL at full fidelity; every request is
``Request(candidate, full_windows)``. Each ``ask()`` takes ``batch`` trials from
``study.ask()`` at once (``--random-batch``), so a parallel pool can be kept full; samplers see
the rest of the batch as running trials (TPE's constant liar, the GP's batch qLogEI).

The budget is a constraint, not a penalty. Each trial carries one constraint per budgeted
metric, ``fraction_of_dense - limit - 1e-9`` (``<= 0`` is feasible, Optuna's convention; the
1e-9 is ``Budget``'s own tolerance, so Optuna and ``Problem.feasible`` always agree), set with
``Trial.set_constraint`` or ``create_trial(constraints=...)``. Both store them as
``constraints:<metric>`` system attributes, which is where TPE, the GP and NSGA-II read
``FrozenTrial.constraints`` from. (Optuna 5.0 deprecates the samplers' ``constraints_func``
in favour of exactly this; ``constraints_func`` would only compute the same values after the
trial and write them to the same place.)

Infeasible proposals. A sampler proposes a point, and Optuna cannot change a trial's params
after ``ask()``. So every proposal becomes two pieces of information, and only feasible
candidates are ever scored:

- a feasible proposal is scored as proposed and told its KL: one trial, no lie;
- an infeasible proposal is repaired (``Problem.repair``: random genes lowered until the
  budget holds) and filled (``Problem.fill``: random genes raised while it still holds), with
  the algorithm's seeded numpy Generator. Only the repaired candidate is scored. The proposal
  trial is then told COMPLETE with its (positive) constraint values and, as its objective, the
  KL of its repair, and the repaired candidate enters the study as a trial of its own
  (``study.add_trial(create_trial(params=repaired, value=kl, constraints=...))``), once, when
  its KL is known.

Why COMPLETE with constraints and not FAIL or a large penalty value: a FAILED trial is invisible
to every sampler, which would keep proposing the same infeasible region; a large value would
distort the GP's standardised objective model. With constraints set, TPE puts infeasible trials
with the "bad" group ranked by violation (their value is not used), NSGA-II's constrained
domination ranks every feasible trial above every infeasible one and infeasible ones by
violation (value not used either), and the GP learns feasibility from the constraint values
with separate GPs. Only the GP's objective model sees the infeasible trial's value at all, and
the KL of the nearest feasible candidate, the one actually scored, is a sober stand-in there.

NSGA-II only selects parents among trials tagged with a generation (which it tags in
``study.ask()``); a repaired trial is tagged with its proposal's generation so that it competes
in that population (Lamarckian repair: feasible repaired children displace their infeasible
originals under constrained domination). TPE and the GP read every complete trial and need no
tag.

The first batch also scores the uniform allocation, filled to the budget (where ``evo`` starts),
so every sampler knows one good feasible point from the start. A proposal whose scored
candidate is already known is told at once, from the cache, and the batch keeps asking, at
most ``20 * batch`` proposals per batch; a batch with nothing new ends the search.

Same seed, same trials: the samplers get ``seed=`` and repair uses ``self.rng``. The GP needs
torch and scipy (Optuna imports them inside ``GPSampler``; this module imports neither).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import optuna
from optuna.distributions import IntDistribution
from optuna.samplers import BaseGASampler, BaseSampler, GPSampler, NSGAIISampler, TPESampler
from optuna.trial import create_trial

from searcher.algorithms.base import Algorithm, Request, Result
from searcher.errors import SearcherError
from searcher.problem import Candidate, Problem

TOLERANCE = 1e-9  # Budget.violations: a fraction over its limit by at most this is feasible


def parse_objectives(objectives: tuple[str, ...], problem: Problem) -> tuple[str, ...]:
    """``("kl",)`` or ``("kl", COST, ...)`` with COST a cost metric of the problem."""
    costs = [m for m in problem.costs if m != "nonzero"]
    if (
        not objectives
        or objectives[0] != "kl"
        or len(set(objectives)) != len(objectives)
        or any(o not in costs for o in objectives[1:])
    ):
        raise SearcherError(
            f"bad --objectives {','.join(objectives)}: give kl, optionally followed by costs "
            f"to minimise too, from: {', '.join(costs)} (e.g. kl,flops)"
        )
    return tuple(objectives)


@dataclass
class _Proposal:
    trial: optuna.trial.Trial
    genes: Candidate  # as proposed, feasible or not


@dataclass
class _Pending:
    """One candidate to score and the proposal trials waiting for its KL."""

    candidate: Candidate
    proposals: list[_Proposal] = field(default_factory=list)


class OptunaSearch(Algorithm):
    """An Optuna sampler through ``study.ask()`` / ``study.tell()``; subclasses pick it."""

    name: ClassVar[str]
    multi_objective: ClassVar[bool] = True
    reads = ("random_batch", "objectives")
    max_tries: ClassVar[int] = 20  # proposals per requested candidate before giving up

    def __init__(
        self,
        problem: Problem,
        seed: int,
        full_windows: int,
        batch: int = 8,
        start_uniform: bool = True,
        objectives: tuple[str, ...] = ("kl",),
    ) -> None:
        super().__init__(problem, seed, full_windows)
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.objectives = parse_objectives(objectives, problem)
        self.batch = batch
        self.names = [f"g{i:03d}" for i in range(problem.n_genes)]
        self.distributions = {
            name: IntDistribution(0, n - 1) for name, n in zip(self.names, problem.n_levels)
        }
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no line per trial
        self.sampler = self.make_sampler(seed)
        self.study = optuna.create_study(
            directions=["minimize"] * len(self.objectives), sampler=self.sampler
        )
        self.known: dict[Candidate, float] = {}  # full-fidelity KL of every scored candidate
        self.in_study: set[Candidate] = set()  # candidates present as a feasible trial
        self.batches = 0
        self.proposals = 0  # trials the sampler proposed
        self.repaired = 0  # of which infeasible, scored through their repair
        self.best: float | None = None
        self._pending: list[_Pending] = []
        self._seeds: list[Candidate] = (
            [problem.fill(problem.uniform(), self.rng)] if start_uniform else []
        )

    @classmethod
    def configure(cls, problem, seed, full_windows, settings):
        objectives = tuple(settings.get("objectives", "kl").split(","))
        return cls(
            problem, seed, full_windows, batch=settings["random_batch"], objectives=objectives
        )

    def values(self, genes: Candidate, kl: float) -> list[float]:
        """The objective values of a scored candidate: KL, then costs as fractions of dense."""
        fractions = self.problem.fractions(genes)
        return [kl if o == "kl" else fractions[o] for o in self.objectives]

    @abstractmethod
    def make_sampler(self, seed: int) -> BaseSampler:
        """The Optuna sampler, seeded; ``self.batch`` is set already."""

    # -- constraints ---------------------------------------------------------------------------

    def constraints(self, genes: Candidate) -> dict[str, float]:
        """One value per budgeted metric, <= 0 when it meets its limit (Optuna's convention)."""
        fractions = self.problem.fractions(genes)
        return {
            m: fractions[m] - limit - TOLERANCE for m, limit in self.problem.budget.limits.items()
        }

    def params(self, genes: Candidate) -> dict[str, int]:
        return {name: int(x) for name, x in zip(self.names, genes, strict=True)}

    # -- ask / tell ----------------------------------------------------------------------------

    def ask(self) -> list[Request]:
        if self._pending:
            raise RuntimeError("ask() called again before tell()")
        by_candidate: dict[Candidate, _Pending] = {}
        for c in self._seeds:
            if c not in self.known:
                by_candidate.setdefault(c, _Pending(c))
        self._seeds = []
        for _ in range(self.max_tries * self.batch):  # bounded: small spaces run out of points
            if len(by_candidate) >= self.batch:
                break
            trial = self.study.ask(self.distributions)
            genes = tuple(int(trial.params[name]) for name in self.names)
            constraints = self.constraints(genes)
            for metric, value in constraints.items():
                trial.set_constraint(metric, value)
            feasible = all(v <= 0 for v in constraints.values())
            target = genes
            if not feasible:
                target = self.problem.to_budget(genes, self.rng)
                self.repaired += 1
            self.proposals += 1
            trial.set_user_attr("scored", list(target))
            proposal = _Proposal(trial, genes)
            if target in self.known:  # nothing to score: tell the sampler right away
                self._tell(proposal, target, self.known[target])
            else:
                by_candidate.setdefault(target, _Pending(target)).proposals.append(proposal)
        self._pending = list(by_candidate.values())
        self.done = not self._pending
        self.batches += 1
        return [Request(p.candidate, self.full_windows) for p in self._pending]

    def tell(self, results: list[Result]) -> None:
        for pending, result in zip(self._pending, results, strict=True):
            if result.candidate != pending.candidate or result.windows != self.full_windows:
                raise ValueError("results do not match the requests of the last ask()")
            c, kl = pending.candidate, float(result.kl)
            self.known[c] = kl
            self.best = kl if self.best is None else min(self.best, kl)
            frozen = [self._tell(p, c, kl) for p in pending.proposals]
            if c not in self.in_study:
                self.study.add_trial(
                    create_trial(
                        params=self.params(c),
                        distributions=self.distributions,
                        values=self.values(c, kl),
                        constraints=self.constraints(c),
                        user_attrs={
                            "scored": list(c),
                            "repair_of": [t.number for t in frozen],
                        },
                        system_attrs=self._generation(frozen),
                    )
                )
                self.in_study.add(c)
        self._pending = []

    def _tell(self, proposal: _Proposal, scored: Candidate, kl: float) -> optuna.trial.FrozenTrial:
        # An infeasible proposal is told the KL of its repair. With its positive constraint
        # values (set in ask) TPE and NSGA-II rank it by violation, not by this value; only
        # the GP's objective model sees it (module docstring).
        frozen = self.study.tell(proposal.trial, self.values(scored, kl))
        if proposal.genes == scored:
            self.in_study.add(scored)
        return frozen

    def _generation(self, proposals: list[optuna.trial.FrozenTrial]) -> dict[str, int]:
        """NSGA-II's generation tag for a trial added on behalf of ``proposals``."""
        if not isinstance(self.sampler, BaseGASampler):
            return {}
        key = self.sampler._get_generation_key()
        generations = [t.system_attrs[key] for t in proposals if key in t.system_attrs]
        return {key: min(generations, default=0)}

    def status(self) -> str:
        return f"batch {self.batches}, {self.repaired}/{self.proposals} proposals repaired"


class TPESearch(OptunaSearch):
    """Tree-structured Parzen estimator (multivariate, constant liar for batches)."""

    name = "tpe"

    def make_sampler(self, seed: int) -> BaseSampler:
        return TPESampler(seed=seed, multivariate=True, constant_liar=True)


class GPSearch(OptunaSearch):
    """Gaussian-process Bayesian optimisation (constrained LogEI, qLogEI for batches)."""

    name = "gp"

    def make_sampler(self, seed: int) -> BaseSampler:
        return GPSampler(seed=seed)


class NSGA2Search(OptunaSearch):
    """NSGA-II on the single objective, with constrained domination; population = batch."""

    name = "nsga2"

    def make_sampler(self, seed: int) -> BaseSampler:
        return NSGAIISampler(seed=seed, population_size=max(2, self.batch))
