"""A whole search run, and scoring a saved config: the functions behind the CLI.

A run reads as ``prepare`` (settings checked before anything loads), ``_load`` (model,
space, latency, dense reference), ``_search`` (recorded in run.json, each score stored as it
comes) and ``_report`` (validation and the result files); see ``run``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields, replace
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

import spaces
from latency_models.backends import cpu_name
from latency_models.table import CostTable
from searcher import data, latency, models
from searcher.algorithms import ALGORITHMS, SEEDS, Algorithm, parse_stages
from searcher.algorithms.stages import STEP_COST, parse_select
from searcher.budget import Budget
from searcher.engine import Engine, Progress, Trial
from searcher.errors import SearcherError
from searcher.fitness import Evaluator
from searcher.pool import LocalPool, Outcome, Pool, ReplayPool
from searcher.problem import Candidate, Problem
from searcher.results import front, plot_front, trials_frame, write_json
from searcher.rundir import RunDir, claimed
from searcher.score_cache import ScoreCache, cache_key, cache_root
from searcher.spec import RunSpec
from searcher.store import (
    DEFAULT_FILE,
    TrialStore,
    close_storage,
    has_password,
    located,
    open_storage,
    redacted,
)

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    out: Path
    best: dict[str, Any]
    trials: int
    evals: float
    seconds: float


@dataclass(frozen=True)
class SessionKey:
    """What a scoring session is built from: the model, the text's windows, the space.

    Equal keys build the same session (``open_session``): a key is what Ray workers get to
    rebuild the driver's session, and what ``searcher.tune`` caches loaded sessions by.
    """

    model: str | None  # None: the embedded model
    data: str | None  # None: the built-in text
    space: str
    space_options: dict[str, Any]
    seq_len: int
    calibration: int  # calibration windows: the scored ones and the importance pass's
    validation: int
    importance: int  # the first calibration windows rank the units the space removes
    batch_size: int
    device: str
    dtype: str
    trust_remote_code: bool
    text_sha256: str | None = None  # rebuilding a saved config: the text must be unchanged

    def __hash__(self) -> int:  # (the options are a mapping: hashed by content)
        return hash(tuple(_hashable(getattr(self, f.name)) for f in fields(self)))

    @classmethod
    def of(cls, spec: RunSpec, full: int) -> SessionKey:
        """The session a search of ``spec`` (resolved) scores in; ``full`` windows per
        evaluation."""
        return cls(
            spec.model, spec.data, spec.space, spec.space_options, spec.seq_len,
            max(full, spec.importance_windows), spec.validation_windows, spec.importance_windows,
            spec.batch_size, spec.device, spec.dtype, spec.trust_remote_code,
        )  # fmt: skip


def _hashable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    return value


@dataclass
class Session:
    """A loaded model with its calibration windows and a space built over it."""

    key: SessionKey
    loaded: models.LoadedModel
    windows: data.Windows
    space: spaces.SearchSpace


class Timings:
    """Wall-clock seconds of a run: in all, and of each phase timed with ``phase``."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self.phases[name] = time.perf_counter() - t0

    def finish(self) -> float:
        """The run's seconds so far, recorded as the phase ``total``."""
        self.phases["total"] = time.perf_counter() - self.start
        return self.phases["total"]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("searcher", "torch", "transformers", "numpy", "pandas"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def hardware(device: str, threads: int) -> dict[str, Any]:
    info: dict[str, Any] = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads}
    info["device"] = device
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def open_session(key: SessionKey) -> Session:
    """Load the model, cut the windows and build the space of ``key``: shared by run, eval
    and the latency jobs.

    Everything cheap is checked before the model loads, so bad input fails fast.
    """
    spaces.check_options(key.space, key.space_options)
    text = data.read_text(key.data)
    if key.text_sha256 is not None and data.text_sha256(text[0]) != key.text_sha256:
        raise SearcherError(
            f"the calibration text {text[1]} has changed since the run, so the neurons, heads "
            "or masks the run chose cannot be rebuilt from it"
        )
    loaded = models.load(key.model, key.device, key.dtype, key.trust_remote_code)
    structure = spaces.Structure.of(loaded.model)
    win = data.windows(loaded.tokenizer, text, key.seq_len, key.calibration, key.validation)
    built = spaces.build(
        key.space, structure, key.seq_len, win.calibration[: key.importance], key.batch_size,
        key.space_options,
    )  # fmt: skip
    return Session(key, loaded, win, built)


def problem_for(
    space: spaces.SearchSpace, budget: Budget, extra: dict[str, CostTable] | None = None
) -> Problem:
    """The space's exact costs (plus ``extra`` cost tables, e.g. latency) under a budget."""
    return Problem(
        n_levels=space.n_levels,
        costs={**space.cost_tables(), **(extra or {})},
        budget=budget,
        keep=tuple(g.keep for g in space.genes),
        space_name=space.name,
        priors=space.priors(),
        layers=space.gene_layers(),
    )


def config_header(session: Session, spec: RunSpec) -> dict[str, Any]:
    """What identifies the model, space and data a config belongs to (to rebuild it)."""
    return {
        "searcher": versions()["searcher"],
        "model": session.loaded.identity,
        "dtype": spec.dtype,
        "space": {
            "name": session.space.name,
            "options": session.space.options(),
            "fingerprint": session.space.fingerprint(),
        },
        "data": {
            **session.windows.spec,
            "importance_windows": session.key.importance,
            "batch_size": spec.batch_size,
        },
        "budget": spec.budget,
    }


def entry(space: spaces.SearchSpace, trial: Trial, full: int) -> dict[str, Any]:
    return {
        "genes": list(trial.candidate),
        "config": space.describe(trial.candidate),
        "costs": trial.costs,
        "fractions": trial.fractions,
        "feasible": trial.feasible,
        "calibration": {"kl": trial.fitness(full), "windows": full, **trained_scores(trial)},
        "trial": trial.number,
    }


def trained_scores(trial: Trial) -> dict[str, Any]:
    """The calibration KL after training-aware selection's distillation, if it had any."""
    if not trial.trained:
        return {}
    steps = max(trial.trained)
    t = trial.trained[steps]
    return {"trained": {"steps": steps, "kl": t.fitness(), "seconds": round(t.seconds, 2)}}


@contextmanager
def scoring_pool(spec: RunSpec, session: Session, evaluator: Evaluator) -> Iterator[Pool]:
    """In this process for one local worker, else a Ray actor pool (local or on a cluster)."""
    seed = spec.seed if parse_select(spec.select) else None
    if spec.workers == 1 and spec.address is None:  # ("local": a Ray instance all the same)
        trained = None
        if seed is not None:
            from searcher.trained_selection import scorer_for

            tokenizer = session.loaded.tokenizer
            trained = scorer_for(session.key, session.space, evaluator, tokenizer, seed)
        yield LocalPool(evaluator, trained)
        return
    from searcher import cluster
    from searcher.workers import RayPool, WorkerSetup

    key = session.key
    if key.model is not None and Path(key.model).exists():
        key = replace(key, model=str(Path(key.model).resolve()))  # workers have their own cwd
    setup = WorkerSetup(
        key, evaluator.n_windows, session.space.fingerprint(), spec.threads, trained_seed=seed
    )
    gpus = torch.cuda.device_count() if spec.device.startswith("cuda") else 0
    with cluster.connected(spec.address, spec.workers * spec.threads, gpus):
        pool = RayPool(setup, session.windows.calibration, evaluator.reference(), spec.workers)
        try:
            yield pool
        finally:
            pool.close()


def default_out(spec: RunSpec) -> Path:
    """results/SPACE-BUDGET-ALGO-TIME: where a run (or a sweep) writes without --out."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    budget = spec.budget.replace(" ", "").replace("=", "").replace(",", "-")
    return Path("results") / f"{spec.space}-{budget}-{spec.algo}-{stamp}"


def resume(
    run_dir: str,
    on_progress: Callable[[Progress], None] | None = None,
    on_phase: Callable[[str], None] = lambda text: None,
    **placement: Any,
) -> RunResult:
    """Continue an interrupted run (killed, or stopped with Ctrl-C) from its directory.

    ``placement`` may change the settings of ``searcher.spec.PLACEMENT`` (threads, workers,
    address): where evaluations run, not what they return.
    """
    try:
        values = RunDir(Path(run_dir)).read_info()["spec"]
    except (OSError, ValueError, KeyError, TypeError):
        raise SearcherError(
            f"--resume {run_dir}: no readable run.json there; pass a run directory that "
            "`searcher run` made"
        ) from None
    return run(placed(values, run_dir, placement), on_progress, on_phase, resume=True)


def placed(values: dict[str, Any], run_dir: str, placement: dict[str, Any]) -> RunSpec:
    """A saved run's (or sweep's) spec, in ``run_dir``, with ``placement`` changed."""
    changes = dict(placement)
    if "workers" in placement and "threads" not in placement:
        changes["threads"] = None  # re-derive threads per worker from the new worker count
    return replace(RunSpec.from_dict(values), out=str(Path(run_dir)), **changes)


def run(
    spec: RunSpec,
    on_progress: Callable[[Progress], None] | None = None,
    on_phase: Callable[[str], None] = lambda text: None,
    resume: bool = False,
) -> RunResult:
    """Search per-layer allocations for ``spec`` and write the run directory.

    With ``resume``, ``spec.out`` is an interrupted run's directory: its logged scores are
    replayed (see ``ReplayPool``) and the search goes on from where it stopped.
    """
    timings = Timings()
    plan = prepare(spec, resume)
    with claimed(plan.dir.path, resume):  # one run per directory: a second one is refused here
        previous = plan.dir.read_info() if resume else {}
        loaded = _load(plan, previous, timings, on_phase)
        searched = _search(plan, loaded, previous, timings, on_progress, on_phase)
        return _report(plan, loaded, searched, timings, on_phase)


@dataclass(frozen=True)
class Plan:
    """A run's settings, resolved and checked before anything loads, and its directory."""

    spec: RunSpec
    budget: Budget
    stages: tuple[tuple[int, int], ...]
    objectives: tuple[str, ...]
    latency_settings: latency.LatencySettings | None  # None: the run times no candidate
    dir: RunDir

    @property
    def full(self) -> int:
        """Windows of a full-fidelity evaluation: the last stage's."""
        return self.stages[-1][0]


def prepare(spec: RunSpec, resume: bool = False) -> Plan:
    """``spec`` resolved, and everything checked that can be before the model loads."""
    spec = spec.resolved()
    if len(Budget.sweep(spec.budget)) > 1:
        raise SearcherError(
            f"--budget {spec.budget} names several budgets: run them with searcher.sweep.sweep "
            "(the CLI does so by itself)"
        )
    budget = Budget.parse(spec.budget)
    _check_algorithm(spec)
    stages = parse_stages(spec.stages)
    ALGORITHMS[spec.algo].check_settings(spec.to_dict())
    objectives = tuple(spec.objectives.split(","))
    timed = latency.wanted(spec, budget.metrics, objectives)
    latency_settings = latency.run_settings(spec) if timed else None
    if spec.address is not None:
        from searcher.cluster import check_address

        check_address(spec.address)  # an unreachable cluster fails before the model loads
    torch.set_num_threads(spec.threads)
    out = Path(spec.out) if spec.out else default_out(spec)
    if spec.storage is not None and not resume:
        spec = _checked_storage(spec)
    return Plan(spec, budget, stages, objectives, latency_settings, RunDir(out))


def _check_algorithm(spec: RunSpec) -> None:
    if spec.algo not in ALGORITHMS:
        raise SearcherError(f"unknown --algo {spec.algo!r}: choose one of {', '.join(ALGORITHMS)}")
    if spec.init not in SEEDS:
        raise SearcherError(f"unknown --init {spec.init!r}: choose one of {', '.join(SEEDS)}")
    if spec.init not in ("uniform", "profile") and spec.algo != "evo":
        raise SearcherError(f"--init {spec.init} sets where evo starts: use it with --algo evo")
    if parse_select(spec.select) and "select" not in ALGORITHMS[spec.algo].reads:
        readers = ", ".join(n for n, a in ALGORITHMS.items() if "select" in a.reads)
        raise SearcherError(
            f"--select {spec.select} is evo's selection: use it with --algo {readers}"
        )
    if spec.objectives != "kl" and not ALGORITHMS[spec.algo].multi_objective:
        multi = ", ".join(n for n, a in ALGORITHMS.items() if a.multi_objective)
        raise SearcherError(f"--objectives {spec.objectives} needs one of --algo {multi}")


def _checked_storage(spec: RunSpec) -> RunSpec:
    """``spec`` with its --storage opened once (a bad URL fails before the model loads)."""
    assert spec.storage is not None
    if has_password(spec.storage) and (spec.workers > 1 or spec.address is not None):
        raise SearcherError(
            "--storage: Ray records this command line where the cluster can see it; give "
            "the password with PGPASSWORD or ~/.pgpass, not in the URL"
        )
    if "://" not in spec.storage:  # a journal file given relative to where the user is
        spec = replace(spec, storage=str(Path(spec.storage).resolve()))
    close_storage(open_storage(spec.storage))
    return spec


@dataclass(frozen=True)
class Loaded:
    """What a run scores with, loaded once its directory is claimed."""

    spec: RunSpec  # the plan's, naming the latency table the run uses
    session: Session
    problem: Problem  # its budget: the plan's, absolute limits now fractions of dense
    evaluator: Evaluator  # full fidelity, on the calibration windows
    algorithm: Algorithm
    lat: latency.RunLatency | None


def _load(
    plan: Plan, previous: dict[str, Any], timings: Timings, on_phase: Callable[[str], None]
) -> Loaded:
    """The model, space, latency model and dense reference; ``previous``: the interrupted
    run's run.json ({} for a new run)."""
    spec = plan.spec
    with timings.phase("load_and_importance"):
        on_phase("loading model, scoring importance")
        session = open_session(SessionKey.of(spec, plan.full))
    identity = session.loaded.identity
    if previous and not models.same_model(identity, previous.get("model", {})):
        raise SearcherError(
            f"--resume {plan.dir.path}: that run belongs to another model "
            f"({previous.get('model', {}).get('source')}), not {identity['source']}"
        )
    space = session.space
    if previous:
        _check_same_scoring(plan.dir.path, previous, session)
    latency.refuse_untimed(space, plan.budget.metrics)
    lat: latency.RunLatency | None = None
    if plan.latency_settings is not None:
        with timings.phase("latency_setup"):
            lat = _open_latency(plan, session, previous, on_phase)
        spec = replace(spec, latency_table=str(lat.path))  # run.json names it, for a resume
    problem = problem_for(space, plan.budget, {"latency": lat.costs(space)} if lat else None)
    if lat is not None:
        lat.limit = problem.budget.limits.get("latency")
    with timings.phase("dense_reference"):
        on_phase("dense reference")
        evaluator = Evaluator(
            session.loaded.model, session.windows.calibration[: plan.full], space.apply,
            space.dense(), spec.batch_size,
        )  # fmt: skip
    algorithm = ALGORITHMS[spec.algo].configure(problem, spec.seed, plan.full, spec.to_dict())
    return Loaded(spec, session, problem, evaluator, algorithm, lat)


def _check_same_scoring(run_dir: Path, previous: dict[str, Any], session: Session) -> None:
    """Refuse to resume when the text or the space's choices differ from the run's: its
    logged scores (and what it gives the score cache) would mix two problems."""
    text = previous.get("data", {}).get("sha256")
    if text is not None and text != session.windows.spec["sha256"]:
        raise SearcherError(
            f"--resume {run_dir}: the calibration text {session.windows.spec['source']} has "
            "changed since the run started, so its scores cannot be continued; start a new run"
        )
    fingerprint = previous.get("space", {}).get("fingerprint")
    if fingerprint is not None and fingerprint != session.space.fingerprint():
        raise SearcherError(
            f"--resume {run_dir}: the {session.space.name} space built now removes other units "
            "than the run's did; start a new run"
        )


def _open_latency(
    plan: Plan, session: Session, previous: dict[str, Any], on_phase: Callable[[str], None]
) -> latency.RunLatency:
    assert plan.latency_settings is not None
    scratch = SimpleNamespace(**plan.spec.to_dict())  # it sets the table it chose on the spec
    return latency.open_run_latency(
        scratch, plan.latency_settings, session.space, session.loaded.identity, plan.dir.path,
        previous.get("latency", {}).get("table_sha256"), on_phase,
    )  # fmt: skip


@dataclass(frozen=True)
class Searched:
    engine: Engine
    info: dict[str, Any]  # run.json as the search started
    replayed_windows: int  # scores read back from an interrupted run's store
    cached_windows: int  # single-unit scores served by the score cache (other runs')
    retries: int  # evaluations repeated because a worker died


def _search(
    plan: Plan, loaded: Loaded, previous: dict[str, Any], timings: Timings,
    on_progress: Callable[[Progress], None] | None, on_phase: Callable[[str], None],
) -> Searched:  # fmt: skip
    """Record the run in run.json, then search, each score stored as it comes."""
    spec = loaded.spec
    storage = previous.get("storage") or {
        "url": redacted(spec.storage) if spec.storage else DEFAULT_FILE,  # in the run dir
        "study": plan.dir.study_name,
    }
    info = _run_info(loaded, previous, storage)
    if previous and spec.storage is None:
        # Optuna's lock of the run's own journal, left by a kill mid-write, would stall the
        # first write for its 30 s grace period; this process holds the run directory.
        plan.dir.journal_lock.unlink(missing_ok=True)
    store = TrialStore(  # first: a study of that name elsewhere is refused before run.json
        located(spec.storage or storage["url"], plan.dir.path),
        storage["study"],
        loaded.problem.n_levels,
        len(plan.objectives),
        bool(previous),
    )
    write_json(plan.dir.info, info)
    logged = store.logged()
    full, objectives = plan.full, plan.objectives
    try:
        scored = _scored(loaded, logged, store, timings, on_progress, on_phase)
        engine = scored.engine
        store.finish(
            engine.trials.values(), full,
            lambda t: [t.fitness(full), *(t.fractions[m] for m in objectives[1:])],
        )  # fmt: skip
    finally:
        store.close()
    return Searched(engine, info, scored.replayed, scored.cached, scored.retries)


@dataclass(frozen=True)
class Scored:
    engine: Engine
    replayed: int  # windows replayed from the run's own log
    cached: int  # windows served by the score cache
    retries: int  # worker retries


def score_cache(loaded: Loaded) -> ScoreCache | None:
    """The score cache of the run's model, text and space (None: disabled)."""
    root = cache_root()
    if root is None:
        return None
    session, spec = loaded.session, loaded.spec
    key = cache_key(
        session.loaded.identity, session.windows.spec, config_header(session, spec)["space"],
        {"dtype": spec.dtype, "device": spec.device, "batch_size": spec.batch_size,
         "importance_windows": session.key.importance},
    )  # fmt: skip
    return ScoreCache(root, key, loaded.problem.n_genes)


def _scored(
    loaded: Loaded, logged: dict[Candidate, Outcome], store: TrialStore, timings: Timings,
    on_progress: Callable[[Progress], None] | None, on_phase: Callable[[str], None],
) -> Scored:  # fmt: skip
    """Start the workers and search. Single-unit profile scores come from the score cache
    where other runs left them, and go into it as they are scored."""
    spec, lat = loaded.spec, loaded.lat
    shared = loaded.algorithm.shared()
    cache = score_cache(loaded) if shared else None
    cached = {c: o for c, o in cache.load().items() if c in shared} if cache else {}

    known = {c: len(o.kl) for c, o in cached.items()}  # windows the cache holds

    def record(trial: Trial) -> None:
        store.append(trial)
        c = trial.candidate
        if cache is not None and c in shared and trial.windows > known.get(c, 0):
            cache.add(trial)
            known[c] = trial.windows

    measure = lat.measure if lat is not None and spec.latency == "measured" else None
    with ExitStack() as stack:
        with timings.phase("workers_start"):
            many = spec.workers > 1 or spec.address
            on_phase("starting workers" if many else f"searching ({spec.algo})")
            scorer = stack.enter_context(scoring_pool(spec, loaded.session, loaded.evaluator))
            from_cache = ReplayPool(scorer, cached)  # with nothing given they just delegate
            # the cache holds untrained scores only: trained ones replay from the run's log
            pool = ReplayPool(from_cache, logged, store.logged_trained())
            engine = Engine(
                loaded.problem, loaded.algorithm, pool, spec.evals, record,
                on_progress or (lambda p: None), measure, STEP_COST * spec.batch_size,
            )  # fmt: skip
        with timings.phase("search"):  # without stopping the workers
            on_phase(f"searching ({spec.algo})")
            engine.run()
        return Scored(
            engine,
            pool.replayed_windows,
            from_cache.replayed_windows,
            getattr(scorer, "retries", 0),
        )


def _run_info(loaded: Loaded, previous: dict[str, Any], storage: dict[str, Any]) -> dict[str, Any]:
    """run.json as a run (or a resume) starts."""
    spec, session = loaded.spec, loaded.session
    now = dt.datetime.now().isoformat(timespec="seconds")
    header = config_header(session, spec)
    info: dict[str, Any] = {
        "spec": {**spec.to_dict(), "storage": redacted(spec.storage) if spec.storage else None},
        "storage": storage,
        "status": "running",
        "started": previous.get("started") or now,
        "resumed": [*previous.get("resumed", []), now] if previous else [],
        "versions": versions(),
        "hardware": {**hardware(spec.device, spec.threads), "workers": spec.workers},
        "model": session.loaded.identity,
        **{k: header[k] for k in ("data", "space")},
        "dense": {k: t.dense() for k, t in loaded.problem.costs.items()},
    }
    if loaded.lat is not None:
        info["latency"] = loaded.lat.info()
    return info


def _report(
    plan: Plan, loaded: Loaded, searched: Searched, timings: Timings,
    on_phase: Callable[[str], None],
) -> RunResult:  # fmt: skip
    """Validate the best candidate; write the result files and the finished run.json."""
    engine, full, info = searched.engine, plan.full, searched.info
    best = engine.best()
    if best is None:
        raise SearcherError(
            f"the search scored no candidate at full fidelity within --evals "
            f"{engine.max_windows / full:g} (a full-fidelity evaluation counts 1): raise --evals"
        )
    with timings.phase("validation"):
        on_phase("validating best")
        validation = _validation(loaded, best)
    on_phase("writing results")
    trials = sorted(engine.trials.values(), key=lambda t: t.number)
    fidelities = sorted({w for w, _ in plan.stages})
    trials_frame(trials, fidelities).to_parquet(plan.dir.trials, index=False)
    best_payload = _write_front(plan, loaded, trials, best, validation, timings, on_phase)
    if loaded.lat is not None:
        info["latency"] = loaded.lat.info()  # with the front's measurements
    seconds = timings.finish()
    info.update(
        status="complete",
        finished=dt.datetime.now().isoformat(timespec="seconds"),
        timings={k: round(v, 2) for k, v in timings.phases.items()},
        trials=len(trials),
        evals=round(engine.spent_windows / full, 3),
        jobs=engine.jobs,
        replayed_evals=round(searched.replayed_windows / full, 3),
        cached_evals=round(searched.cached_windows / full, 3),
        worker_retries=searched.retries,
        full_windows=full,
    )
    if parse_select(loaded.spec.select):
        info["selection"] = selection_summary(loaded, engine)
    write_json(plan.dir.info, info)
    return RunResult(plan.dir.path, best_payload, len(trials), engine.spent_windows / full, seconds)


def selection_summary(loaded: Loaded, engine: Engine) -> dict[str, Any]:
    """How training-aware selection went: its cost, and how often the trained ranking chose
    another winner than the untrained one would have."""
    trained = [t for t in engine.trials.values() if t.trained]
    if not trained:
        log.warning(
            "--select %s: no candidate reached the trained stage within --evals, so the best "
            "is ranked by its untrained KL; raise --evals", loaded.spec.select,
        )  # fmt: skip
    return {
        "select": loaded.spec.select,
        "trained_candidates": len(trained),
        "trained_seconds": round(sum(s.seconds for t in trained for s in t.trained.values()), 2),
        "window_evaluations_per_step": STEP_COST * loaded.spec.batch_size,
        "generations": getattr(loaded.algorithm, "generation", None),
        "winner_changed": getattr(loaded.algorithm, "flips", None),
    }


def _write_front(
    plan: Plan, loaded: Loaded, trials: list[Trial], best: Trial, validation: dict[str, Any],
    timings: Timings, on_phase: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    """pareto.json, best.json and pareto.png (with latency: the front timed on the device);
    best.json's content."""
    spec, space, full, budget = loaded.spec, loaded.session.space, plan.full, loaded.problem.budget
    metric = _front_metric(plan.objectives, budget)
    front_trials = front(trials, full, metric)
    entries = [entry(space, t, full) for t in front_trials]
    best_latency = None
    if loaded.lat is not None:
        with timings.phase("latency_remeasure"):
            best_latency = _remeasure(loaded.lat, space, best, front_trials, entries, on_phase)
    header = config_header(loaded.session, spec)
    write_json(plan.dir.pareto, {**header, "objectives": [metric, "kl"], "front": entries})
    payload = {
        **header, **entry(space, best, full), "validation": validation,
        "algorithm": spec.algo, "seed": spec.seed, "select": spec.select,
    }  # fmt: skip
    if loaded.lat is not None and best_latency is not None:
        payload["latency"] = {**best_latency, "device": loaded.lat.settings.device}
    write_json(plan.dir.best, payload)
    plot_front(
        plan.dir.plot, trials, front_trials, full, best, metric, budget.limits.get(metric),
        f"{loaded.session.loaded.identity['source']} · {space.name} · {budget.text} · {spec.algo}",
    )  # fmt: skip
    return payload


def _validation(loaded: Loaded, best: Trial) -> dict[str, Any]:
    """KL and perplexity of ``best`` on the validation windows, and the dense perplexity."""
    session, space = loaded.session, loaded.session.space
    validator = Evaluator(
        session.loaded.model, session.windows.validation, space.apply, space.dense(),
        loaded.spec.batch_size,
    )  # fmt: skip
    val = validator.score(best.candidate, 0, validator.n_windows)
    return {
        "kl": float(val.kl.mean()),
        "ppl": math.exp(float(val.nll.mean())),
        "dense_ppl": math.exp(float(validator.dense_scores.nll.mean())),
        "windows": validator.n_windows,
    }


def _front_metric(objectives: tuple[str, ...], budget: Budget) -> str:
    """The front's cost axis: the searched cost objective, else FLOPs unless the budget
    limits something else (sparsity)."""
    if len(objectives) > 1:
        return objectives[1]
    return "flops" if "flops" in budget.limits else next(iter(budget.limits))


def _remeasure(
    lat: latency.RunLatency, space: spaces.SearchSpace, best: Trial, front_trials: list[Trial],
    entries: list[dict[str, Any]], on_phase: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    """Time the front's configs on the device (into ``entries``); the best one's latency."""
    on_phase(f"measuring the front on {lat.settings.device}")
    best_latency = lat.report(space, best.candidate)
    for t, e in zip(front_trials, entries):
        e["latency"] = best_latency if t is best else lat.report(space, t.candidate)
    return best_latency


def model_source(config: dict[str, Any], model: str | None = None) -> str | None:
    """What to load for a saved config: ``model`` if given, else the config's own source
    (None = the embedded model)."""
    source = model or config["model"]["source"]
    return None if source.startswith(f"{models.EMBEDDED}:") else source


def session_of_config(
    path: str, config: dict[str, Any], model: str | None = None, device: str = "cpu",
    dtype: str | None = None, batch_size: int | None = None, trust_remote_code: bool = False,
) -> tuple[Session, tuple[int, ...]]:  # fmt: skip
    """Rebuild the session a saved config was searched in, checked, and the config's genes."""
    try:
        d, space_cfg, identity = config["data"], config["space"], config["model"]
        source = model_source(config, model)
        batch = batch_size or d.get("batch_size", 4)
        key = SessionKey(
            source, d["source"], space_cfg["name"], space_cfg["options"], d["seq_len"],
            max(d["calibration_windows"], d["importance_windows"]), d["validation_windows"],
            d["importance_windows"], batch, device, dtype or config.get("dtype", "float32"),
            trust_remote_code, text_sha256=d["sha256"],
        )  # fmt: skip
        session = open_session(key)
        genes, fingerprint = tuple(config["genes"]), space_cfg["fingerprint"]
    except KeyError as exc:
        raise SearcherError(
            f"{path} is not a complete searcher config: field {exc.args[0]!r} is missing "
            "(it may come from an older searcher; re-run the search)"
        ) from None
    except (TypeError, AttributeError):
        raise SearcherError(f"{path} is not a well-formed searcher config") from None
    if not models.same_model(session.loaded.identity, identity):
        raise SearcherError(
            f"{path} was made for model {identity['source']} (fingerprint "
            f"{identity['fingerprint']}), not for {session.loaded.identity['source']} "
            f"({session.loaded.identity['fingerprint']}): pass --model with the right model"
        )
    space = session.space
    if len(genes) != len(space.genes) or any(not 0 <= g < n for g, n in zip(genes, space.n_levels)):
        raise SearcherError(f"{path} does not fit the {space.name} space of this model")
    if space.fingerprint() != fingerprint:
        raise SearcherError(
            f"rebuilding {path} chose different units than the run did (another device, "
            "dtype or library version changes activation statistics): score it where it ran"
        )
    return session, genes


def evaluate_config(
    path: str, data_source: str | None = None, pick: int | None = None, windows: int = 8,
    model: str | None = None, device: str = "cpu", dtype: str | None = None,
    batch_size: int | None = None, trust_remote_code: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Score a saved config (best.json, or one entry of pareto.json) on any text."""
    config = read_config(path, pick)
    session, genes = session_of_config(
        path, config, model, device, dtype, batch_size, trust_remote_code
    )
    d, space = config["data"], session.space
    batch = batch_size or d.get("batch_size", 4)
    if data_source is None:
        ids, where = session.windows.validation, f"validation windows of {d['source']}"
    else:
        ids = data.eval_windows(session.loaded.tokenizer, data_source, d["seq_len"], windows)
        where = data_source
    evaluator = Evaluator(session.loaded.model, ids, space.apply, space.dense(), batch)
    scores = evaluator.score(genes, 0, evaluator.n_windows)
    return {
        "config": path,
        "data": where,
        "windows": evaluator.n_windows,
        "seq_len": d["seq_len"],
        "kl": float(scores.kl.mean()),
        "ppl": math.exp(float(scores.nll.mean())),
        "dense_ppl": math.exp(float(evaluator.dense_scores.nll.mean())),
        "fractions": {m: t.cost(genes) / t.dense() for m, t in space.cost_tables().items()},
    }


def read_config(path: str, pick: int | None) -> dict[str, Any]:
    """best.json as it is, or entry ``pick`` of pareto.json merged with its header."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SearcherError(f"cannot read config {path}: {exc}") from None
    if not isinstance(config, dict) or "space" not in config or "model" not in config:
        raise SearcherError(f"{path} is not a searcher config (best.json or pareto.json)")
    if "front" in config:
        entries = config["front"]
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise SearcherError(f"{path}: 'front' should be a list of configs")
        for i, e in enumerate(entries):
            _check_genes(e.get("genes"), f"{path} entry {i}")
        pick = 0 if pick is None else pick
        if not 0 <= pick < len(entries):
            raise SearcherError(f"--pick {pick}: {path} has {len(entries)} entries")
        return {**config, **entries[pick]}
    if pick is not None:
        raise SearcherError(f"--pick applies to pareto.json; {path} holds a single config")
    _check_genes(config.get("genes"), path)
    return config


def _check_genes(genes: Any, where: str) -> None:
    """Genes as the search wrote them: a list of level indices (whole numbers, not bools);
    whether they fit the space is checked once the space is built."""
    if genes is None:
        raise SearcherError(f"{where} has no 'genes': it is not a searcher config")
    if not isinstance(genes, list) or not all(
        isinstance(g, int) and not isinstance(g, bool) for g in genes
    ):
        raise SearcherError(
            f"{where}: 'genes' should be a list of whole-number level indices, got "
            f"{json.dumps(genes)[:80]}: restore the file from the run"
        )
