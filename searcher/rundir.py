"""One run, one directory: a run holds an exclusive lock on its directory while it works.

The lock is an ``flock`` on ``RUN_DIR/.lock``: the kernel drops it when the process ends, a
kill included, so a crashed run never leaves its directory locked. A second run (or a
second ``--resume``) on the same directory is refused at once, before it writes anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from searcher.errors import SearcherError

LOCK = ".lock"
RUN_JSON, BEST, PARETO, PLOT, TRIALS = (
    "run.json", "best.json", "pareto.json", "pareto.png", "trials.parquet"
)  # fmt: skip
SWEEP = "sweep.json"  # in a sweep's directory, above its budgets' run directories
JOURNAL = "trials.journal"  # the trials' Optuna storage unless --storage names another
# what a run writes into its directory (export refuses to write over these)
RUN_FILES = (RUN_JSON, BEST, PARETO, PLOT, TRIALS, JOURNAL, "latency.jsonl", LOCK)


@dataclass(frozen=True)
class RunDir:
    """A run's directory, and where each file the run writes lies in it."""

    path: Path

    @property
    def info(self) -> Path:
        """run.json: the settings, environment and progress of the run."""
        return self.path / RUN_JSON

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def pareto(self) -> Path:
        return self.path / PARETO

    @property
    def plot(self) -> Path:
        return self.path / PLOT

    @property
    def trials(self) -> Path:
        return self.path / TRIALS

    @property
    def journal_lock(self) -> Path:
        """Optuna's lock file of the run's own journal."""
        return self.path / f"{JOURNAL}.lock"

    @property
    def study_name(self) -> str:
        """The run's Optuna study name: its directory's, with the sweep's in front for a
        budget of a sweep (``flops0.5`` alone would collide in a shared --storage)."""
        path = self.path.resolve()
        if (path.parent / SWEEP).is_file():
            return f"{path.parent.name}/{path.name}"
        return path.name

    def read_info(self) -> dict[str, Any]:
        return json.loads(self.info.read_text(encoding="utf-8"))


@contextlib.contextmanager
def claimed(out: Path, resume: bool) -> Iterator[None]:
    """Hold ``out`` for this process; a new run needs it missing or empty.

    If the run fails before writing anything but the lock, the directory is left as it was
    found (removed again when this call made it).
    """
    if out.exists() and not out.is_dir():
        raise SearcherError(f"--out {out} exists and is not a directory: pick another")
    _refuse_unless_empty(out, resume)  # before the lock file, so a refusal writes nothing
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise SearcherError(f"--out {out}: cannot write there ({exc.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another"
            raise SearcherError(
                f"{out} is in use by searcher process {owner}: wait for it to end, or pick "
                "another --out"
            ) from None
        _refuse_unless_empty(out, resume)  # again: a run may have finished meanwhile
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        except BaseException:
            if not _contents(out):  # nothing of this run was written: leave no trace
                (out / LOCK).unlink(missing_ok=True)
                if made:
                    with contextlib.suppress(OSError):
                        out.rmdir()
            raise
    finally:
        os.close(fd)  # releases the lock


def _contents(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if p.name != LOCK] if out.is_dir() else []


def _refuse_unless_empty(out: Path, resume: bool) -> None:
    if not resume and _contents(out):
        raise SearcherError(
            f"--out {out} exists and is not an empty directory: pick another (or continue "
            f"its run with `searcher run --resume {out}`)"
        )


def refuse_overwrite(target: Path, run_dir: Path | None, protected: list[Path]) -> None:
    """Refuse to write ``target`` over a run's own files, or into a model directory (or
    file) that the run or config depends on."""
    target = target.resolve()
    for path in protected:
        path = path.resolve()
        if target == path or path in target.parents:
            raise SearcherError(
                f"--out {target} would write into {path}, which this config depends on: pick "
                "another --out"
            )
    if run_dir is not None:
        run_dir = run_dir.resolve()
        if target == run_dir or (target.parent == run_dir and target.name in RUN_FILES):
            raise SearcherError(
                f"--out {target} would overwrite the run in {run_dir}: pick another --out"
            )
