"""Every scored candidate goes to disk the moment its score is known (JSON lines)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from searcher.engine import Trial
from searcher.pool import Outcome
from searcher.problem import Candidate


class TrialLog:
    """Append-only log; each line is a trial's full state after one evaluation.

    A crash or kill loses at most the evaluation that was running: each line is flushed and
    fsynced. The last line of a candidate is its latest state.
    """

    def __init__(self, path: Path, logged: dict[Candidate, Outcome] | None = None) -> None:
        self.path = path
        self._logged = {c: len(o.kl) for c, o in (logged or {}).items()}
        self._file = path.open("a", encoding="utf-8")

    def append(self, trial: Trial) -> None:
        if self._logged.get(trial.candidate, 0) >= trial.windows:
            return  # replayed from this very log on resume: already on disk
        line = {
            "number": trial.number,
            "genes": list(trial.candidate),
            "origin": trial.origin,
            "kl": trial.kl,
            "nll": trial.nll,
            "seconds": round(trial.seconds, 4),
        }
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def read_log(path: Path) -> dict[Candidate, Outcome]:
    """The latest logged state of every candidate; a line cut short by a kill is skipped."""
    logged: dict[Candidate, Outcome] = {}
    if not path.is_file():
        return logged
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            candidate = tuple(int(g) for g in row["genes"])
            outcome = Outcome(
                np.asarray(row["kl"], dtype=float), np.asarray(row["nll"], dtype=float),
                float(row["seconds"]),
            )  # fmt: skip
        except (ValueError, KeyError, TypeError):
            continue
        if candidate not in logged or len(outcome.kl) >= len(logged[candidate].kl):
            logged[candidate] = outcome
    return logged
