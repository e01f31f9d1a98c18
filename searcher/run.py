"""A whole search run, and scoring a saved config: the functions behind the CLI."""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import spaces
from latency_models.backends import cpu_name
from latency_models.table import CostTable
from searcher import data, latency, models
from searcher.algorithms import ALGORITHMS, SEEDS, parse_stages
from searcher.budget import Budget
from searcher.engine import Engine, Progress, Trial
from searcher.errors import SearcherError
from searcher.fitness import Evaluator
from searcher.pool import LocalPool, Pool, ReplayPool
from searcher.problem import Problem
from searcher.results import front, plot_front, trials_frame, write_json
from searcher.rundir import claimed
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


@dataclass
class Session:
    """A loaded model with its calibration windows and a space built over it."""

    loaded: models.LoadedModel
    windows: data.Windows
    space: spaces.SearchSpace
    importance_windows: int


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


def open_session(
    model: str | None, data_source: str | None, space: str, space_options: dict[str, Any],
    seq_len: int, calibration: int, validation: int, importance: int,
    batch_size: int, device: str, dtype: str, trust_remote_code: bool,
    text_sha256: str | None = None,
) -> Session:  # fmt: skip
    """Load the model, cut the windows and build the space: shared by run and eval.

    Everything cheap is checked before the model loads, so bad input fails fast.
    """
    spaces.check_options(space, space_options)
    text = data.read_text(data_source)
    if text_sha256 is not None and data.text_sha256(text[0]) != text_sha256:
        raise SearcherError(
            f"the calibration text {text[1]} has changed since the run, so the neurons, heads "
            "or masks the run chose cannot be rebuilt from it"
        )
    loaded = models.load(model, device, dtype, trust_remote_code)
    structure = spaces.Structure.of(loaded.model)
    win = data.windows(loaded.tokenizer, text, seq_len, calibration, validation)
    built = spaces.build(
        space, structure, seq_len, win.calibration[:importance], batch_size, space_options
    )
    return Session(loaded, win, built, importance)


def session_for(spec: RunSpec, full: int) -> Session:
    """The session a search of ``spec`` (resolved) scores in; ``full`` windows per evaluation."""
    return open_session(
        spec.model, spec.data, spec.space, spec.space_options, spec.seq_len,
        max(full, spec.importance_windows), spec.validation_windows, spec.importance_windows,
        spec.batch_size, spec.device, spec.dtype, spec.trust_remote_code,
    )  # fmt: skip


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
            "importance_windows": session.importance_windows,
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
        "calibration": {"kl": trial.fitness(full), "windows": full},
        "trial": trial.number,
    }


@contextmanager
def scoring_pool(spec: RunSpec, session: Session, evaluator: Evaluator) -> Iterator[Pool]:
    """In this process for one local worker, else a Ray actor pool (local or on a cluster)."""
    if spec.workers == 1 and spec.address is None:  # ("local": a Ray instance all the same)
        yield LocalPool(evaluator)
        return
    from searcher import cluster
    from searcher.workers import RayPool, WorkerSetup

    model = spec.model
    if model is not None and Path(model).exists():
        model = str(Path(model).resolve())  # workers need not share the driver's cwd
    setup = WorkerSetup(
        model=model, device=spec.device, dtype=spec.dtype,
        trust_remote_code=spec.trust_remote_code, space=spec.space,
        space_options=spec.space_options, seq_len=spec.seq_len, batch_size=spec.batch_size,
        importance_windows=session.importance_windows, scored_windows=evaluator.n_windows,
        fingerprint=session.space.fingerprint(), threads=spec.threads,
    )  # fmt: skip
    gpus = torch.cuda.device_count() if spec.device.startswith("cuda") else 0
    with cluster.connected(spec.address, spec.workers * spec.threads, gpus):
        pool = RayPool(setup, session.windows.calibration, evaluator.reference(), spec.workers)
        try:
            yield pool
        finally:
            pool.close()


def _default_out(spec: RunSpec) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("results") / f"{spec.space}-{Budget.parse(spec.budget).slug()}-{spec.algo}-{stamp}"


def resume(
    run_dir: str,
    on_progress: Callable[[Progress], None] | None = None,
    on_phase: Callable[[str], None] = lambda text: None,
    **placement: Any,
) -> RunResult:
    """Continue an interrupted run (killed, or stopped with Ctrl-C) from its directory.

    ``placement`` may change threads, workers and address: where evaluations run, not what
    they return.
    """
    info = Path(run_dir) / "run.json"
    try:
        values = json.loads(info.read_text(encoding="utf-8"))["spec"]
    except (OSError, ValueError, KeyError, TypeError):
        raise SearcherError(
            f"--resume {run_dir}: no readable run.json there; pass a run directory that "
            "`searcher run` made"
        ) from None
    spec = RunSpec.from_dict(values)
    spec.out = str(Path(run_dir))
    for key, value in placement.items():
        setattr(spec, key, value)
    if "workers" in placement and "threads" not in placement:
        spec.threads = None  # re-derive threads per worker from the new worker count
    return run(spec, on_progress, on_phase, resume=True)


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
    t_start = time.perf_counter()
    spec = spec.resolved()
    budget = Budget.parse(spec.budget)
    if spec.algo not in ALGORITHMS:
        raise SearcherError(f"unknown --algo {spec.algo!r}: choose one of {', '.join(ALGORITHMS)}")
    if spec.init not in SEEDS:
        raise SearcherError(f"unknown --init {spec.init!r}: choose one of {', '.join(SEEDS)}")
    if spec.init != "uniform" and spec.algo != "evo":
        raise SearcherError(f"--init {spec.init} sets where evo starts: use it with --algo evo")
    if spec.objectives != "kl" and not ALGORITHMS[spec.algo].multi_objective:
        multi = ", ".join(n for n, a in ALGORITHMS.items() if a.multi_objective)
        raise SearcherError(f"--objectives {spec.objectives} needs one of --algo {multi}")
    stages = parse_stages(spec.stages)
    ALGORITHMS[spec.algo].check_settings(spec.to_dict())
    objectives = spec.objectives.split(",")
    timed = latency.wanted(spec, budget.metrics, objectives)
    latency_settings = latency.run_settings(spec) if timed else None  # checked before loading
    if spec.address is not None:
        from searcher.cluster import check_address

        check_address(spec.address)  # an unreachable cluster fails before the model loads
    torch.set_num_threads(spec.threads)
    out = Path(spec.out) if spec.out else _default_out(spec)
    if spec.storage is not None and not resume:
        if has_password(spec.storage) and (spec.workers > 1 or spec.address is not None):
            raise SearcherError(
                "--storage: Ray records this command line where the cluster can see it; give "
                "the password with PGPASSWORD or ~/.pgpass, not in the URL"
            )
        if "://" not in spec.storage:  # a journal file given relative to where the user is
            spec.storage = str(Path(spec.storage).resolve())
        close_storage(open_storage(spec.storage))  # a bad URL fails before the model loads

    with claimed(out, resume):  # one run per directory: a second one is refused here
        previous = json.loads((out / "run.json").read_text(encoding="utf-8")) if resume else {}
        return _search(
            spec, out, previous, budget, stages, objectives, latency_settings, t_start,
            on_progress, on_phase,
        )  # fmt: skip


def _search(
    spec: RunSpec, out: Path, previous: dict[str, Any], budget: Budget,
    stages: tuple[tuple[int, int], ...], objectives: list[str],
    latency_settings: latency.LatencySettings | None, t_start: float,
    on_progress: Callable[[Progress], None] | None, on_phase: Callable[[str], None],
) -> RunResult:  # fmt: skip
    """The search of ``run``, in the directory it has claimed."""
    resume = bool(previous)
    full = stages[-1][0]
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    on_phase("loading model, scoring importance")
    session = session_for(spec, full)
    timings["load_and_importance"] = time.perf_counter() - t0
    if resume and not models.same_model(session.loaded.identity, previous.get("model", {})):
        raise SearcherError(
            f"--resume {out}: that run belongs to another model "
            f"({previous.get('model', {}).get('source')}), not {session.loaded.identity['source']}"
        )
    space = session.space
    latency.refuse_untimed(space, budget.metrics)
    lat: latency.RunLatency | None = None
    if latency_settings is not None:
        t0 = time.perf_counter()
        lat = latency.open_run_latency(
            spec, latency_settings, space, session.loaded.identity, out,
            previous.get("latency", {}).get("table_sha256"), on_phase,
        )  # fmt: skip
        timings["latency_setup"] = time.perf_counter() - t0
    problem = problem_for(space, budget, {"latency": lat.costs(space)} if lat else None)
    budget = problem.budget  # absolute limits (latency_ms) now fractions of dense
    if lat is not None:
        lat.limit = budget.limits.get("latency")

    t0 = time.perf_counter()
    on_phase("dense reference")
    evaluator = Evaluator(
        session.loaded.model, session.windows.calibration[:full], space.apply, space.dense(),
        spec.batch_size,
    )  # fmt: skip
    timings["dense_reference"] = time.perf_counter() - t0

    algorithm = ALGORITHMS[spec.algo].configure(problem, spec.seed, full, spec.to_dict())

    header = config_header(session, spec)
    storage = previous.get("storage") or {
        "url": redacted(spec.storage) if spec.storage else DEFAULT_FILE,  # in the run dir
        "study": out.resolve().name,
    }
    run_info: dict[str, Any] = {
        "spec": {**spec.to_dict(), "storage": redacted(spec.storage) if spec.storage else None},
        "storage": storage,
        "status": "running",
        "started": previous.get("started") or dt.datetime.now().isoformat(timespec="seconds"),
        "resumed": [*previous.get("resumed", []), dt.datetime.now().isoformat(timespec="seconds")]
        if resume
        else [],
        "versions": versions(),
        "hardware": {**hardware(spec.device, spec.threads), "workers": spec.workers},
        "model": session.loaded.identity,
        "data": header["data"],
        "dense": {k: t.dense() for k, t in problem.costs.items()},
    }
    if lat is not None:
        run_info["latency"] = lat.info()
    if resume and spec.storage is None:
        # Optuna's lock of the run's own journal, left by a kill mid-write, would stall the
        # first write for its 30 s grace period; this process holds the run directory.
        (out / f"{DEFAULT_FILE}.lock").unlink(missing_ok=True)
    store = TrialStore(  # first: a study of that name elsewhere is refused before run.json
        located(spec.storage or storage["url"], out),
        storage["study"],
        problem.n_levels,
        len(objectives),
        resume,
    )
    write_json(out / "run.json", run_info)
    logged = store.logged()
    t0 = time.perf_counter()
    on_phase("starting workers" if spec.workers > 1 or spec.address else f"searching ({spec.algo})")
    try:
        with scoring_pool(spec, session, evaluator) as scorer:
            pool = ReplayPool(scorer, logged)  # with nothing logged it just delegates
            engine = Engine(
                problem, algorithm, pool, spec.evals, store.append, on_progress or (lambda p: None),
                lat.measure if lat is not None and spec.latency == "measured" else None,
            )  # fmt: skip
            timings["workers_start"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            on_phase(f"searching ({spec.algo})")
            engine.run()
            timings["search"] = time.perf_counter() - t0  # without stopping the workers
            retries = getattr(scorer, "retries", 0)
        store.finish(
            engine.trials.values(), full,
            lambda t: [t.fitness(full), *(t.fractions[m] for m in objectives[1:])],
        )  # fmt: skip
    finally:
        store.close()
    best = engine.best()
    if best is None:
        raise SearcherError("the search scored no candidate at full fidelity: raise --evals")

    t0 = time.perf_counter()
    on_phase("validating best")
    validator = Evaluator(
        session.loaded.model, session.windows.validation, space.apply, space.dense(),
        spec.batch_size,
    )  # fmt: skip
    val = validator.score(best.candidate, 0, validator.n_windows)
    timings["validation"] = time.perf_counter() - t0

    on_phase("writing results")
    trials = sorted(engine.trials.values(), key=lambda t: t.number)
    fidelities = sorted({w for w, _ in stages})
    trials_frame(trials, fidelities).to_parquet(out / "trials.parquet", index=False)
    # the front's cost axis: the searched cost objective, else FLOPs unless the budget limits
    # something else (sparsity)
    if len(objectives) > 1:
        metric = objectives[1]
    else:
        metric = "flops" if "flops" in budget.limits else next(iter(budget.limits))
    front_trials = front(trials, full, metric)
    entries = [entry(space, t, full) for t in front_trials]
    best_latency = None
    if lat is not None:  # the chosen configs, timed on the device
        t0 = time.perf_counter()
        on_phase(f"measuring the front on {lat.settings.device}")
        best_latency = lat.report(space, best.candidate)
        for t, e in zip(front_trials, entries):
            e["latency"] = best_latency if t is best else lat.report(space, t.candidate)
        timings["latency_remeasure"] = time.perf_counter() - t0
        run_info["latency"] = lat.info()
    write_json(out / "pareto.json", {**header, "objectives": [metric, "kl"], "front": entries})
    best_payload = {
        **header,
        **entry(space, best, full),
        "validation": {
            "kl": float(val.kl.mean()),
            "ppl": math.exp(float(val.nll.mean())),
            "dense_ppl": math.exp(float(validator.dense_scores.nll.mean())),
            "windows": validator.n_windows,
        },
        "algorithm": spec.algo,
        "seed": spec.seed,
    }
    if best_latency is not None:
        best_payload["latency"] = {**best_latency, "device": lat.settings.device}
    write_json(out / "best.json", best_payload)
    plot_front(
        out / "pareto.png", trials, front_trials, full, best, metric, budget.limits.get(metric),
        f"{session.loaded.identity['source']} · {space.name} · {budget.text} · {spec.algo}",
    )  # fmt: skip
    seconds = time.perf_counter() - t_start
    timings["total"] = seconds
    run_info.update(
        status="complete",
        finished=dt.datetime.now().isoformat(timespec="seconds"),
        timings={k: round(v, 2) for k, v in timings.items()},
        trials=len(trials),
        evals=round(engine.spent_windows / full, 3),
        jobs=engine.jobs,
        replayed_evals=round(pool.replayed_windows / full, 3),
        worker_retries=retries,
        full_windows=full,
    )
    write_json(out / "run.json", run_info)
    return RunResult(out, best_payload, len(trials), engine.spent_windows / full, seconds)


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
        session = open_session(
            source, d["source"], space_cfg["name"], space_cfg["options"], d["seq_len"],
            max(d["calibration_windows"], d["importance_windows"]), d["validation_windows"],
            d["importance_windows"], batch, device, dtype or config.get("dtype", "float32"),
            trust_remote_code, text_sha256=d["sha256"],
        )  # fmt: skip
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
