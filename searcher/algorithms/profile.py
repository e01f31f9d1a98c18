"""Single-unit profiles: score groups of genes lowered alone, assume the errors add up, solve.

A profile lowers one group of genes (every gene of a decoder layer, or one gene) to one of
its options (a kept fraction, each gene at its nearest level), keeps the rest of the model
dense, and scores it on a few calibration windows. Between scored options a group's error
follows a power law in the share it removes (``curve``; 0 at the dense end). Below the
lowest scored option nothing is known, and the solver may not go there: extrapolated errors
understate how fast damage grows, and on SmolLM2 at width flops 0.5 a linearly extrapolated
profile led the solver to allocations twice as bad as the uniform one (KL 7.9 vs 3.6),
where the same scores with the floor gave 2.5. A multiple-choice knapsack then picks one
option per group under the first budgeted metric.

A profile's candidates depend on the budget only through where its scored options sit
(around the uniform allocation), so runs at nearby budgets find many of theirs in the score
cache. ``plan`` sizes a profile to an evaluation budget: per decoder layer, as many options
as fit in a share of it, or none at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from searcher.problem import Candidate, Problem, knapsack

LEVELS = (6, 5, 4, 3, 2, 1)  # options scored per layer, the most that fit
STEP = 0.125  # kept fraction between scored options, and from the lowest to uniform
SHARE = 0.6  # of --evals at most for the profile; the rest refines its solution (evo)
# exponents of the prior in ``Profile.split``: each gives one more start (see there)
SPLIT_EXPONENTS = (0.5, 1.0, 2.0)


@dataclass(frozen=True)
class Profile:
    """Which groups are lowered alone, to which of their options, on how many windows;
    and, once told their scores, the allocation the errors' sum favours."""

    problem: Problem
    groups: tuple[tuple[int, ...], ...]  # gene indices lowered together
    picks: tuple[tuple[int, ...], ...]  # per group, the options scored (indices, ascending)
    windows: int

    @cached_property
    def options(self) -> list[list[dict[int, int]]]:
        """Per group, its options in ascending kept fraction, the last all dense: for each
        kept fraction any of its genes has, every gene at its nearest level (ties upward)."""
        keep = self.problem.keep
        out = []
        for genes in self.groups:
            fractions = sorted({float(f) for g in genes for f in keep[g]})
            opts: list[dict[int, int]] = []
            for f in fractions:
                o = {g: int(np.argmin([abs(k - f) - 1e-12 * k for k in keep[g]])) for g in genes}
                if not opts or o != opts[-1]:
                    opts.append(o)
            out.append(opts)
        return out

    def alone(self, group: int, option: int) -> Candidate:
        """Dense but for the group at ``option``."""
        genes = list(self.problem.dense())
        for g, level in self.options[group][option].items():
            genes[g] = level
        return tuple(genes)

    def candidates(self) -> list[Candidate]:
        """What to score, in order, without repeats."""
        seen: dict[Candidate, None] = {}
        for group, picks in enumerate(self.picks):
            for option in picks:
                seen.setdefault(self.alone(group, option), None)
        return list(seen)

    def cost(self, full_windows: int) -> float:
        """Full-fidelity-equivalent evaluations the profile spends."""
        return len(self.candidates()) * self.windows / full_windows

    def kept(self, group: int, option: int) -> float:
        keep = self.problem.keep
        return float(np.mean([keep[g][lv] for g, lv in self.options[group][option].items()]))

    def errors(
        self, group: int, scores: dict[Candidate, float], shape: str = "power"
    ) -> np.ndarray:
        """The group's error at every option, as a function of the share it removes
        (``curve``, or straight lines with ``shape="linear"``); infinite below the lowest
        scored option, 0 dense."""
        n = len(self.options[group])
        out = self.error_at(group, [1 - self.kept(group, o) for o in range(n)], scores, shape)
        out[-1] = 0.0
        return out

    def error_at(
        self, group: int, removed: Sequence[float], scores: dict[Candidate, float],
        shape: str = "power",
    ) -> np.ndarray:  # fmt: skip
        """The group's error at each share ``removed`` (see ``errors``)."""
        picks = self.picks[group]
        r = np.asarray(removed, dtype=float)
        out = np.where(r <= 0, 0.0, np.inf)
        if not picks:
            return out
        at = np.array([1 - self.kept(group, o) for o in picks])  # descending
        err = np.array([scores[self.alone(group, o)] for o in picks])
        for i in np.flatnonzero((r > 0) & (r <= at[0] + 1e-12)):
            if shape == "linear":
                out[i] = np.interp(r[i], np.r_[0.0, at[::-1]], np.r_[0.0, err[::-1]])
            else:
                out[i] = curve(min(r[i], at[0]), at, err)
        return out

    def solve(
        self, scores: dict[Candidate, float], shape: str = "power", bins: int = 4000
    ) -> Candidate:
        """The allocation with the least summed error under the first budgeted metric."""
        errors = [self.errors(group, scores, shape) for group in range(len(self.groups))]
        return self._least(self.options, errors, bins)

    def split(
        self, scores: dict[Candidate, float], shares: Sequence[float], exponent: float = 1.0,
        bins: int = 4000,
    ) -> Candidate:  # fmt: skip
        """The allocation with the least summed error when each group's error is shared
        among its genes in proportion to ``shares ** exponent`` (a prior per gene;
        ``split_errors``).

        Lowering a whole layer tells what the layer is worth, not which of its blocks to
        lower; a cheap prior splits it. How sharply is a matter of the budget, so the
        default start tries exponents 0.5, 1 and 2 (``SPLIT_EXPONENTS``): a block's residual
        ratio is how far it moves the residual stream, and KL grows with the square of a
        small move (exponent 2), but the shares are a coarse guess. On SmolLM2 (depth, one
        window per layer, ``residual_ratio``; calibration / validation KL) at flops 0.5 the
        exponents 0.5, 1, 2 scored 5.44/5.68, 5.44/5.68 and 4.96/4.91 against the per-layer
        solution's 7.21/5.69 and the per-block profile's 5.49/5.21 (twice the evaluations);
        at 75% of blocks 1.02/1.00, 1.33/1.25 and 3.19/3.21 against the per-layer
        solution's 1.08/1.10. No one exponent (nor the per-layer solution) wins both, so
        each is one more start beside the others."""
        weights = [float(s) ** exponent for s in shares]
        return self._least(*self.split_errors(scores, weights), bins)

    def split_errors(
        self, scores: dict[Candidate, float], shares: Sequence[float]
    ) -> tuple[list[list[dict[int, int]]], list[np.ndarray]]:
        """Per gene, its levels as options and their errors: at each level, the gene's share
        of its group's error at the share that level removes (infinite below the group's
        lowest scored option, 0 dense)."""
        keep = self.problem.keep
        options: list[list[dict[int, int]]] = []
        errors: list[np.ndarray] = []
        for group, genes in enumerate(self.groups):
            total = float(sum(shares[g] for g in genes))
            for g in genes:
                w = shares[g] / total if total > 0 else 1 / len(genes)
                err = self.error_at(group, [1 - k for k in keep[g]], scores)
                options.append([{g: level} for level in range(len(keep[g]))])
                known = np.isfinite(err)
                err[known] *= w
                errors.append(err)
        return options, errors

    def _least(
        self, options: list[list[dict[int, int]]], errors: list[np.ndarray], bins: int
    ) -> Candidate:
        """One of ``options`` per item (each a gene -> level map) with the least summed
        ``errors`` under the first budgeted metric (``knapsack``); uniform if none fits."""
        metric, limit = next(iter(self.problem.budget.limits.items()))
        table = self.problem.costs[metric]
        costs = [
            np.array([sum(table.levels[g][lv] for g, lv in o.items()) for o in opts])
            for opts in options
        ]

        def assemble(choice: Sequence[int]) -> Candidate:
            genes = list(self.problem.dense())
            for opts, pick in zip(options, choice, strict=True):
                for g, lv in opts[pick].items():
                    genes[g] = lv
            return tuple(genes)

        room = limit * table.dense() * (1 + 1e-9) - table.base
        choice = knapsack(costs, errors, room, bins, lambda c: table.cost(assemble(c)) - table.base)
        return self.problem.uniform() if choice is None else assemble(choice)


def curve(r: float, at: np.ndarray, err: np.ndarray) -> float:
    """Error at removed share ``r`` from errors ``err`` scored at removed shares ``at``
    (descending, ``r`` at most ``at[0]``): a power law through the neighbouring scores,
    quadratic from the dense end. Damage grows faster than the share removed, and straight
    lines make the knapsack's answers corners (every unit at a scored level or dense): on
    SmolLM2 at sparsity 70% this curve's solution scored KL 2.09 against the straight
    lines' 2.31; at width flops 0.5 the straight lines' did better (2.17 against 2.51), so
    the default start tries both (``ProfileSeed``)."""
    if r <= at[-1]:
        return float(err[-1] * (r / at[-1]) ** 2) if at[-1] > 0 else 0.0
    j = min(max(int(np.searchsorted(-at, -r)), 1), len(at) - 1)
    r0, r1, e0, e1 = at[j], at[j - 1], err[j], err[j - 1]  # r0 < r <= r1
    if min(e0, e1) > 0 and r1 > r0 > 0:
        return float(e0 * (r / r0) ** (np.log(e1 / e0) / np.log(r1 / r0)))
    return float(e0 + (e1 - e0) * (r - r0) / (r1 - r0)) if r1 > r0 else float(e1)


def spaced_picks(kept: Sequence[float], at: float, count: int) -> tuple[int, ...]:
    """``count`` options to score, given each option's kept fraction (ascending, the last
    dense and never scored) and the uniform allocation's (``at``): the options nearest
    ``at - STEP``, ``at``, ``at + STEP``, ... (shifted down while they would reach dense).

    The lowest sits one STEP below the uniform allocation, because the solver may not go
    below it; on SmolLM2 a floor of 12.5% (width, two 1/16 steps) to 10% (sparsity, one
    level) below uniform gave the best single-score profiles (KL 2.17 at width flops 0.5
    and 2.42 at sparsity 70% against 2.51 and 3.15 with the floor twice as low)."""
    below = np.asarray(kept[:-1], dtype=float)
    if not len(below):
        return ()
    top = min(at - STEP + (count - 1) * STEP, below[-1])
    targets = top - STEP * np.arange(count)[::-1]
    picks = {int(np.argmin(np.abs(below - t))) for t in targets}
    return tuple(sorted(picks))


def layer_groups(problem: Problem) -> tuple[tuple[int, ...], ...]:
    """Genes grouped by decoder layer (in order of first appearance)."""
    groups: dict[int, list[int]] = {}
    for g, layer in enumerate(problem.layers or range(problem.n_genes)):
        groups.setdefault(layer, []).append(g)
    return tuple(tuple(v) for v in groups.values())


def sized(
    problem: Problem, groups: tuple[tuple[int, ...], ...], count: int, windows: int
) -> Profile:
    """A profile of ``groups``, ``count`` options each, from just below the uniform
    allocation upward (``spaced_picks``)."""
    uniform = problem.uniform()
    bare = Profile(problem, groups, tuple(() for _ in groups), windows)
    picks = []
    for group, opts in enumerate(bare.options):
        at = float(np.mean([problem.keep[g][uniform[g]] for g in groups[group]]))
        kept = [bare.kept(group, o) for o in range(len(opts))]
        picks.append(spaced_picks(kept, at, count))
    return Profile(problem, groups, tuple(picks), windows)


def plan(
    problem: Problem, full_windows: int, windows: int, evals: float, share: float = SHARE
) -> list[Profile]:
    """The profiles of the default start, costing at most ``share`` of ``evals`` with the
    full evaluations of their solutions (two each) kept out of it: where there is room for
    both, the finest per-gene profile (up to ``LEVELS`` options per gene) that leaves room
    for one option per layer; then the finest per-layer profile that fits. Empty when not
    even one option per layer fits.

    Neither kind wins everywhere on SmolLM2 (KL of the knapsack's solution): per layer did
    better at width flops 0.5 (2.20 against 2.51 per gene, for half the evaluations), at
    depth (1.08 against 1.40) and at sparsity 70% (three options 2.04 against 2.08, 22.5
    against 158 evaluations); per gene at width flops 0.7 (0.78 against 1.10). So both
    are solved where they fit, and evo starts from the better solution. More options help
    per gene and hardly per layer: at width flops 0.7, 1/2/3 options per gene gave 0.785/
    0.766/0.760 (calibration KL) and 2/3 per layer 1.098/1.101; at width flops 0.5 per
    layer 1/2/3 gave 2.20/2.21/2.21, per gene (straight lines) 2.17/2.17/2.19."""
    room = min(share * evals, evals - 2)
    layers = layer_groups(problem)
    chosen: list[Profile] = []
    if len(layers) < problem.n_genes:
        singles = tuple((g,) for g in range(problem.n_genes))
        coarsest = sized(problem, layers, 1, windows).cost(full_windows)
        for count in LEVELS:  # the finest per-gene profile that leaves the coarsest per layer
            genes = sized(problem, singles, count, windows)
            if genes.candidates() and genes.cost(full_windows) + 2 + coarsest <= room:
                chosen.append(genes)
                room -= genes.cost(full_windows) + 2
                break
    for count in LEVELS:
        profile = sized(problem, layers, count, windows)
        if not profile.candidates():
            return []  # nothing below dense anywhere
        if profile.cost(full_windows) <= room:
            return [profile, *chosen]
    return chosen
