"""Every scored candidate goes to disk the moment its score is known (JSON lines)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from searcher.engine import Trial


class TrialLog:
    """Append-only log; each line is a trial's full state after one evaluation.

    A crash or kill loses at most the evaluation that was running: each line is flushed and
    fsynced. The last line of a trial number is its latest state.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("a", encoding="utf-8")

    def append(self, trial: Trial) -> None:
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
