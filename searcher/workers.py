"""Scoring on a pool of Ray actors, each with the model, windows and dense reference resident.

A candidate travels as its gene vector; the calibration tokens and the dense reference go
through the object store once. A worker rebuilds the driver's space from the same model and
tokens and must reach the same space fingerprint, or it refuses to score.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from searcher.errors import SearcherError
from searcher.fitness import DenseReference, Evaluator
from searcher.pool import Job, Outcome, Pool
from searcher.problem import Candidate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSetup:
    """How a worker rebuilds the driver's scoring state (everything but the shipped data)."""

    model: str | None
    device: str
    dtype: str
    trust_remote_code: bool
    space: str
    space_options: dict[str, Any]
    seq_len: int
    batch_size: int
    importance_windows: int
    scored_windows: int  # the first windows are scored; all of them feed the importance pass
    fingerprint: str
    threads: int = 1
    env: dict[str, str] = field(default_factory=dict)


class ScoringWorker:
    """One worker's resident state; Ray runs it as an actor."""

    def __init__(self, setup: WorkerSetup) -> None:
        self.setup = setup
        self.evaluator: Evaluator | None = None

    @ray.method(max_task_retries=-1)  # sent to a restarting worker: wait for it to be back
    def load(self, shared: list[Any]) -> int:
        """Load the model and build the space (once; again after a restart)."""
        import spaces
        from searcher import models

        # (windows, reference) as object refs, fetched here: a restarted worker fetches them
        # again from the object store, where the driver keeps them
        if self.evaluator is not None:
            return os.getpid()
        setup = self.setup
        windows, reference = ray.get(shared)
        torch.set_num_threads(setup.threads)
        device = "cuda" if setup.device.startswith("cuda") else setup.device  # Ray picks the GPU
        loaded = models.load(setup.model, device, setup.dtype, setup.trust_remote_code)
        structure = spaces.Structure.of(loaded.model)
        space = spaces.build(
            setup.space, structure, setup.seq_len, windows[: setup.importance_windows].to(device),
            setup.batch_size, setup.space_options,
        )  # fmt: skip
        if space.fingerprint() != setup.fingerprint:
            raise SearcherError(
                f"worker on {os.uname().nodename} built a different {setup.space} space than the "
                "driver (other model files, library versions or hardware): give every node "
                "the same model and environment"
            )
        self.evaluator = Evaluator(
            loaded.model, windows[: setup.scored_windows], space.apply, space.dense(),
            setup.batch_size, reference=reference,
        )  # fmt: skip
        return os.getpid()

    def score(self, candidate: Candidate, start: int, stop: int) -> Outcome:
        t0 = time.perf_counter()
        assert self.evaluator is not None, "load() first"
        s = self.evaluator.score(candidate, start, stop)
        return Outcome(s.kl, s.nll, time.perf_counter() - t0)


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
        gpus = 1 if setup.device.startswith("cuda") else 0
        env = {
            "OMP_NUM_THREADS": str(setup.threads),
            "MKL_NUM_THREADS": str(setup.threads),
            "TOKENIZERS_PARALLELISM": "false",
            **setup.env,
        }
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

    def run(self, jobs: list[Job]) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(jobs)
        queue = deque(range(len(jobs)))
        tries = [0] * len(jobs)
        calls: dict[Any, tuple[int, int]] = {}  # future -> (job, worker)
        reviving: dict[Any, int] = {}  # load() future of a restarting worker -> worker
        load = dict.fromkeys(range(len(self.actors)), 0)
        while queue or calls:
            # breadth first: every free worker gets a job before any gets a second one
            for level in range(self.depth):
                for w in self.live:
                    if queue and load[w] <= level:
                        i = queue.popleft()
                        job = jobs[i]
                        call = self.actors[w].score.remote(job.candidate, job.start, job.stop)
                        calls[call], load[w] = (i, w), load[w] + 1
            if not calls and not reviving:
                raise SearcherError("every worker has died; see the log for why")
            done, _ = ray.wait([*calls, *reviving], num_returns=1)
            for ref in done:
                if ref in reviving:
                    self._revived(ref, reviving.pop(ref))
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
                        reviving[self.actors[w].load.remote(self.shared)] = w
        for ref, w in reviving.items():  # rejoin before the next batch
            self._revived(ref, w)
        return results  # type: ignore[return-value]

    def _revived(self, ref: Any, w: int) -> None:
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            log.warning("worker %d did not come back: %s", w, _cause(exc))
            return
        log.warning("worker %d is back", w)
        self.live.append(w)

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []


def _cause(exc: BaseException) -> str:
    """The first line of what went wrong in the worker, without Ray's traceback."""
    text = str(getattr(exc, "cause", None) or exc).strip()
    for line in text.splitlines():
        if "SearcherError:" in line:
            return line.split("SearcherError:", 1)[1].strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(exc).__name__
