"""A searcher search as a Ray Tune experiment: one Tune trial per candidate allocation.

Each trial's config is the run settings (``"spec"``, a ``RunSpec`` as a dict) plus one integer
level per gene (``"g0"``, ``"g1"``, ...). ``CandidateTrainable`` scores one calibration window
per training iteration and reports the mean KL so far, so ASHA's rungs (``time_attr="windows"``)
select on growing fidelity as the core's incremental stages do; a trial ends at the last
stage's window count (full fidelity).

An infeasible proposal is repaired to the budget (``Problem.repair``, then ``Problem.fill``, as
the Optuna samplers of ``searcher.algorithms.samplers`` do) with a generator seeded by the run
seed and the proposed genes, so the same proposal always becomes the same candidate. Only the
repaired candidate is scored; its genes are reported.

The model, windows, space and dense reference are loaded once per actor process and kept in a
module-level cache keyed by the settings that determine them: with ``reuse_actors=True``,
a new trial only switches the candidate (``reset_config``).

    from searcher.spec import RunSpec
    from searcher.tune import best_candidate, tune_search

    grid = tune_search(RunSpec(budget="flops=0.5", preset="quick"), 64, "/tmp/tune")
    print(best_candidate(grid))
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from searcher import cluster
from searcher.algorithms import parse_stages
from searcher.budget import Budget
from searcher.errors import SearcherError
from searcher.fitness import Evaluator
from searcher.problem import Candidate, Problem
from searcher.run import Session, SessionKey, open_session, problem_for
from searcher.spec import RunSpec

SEARCHES = ("tpe", "random")
SCHEDULERS = ("asha", "fifo")
CHECKPOINT_FILE = "candidate.json"


@dataclass
class Resident:
    """What scoring needs, loaded once per process: session, problem and evaluator."""

    session: Session
    problem: Problem
    evaluator: Evaluator
    full: int  # windows of a full-fidelity evaluation
    load_seconds: float


# by session, full-fidelity windows and budget: what determines the resident state (not the
# seed, threads or placement)
_RESIDENT: dict[tuple[SessionKey, int, str], Resident] = {}


def resident(spec: RunSpec) -> Resident:
    """The scoring state for ``spec`` (resolved), loaded on first use in this process.

    Loaded as ``searcher.run.run`` loads it (``SessionKey.of``).
    """
    full = parse_stages(spec.stages)[-1][0]
    session_key = SessionKey.of(spec, full)
    key = (session_key, full, spec.budget)
    if key not in _RESIDENT:
        t0 = time.perf_counter()
        session = open_session(session_key)
        problem = problem_for(session.space, Budget.parse(spec.budget))
        evaluator = Evaluator(
            session.loaded.model, session.windows.calibration[:full], session.space.apply,
            session.space.dense(), spec.batch_size,
        )  # fmt: skip
        _RESIDENT[key] = Resident(session, problem, evaluator, full, time.perf_counter() - t0)
    return _RESIDENT[key]


def clear_resident() -> None:
    """Drop every cached model in this process."""
    _RESIDENT.clear()


def repaired(problem: Problem, genes: tuple[int, ...], seed: int) -> Candidate:
    """``genes`` when feasible, else its repair filled to the budget (deterministic)."""
    if problem.feasible(genes):
        return genes
    rng = np.random.default_rng([seed, *genes])
    return problem.to_budget(genes, rng)


def portable(spec: RunSpec) -> RunSpec:
    """``spec`` resolved, with local model and data paths made absolute: Tune runs each
    trainable in its trial directory, not in the driver's working directory."""
    spec = spec.resolved()
    paths = {}
    for name in ("model", "data"):
        value = getattr(spec, name)
        if value and Path(value).expanduser().exists():
            paths[name] = str(Path(value).expanduser().resolve())
    # trials go to Tune's own storage: no database URL in trial configs
    return replace(spec, storage=None, **paths)


class CandidateTrainable(tune.Trainable):
    """Scores one candidate, one calibration window per ``step()``."""

    def setup(self, config: dict[str, Any]) -> None:
        self._configure(config)

    def _configure(self, config: dict[str, Any]) -> None:
        spec = RunSpec.from_dict(dict(config["spec"])).resolved()
        if spec.device.startswith("cuda"):
            spec = replace(spec, device="cuda")  # Ray makes the trial's GPU the only visible one
        torch.set_num_threads(spec.threads)
        self.state = resident(spec)
        problem = self.state.problem
        try:
            genes = tuple(int(config[f"g{i}"]) for i in range(problem.n_genes))
        except KeyError as exc:
            raise SearcherError(f"the trial config has no gene {exc.args[0]}") from None
        if any(not 0 <= g < n for g, n in zip(genes, problem.n_levels)):
            raise SearcherError(f"genes {list(genes)} are out of range for {problem.n_levels}")
        self.proposed = genes
        self.candidate = repaired(problem, genes, spec.seed)
        self.fractions = problem.fractions(self.candidate)
        self.feasible = problem.feasible(self.candidate)
        self.kl: list[float] = []
        self.score_seconds = 0.0

    def step(self) -> dict[str, Any]:
        n = len(self.kl)
        if n >= self.state.full:
            raise SearcherError("the candidate is already scored at full fidelity")
        t0 = time.perf_counter()
        scores = self.state.evaluator.score(self.candidate, n, n + 1)
        self.score_seconds += time.perf_counter() - t0
        self.kl.append(float(scores.kl[0]))
        windows = len(self.kl)
        result: dict[str, Any] = {
            "kl": float(np.mean(self.kl)),
            "windows": windows,
            "full_windows": self.state.full,
            "feasible": self.feasible,
            "repaired": self.candidate != self.proposed,
            "genes": list(self.candidate),
            "score_seconds": self.score_seconds,
            **{f"frac_{m}": f for m, f in self.fractions.items()},
        }
        if windows >= self.state.full:
            result["done"] = True
        return result

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        self._configure(new_config)
        return True

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        payload = {"genes": list(self.candidate), "windows": len(self.kl), "kl": self.kl}
        Path(checkpoint_dir, CHECKPOINT_FILE).write_text(json.dumps(payload), encoding="utf-8")

    def load_checkpoint(self, checkpoint: dict[str, Any] | str | None) -> None:
        if isinstance(checkpoint, str):
            checkpoint = json.loads(Path(checkpoint, CHECKPOINT_FILE).read_text(encoding="utf-8"))
        if checkpoint:
            self.kl = [float(k) for k in checkpoint["kl"]]


def param_space(spec: RunSpec) -> dict[str, Any]:
    """Tune's param space: the resolved spec plus ``tune.randint(0, levels)`` per gene.

    Loads the model in this process (once) to learn the space's levels.
    """
    spec = portable(spec)
    levels = resident(spec).problem.n_levels
    return {"spec": spec.to_dict(), **{f"g{i}": tune.randint(0, n) for i, n in enumerate(levels)}}


def tune_search(
    spec: RunSpec,
    num_samples: int,
    storage_path: str,
    name: str = "searcher",
    search: str = "tpe",
    scheduler: str = "asha",
) -> tune.ResultGrid:
    """Search ``spec``'s space with Ray Tune: ``num_samples`` candidates, each a trial.

    ``search``: "tpe" (Optuna's TPE through ``OptunaSearch``) or "random"; ``scheduler``:
    "asha" (stops poor candidates after 1, 2, 4, ... windows) or "fifo" (all to full
    fidelity). Uses the running Ray instance, else ``spec.address``, else a local one
    (shut down again on return). Trial results are under ``storage_path/name``.
    """
    if search not in SEARCHES:
        raise SearcherError(f"unknown search {search!r}: choose one of {', '.join(SEARCHES)}")
    if scheduler not in SCHEDULERS:
        raise SearcherError(
            f"unknown scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)}"
        )
    if "latency" in Budget.parse(spec.budget).metrics:
        raise SearcherError(
            "Ray Tune experiments budget FLOPs, parameters or sparsity; for a latency budget "
            "use searcher run (its latency table and measurements live in the driver)"
        )
    spec = portable(spec)
    full = parse_stages(spec.stages)[-1][0]
    space = param_space(spec)
    if search == "tpe":
        search_alg: Any = OptunaSearch(metric="kl", mode="min", seed=spec.seed)
    else:
        search_alg = BasicVariantGenerator(random_state=spec.seed)
    sched: Any
    if scheduler == "asha":
        sched = ASHAScheduler(time_attr="windows", max_t=full, grace_period=1, reduction_factor=2)
    else:
        sched = FIFOScheduler()
    if "://" not in storage_path:
        storage_path = str(Path(storage_path).expanduser().resolve())
    gpus = torch.cuda.device_count() if spec.device.startswith("cuda") else 0
    resources = {"cpu": spec.threads, **({"gpu": 1} if gpus else {})}
    tuner = tune.Tuner(
        tune.with_resources(CandidateTrainable, resources),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric="kl", mode="min", num_samples=num_samples, search_alg=search_alg,
            scheduler=sched, reuse_actors=True, trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(storage_path=storage_path, name=name, verbose=0),
    )  # fmt: skip
    with cluster.connected(spec.address, max(os.cpu_count() or 1, spec.threads), gpus):
        return tuner.fit()


def _trial_dirname(trial: Any) -> str:
    """Short trial directories (Tune's default name spells out the whole spec)."""
    return f"candidate_{trial.trial_id}"


def best_candidate(grid: tune.ResultGrid) -> dict[str, Any]:
    """Genes, KL and windows of the best feasible trial scored at full fidelity.

    (``grid.get_best_result()`` would also rank trials that ASHA stopped early, on fewer
    windows.)
    """
    best: dict[str, Any] | None = None
    for result in grid:
        m = result.metrics or {}
        if result.error is not None or "kl" not in m or not m.get("feasible"):
            continue
        if m["windows"] != m["full_windows"]:
            continue
        if best is None or m["kl"] < best["kl"]:
            best = {"genes": list(m["genes"]), "kl": float(m["kl"]), "windows": m["windows"]}
    if best is None:
        raise SearcherError("no trial was scored at full fidelity: raise num_samples")
    return best
