"""Scoring on a pool of Ray actors, each with the model, windows and dense reference resident.

A candidate travels as its gene vector; the calibration tokens and the dense reference go
through the object store once. A worker rebuilds the driver's space from the same model and
tokens and must reach the same space fingerprint, or it refuses to score.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray
import torch

from searcher.errors import SearcherError
from searcher.fitness import DenseReference, Evaluator
from searcher.pool import Job, Outcome, Pool, run_job

if TYPE_CHECKING:
    from searcher.run import SessionKey
    from searcher.trained_selection import TrainedScorer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSetup:
    """How a worker rebuilds the driver's scoring state: the driver's session (from its key;
    the windows are shipped, not cut again) and what of it to score."""

    session: SessionKey
    scored_windows: int  # the first calibration windows
    fingerprint: str  # of the driver's space: the worker's must be the same
    threads: int = 1
    env: dict[str, str] = field(default_factory=dict)
    trained_seed: int | None = None  # training-aware selection's seed (None: not asked)


class ScoringWorker:
    """One worker's resident state; Ray runs it as an actor."""

    def __init__(self, setup: WorkerSetup) -> None:
        self.setup = setup
        self.evaluator: Evaluator | None = None
        self.trained: TrainedScorer | None = None

    @ray.method(max_task_retries=-1)  # sent to a restarting worker: wait for it to be back
    def load(self, shared: list[Any]) -> int:
        """Load the model and build the space (once; again after a restart)."""
        import spaces
        from searcher import models

        # (windows, reference) as object refs, fetched here: a restarted worker fetches them
        # again from the object store, where the driver keeps them
        if self.evaluator is not None:
            return os.getpid()
        setup, key = self.setup, self.setup.session
        windows, reference = ray.get(shared)
        torch.set_num_threads(setup.threads)
        device = "cuda" if key.device.startswith("cuda") else key.device  # Ray picks the GPU
        loaded = models.load(key.model, device, key.dtype, key.trust_remote_code)
        structure = spaces.Structure.of(loaded.model)
        space = spaces.build(
            key.space, structure, key.seq_len, windows[: key.importance].to(device),
            key.batch_size, key.space_options,
        )  # fmt: skip
        if space.fingerprint() != setup.fingerprint:
            raise SearcherError(
                f"worker on {os.uname().nodename} built a different {key.space} space than the "
                "driver (other model files, library versions or hardware): give every node "
                "the same model and environment"
            )
        self.evaluator = Evaluator(
            loaded.model, windows[: setup.scored_windows], space.apply, space.dense(),
            key.batch_size, reference=reference,
        )  # fmt: skip
        if setup.trained_seed is not None:
            from searcher.trained_selection import scorer_for

            self.trained = scorer_for(
                key, space, self.evaluator, loaded.tokenizer, setup.trained_seed
            )
        return os.getpid()

    def score(self, job: Job, shared: list[Any]) -> Outcome:
        if self.evaluator is None:  # restarted by Ray since its last load()
            self.load(shared)
        assert self.evaluator is not None
        return run_job(self.evaluator, self.trained, job)


class RayPool(Pool):
    """Scores jobs on ``workers`` Ray actors; Ray must be initialised (see ``cluster``).

    Each worker has up to ``depth`` calls queued so it never waits for the driver. A worker
    that dies mid-evaluation costs only that evaluation: its jobs go back to the queue for the
    other workers, Ray restarts it (up to ``restarts`` times) and it rejoins once loaded.
    """

    def __init__(
        self,
        setup: WorkerSetup,
        windows: torch.Tensor,
        reference: DenseReference,
        workers: int,
        depth: int = 2,
        restarts: int = 3,
        attempts: int = 3,
    ) -> None:
        self.depth, self.attempts = depth, attempts
        self.retries = 0
        self.reviving: dict[Any, int] = {}  # load() call on a restarting worker -> worker
        self.revive_timeout = 600.0
        gpus = 1 if setup.session.device.startswith("cuda") else 0
        env = {
            "OMP_NUM_THREADS": str(setup.threads),
            "MKL_NUM_THREADS": str(setup.threads),
            "TOKENIZERS_PARALLELISM": "false",
            **setup.env,
        }
        _check_resources(workers, setup.threads, gpus)
        actor = ray.remote(ScoringWorker).options(
            num_cpus=setup.threads,
            num_gpus=gpus,
            max_restarts=restarts,
            runtime_env={"env_vars": env},
        )
        self.shared = [ray.put(windows.cpu()), ray.put(reference)]  # owned here, for restarts
        self.actors = [actor.remote(setup) for _ in range(workers)]
        try:
            self.pids = ray.get([a.load.remote(self.shared) for a in self.actors])
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            self.close()
            raise SearcherError(f"a worker could not start: {_cause(exc)}") from None
        self.live = list(range(workers))

    def run(
        self, jobs: list[Job], on_outcome: Callable[[int, Outcome], None] | None = None
    ) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(jobs)
        queue = deque(range(len(jobs)))
        tries = [0] * len(jobs)
        calls: dict[Any, tuple[int, int]] = {}  # future -> (job, worker)
        load = dict.fromkeys(range(len(self.actors)), 0)
        self._poll_reviving(0)
        while queue or calls:
            # breadth first: every free worker gets a job before any gets a second one
            for level in range(self.depth):
                for w in self.live:
                    if queue and load[w] <= level:
                        i = queue.popleft()
                        job = jobs[i]
                        call = self.actors[w].score.remote(job, self.shared)
                        calls[call], load[w] = (i, w), load[w] + 1
            if not calls:  # every worker is restarting
                if not self._await_worker():
                    raise SearcherError(
                        "every worker has died and none came back; see the log for why"
                    )
                continue
            done, _ = ray.wait([*calls, *self.reviving], num_returns=1)
            for ref in done:
                if ref in self.reviving:
                    self._revived(ref, self.reviving.pop(ref))
                    continue
                i, w = calls.pop(ref)
                load[w] -= 1
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # scoring itself failed: no retry
                    raise SearcherError(
                        f"scoring candidate {list(jobs[i].candidate)} failed on worker {w}: "
                        f"{_cause(exc)}"
                    ) from None
                except ray.exceptions.RayActorError as exc:
                    tries[i] += 1
                    self.retries += 1
                    log.warning(
                        "worker %d died while scoring candidate %s (windows %d-%d): %s; "
                        "retrying it on another worker", w, list(jobs[i].candidate),
                        jobs[i].start, jobs[i].stop, _cause(exc),
                    )  # fmt: skip
                    if tries[i] >= self.attempts:
                        raise SearcherError(
                            f"candidate {list(jobs[i].candidate)} killed {tries[i]} workers; "
                            "it may not fit in memory: lower --batch-size"
                        ) from None
                    queue.appendleft(i)
                    if w in self.live:
                        self.live.remove(w)
                        self.reviving[self.actors[w].load.remote(self.shared)] = w
                    continue
                if on_outcome is not None:
                    on_outcome(i, results[i])
        return results  # type: ignore[return-value]

    def _poll_reviving(self, timeout: float) -> None:
        """Let restarted workers that have reloaded by now rejoin (the rest keep loading)."""
        if self.reviving:
            ready, _ = ray.wait(list(self.reviving), num_returns=len(self.reviving),
                                timeout=timeout)  # fmt: skip
            for ref in ready:
                self._revived(ref, self.reviving.pop(ref))

    def _await_worker(self) -> bool:
        """Wait for a restarting worker to rejoin; False if none does within the timeout."""
        while self.reviving:
            ready, _ = ray.wait(list(self.reviving), num_returns=1, timeout=self.revive_timeout)
            if not ready:
                return False
            for ref in ready:
                self._revived(ref, self.reviving.pop(ref))
            if self.live:
                return True
        return bool(self.live)

    def _revived(self, ref: Any, w: int) -> None:
        try:
            ray.get(ref)
        except ray.exceptions.RayError as exc:
            log.warning("worker %d did not come back: %s", w, _cause(exc))
            return
        log.warning("worker %d is back", w)
        self.live.append(w)

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []


def _check_resources(workers: int, threads: int, gpus: int) -> None:
    """Refuse a pool the cluster can never place (Ray would wait for it forever)."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not nodes:
        return
    cpus = sum(int(n.get("CPU", 0)) // threads for n in nodes)  # workers that fit, by CPUs
    if gpus:
        cpus = min(cpus, sum(int(n.get("GPU", 0)) for n in nodes))
    if cpus < workers:
        have = sum(n.get("CPU", 0) for n in nodes), sum(n.get("GPU", 0) for n in nodes)
        raise SearcherError(
            f"--workers {workers} x --threads {threads}"
            + (" with one GPU each" if gpus else "")
            + f" does not fit the Ray cluster ({have[0]:g} CPUs, {have[1]:g} GPUs, "
            f"{len(nodes)} node(s)): lower --workers or --threads"
        )


def _cause(exc: BaseException) -> str:
    """The first line of what went wrong in the worker, without Ray's traceback."""
    text = str(getattr(exc, "cause", None) or exc).strip()
    for line in text.splitlines():
        if "SearcherError:" in line:
            return line.split("SearcherError:", 1)[1].strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(exc).__name__
