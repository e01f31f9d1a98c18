"""Every scored candidate goes to an Optuna storage the moment its score is known.

One Optuna trial per candidate: its genes are the params, its per-window scores a user
attribute, and its mean KL after each fidelity step an intermediate value. While the search
runs, trials are RUNNING; when it ends, candidates scored at full fidelity become COMPLETE
with their objective values and the ones the multi-fidelity selection dropped become PRUNED,
so optuna-dashboard shows the search as Optuna users know it.

The default storage is an Optuna journal file in the run directory: each write is one fsynced
append (1-2 ms for a new trial of 60 genes, measured), where Optuna's SQLite storage takes
20-45 ms, which would be felt between fast evaluations. ``--storage`` takes a database URL
(PostgreSQL, MySQL, SQLite) for runs that many people or machines read.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import optuna
from optuna.distributions import IntDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from searcher.engine import Trial
from searcher.errors import SearcherError
from searcher.pool import Outcome
from searcher.problem import Candidate

log = logging.getLogger(__name__)

DEFAULT_FILE = "trials.journal"
DATABASES = ("sqlite", "postgresql", "mysql")


def located(url: str, run_dir: Path) -> str:
    """A journal path relative to the run directory (the default ``trials.journal``, so a
    moved run directory still resumes) made absolute; URLs and absolute paths as they are."""
    if "://" in url or Path(url).is_absolute():
        return url
    return str((run_dir / url).resolve())


def has_password(url: str) -> bool:
    parts = urlsplit(url)
    return parts.password is not None or "password=" in parts.query.lower()


def redacted(url: str) -> str:
    """The URL without its password (run.json keeps no secrets; use PGPASSWORD or .pgpass)."""
    if not has_password(url):
        return url
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]  # host[:port] exactly as given
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    query = "&".join(
        p for p in parts.query.split("&") if p and not p.lower().startswith("password=")
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """A database URL (RDB storage, tables created) or a journal file path; else one line."""
    scheme = urlsplit(url).scheme.split("+")[0]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if "://" not in url:
        path = Path(url)
        if not path.parent.is_dir():
            raise SearcherError(f"trial journal {url}: directory {path.parent} does not exist")
        if path.exists() and not path.is_file():  # /dev/full, a FIFO, a directory ...
            raise SearcherError(
                f"trial journal {url}: not a regular file; give a file path, or a database "
                "URL such as sqlite:///PATH.db"
            )
        set_aside_torn_record(path)
        try:
            storage = JournalStorage(JournalFileBackend(str(path)))
            storage.get_all_studies()  # reads the file: a non-journal file fails here
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SearcherError(
                f"trial journal {url}: not a writable Optuna journal file "
                f"({type(exc).__name__}); for a database give a URL such as sqlite:///PATH.db"
            ) from None
        return storage
    if scheme not in DATABASES:
        raise SearcherError(
            f"--storage {redacted(url)!r}: expected a database URL such as "
            "postgresql://USER@HOST:PORT/DB or sqlite:///PATH.db, or a journal file path"
        )
    engine: dict = {"connect_args": {"connect_timeout": 10}} if scheme == "postgresql" else {}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except Exception as exc:  # sqlalchemy/driver errors have no common base worth naming
        reason = " ".join(str(exc).split())[:200]
        hint = ""
        if scheme == "postgresql" and not has_password(url):
            hint = " (passwords are never kept in run.json: set PGPASSWORD or ~/.pgpass)"
        raise SearcherError(f"--storage {redacted(url)}: cannot open it: {reason}{hint}") from None


def set_aside_torn_record(path: Path) -> Path | None:
    """A journal whose last record was cut short (a crash in the middle of an append) is
    cut back to its last complete record; the torn bytes are kept in a side file
    ``JOURNAL.torn-OFFSET``, whose path is returned. Every complete record is kept.

    Each record is one line of JSON written by one append, so a record is complete when its
    newline is written; the bytes after the last newline are torn. A file that does not look
    like a journal (a database given by mistake) is never touched.
    """
    if not path.is_file():
        return None
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1  # 0 when no record is complete
    if cut == len(data) or not _is_journal(data[:cut], data[cut:]):
        return None
    side = path.with_name(f"{path.name}.torn-{cut}")
    with side.open("wb") as f:  # kept before the journal is cut, so no byte is ever lost
        f.write(data[cut:])
        f.flush()
        os.fsync(f.fileno())
    os.truncate(path, cut)
    log.warning(
        "%s: its last record was cut short (a crash while writing it); its %d bytes are set "
        "aside in %s and the run goes on from the %d complete records",
        path, len(data) - cut, side.name, data.count(b"\n", 0, cut),
    )  # fmt: skip
    return side


def _is_journal(complete: bytes, torn: bytes) -> bool:
    """Complete records of an Optuna journal, then the start of one more."""
    start = b'{"op_code":'
    if not (torn.startswith(start) or start.startswith(torn)):
        return False
    lines = complete.splitlines()
    for line in lines[:1] + lines[-1:]:  # the first and the last say enough
        try:
            record = json.loads(line)
        except ValueError:
            return False
        if not isinstance(record, dict) or "op_code" not in record:
            return False
    return True


def close_storage(storage: optuna.storages.BaseStorage) -> None:
    if isinstance(storage, optuna.storages.RDBStorage):
        storage.remove_session()
        storage.engine.dispose()


class TrialStore:
    """The run's study in an Optuna storage; ``resume`` opens the existing one."""

    def __init__(
        self,
        url: str,
        study_name: str,
        n_levels: Sequence[int],
        directions: int = 1,
        resume: bool = False,
    ) -> None:
        self.storage = open_storage(url)
        self.distributions = {f"g{i}": IntDistribution(0, n - 1) for i, n in enumerate(n_levels)}
        if resume:
            try:
                self.study_id = self.storage.get_study_id_from_name(study_name)
            except KeyError:
                raise SearcherError(
                    f"the run's study {study_name!r} is not in {redacted(url)}"
                ) from None
        else:
            try:
                self.study_id = self.storage.create_new_study(
                    [optuna.study.StudyDirection.MINIMIZE] * directions, study_name
                )
            except optuna.exceptions.DuplicatedStudyError:
                raise SearcherError(
                    f"{redacted(url)} already holds a study named {study_name!r}: "
                    "pick another --out"
                ) from None
        self.ids: dict[Candidate, int] = {}
        self.windows: dict[Candidate, int] = {}
        self._logged: dict[Candidate, Outcome] = {}
        self._trained: dict[tuple[Candidate, int], Outcome] = {}
        for frozen in self.storage.get_all_trials(self.study_id, deepcopy=False):
            candidate, outcome = _parse(frozen)
            if candidate is None:
                continue
            self.ids[candidate] = frozen._trial_id
            self.windows[candidate] = len(outcome.kl)
            self._logged[candidate] = outcome
            for steps, scores in frozen.user_attrs.get("trained", {}).items():
                self._trained[candidate, int(steps)] = _outcome(scores)

    def logged(self) -> dict[Candidate, Outcome]:
        """The latest stored state of every candidate (for ``ReplayPool``)."""
        return dict(self._logged)

    def logged_trained(self) -> dict[tuple[Candidate, int], Outcome]:
        """Every stored trained score, by candidate and training steps."""
        return dict(self._trained)

    def append(self, trial: Trial) -> None:
        new_trained = [s for s in trial.trained if (trial.candidate, s) not in self._trained]
        if new_trained and trial.candidate in self.ids:
            self._append_trained(trial, new_trained)
        if self.windows.get(trial.candidate, 0) >= trial.windows:
            return  # replayed on resume: already stored
        scores = {"kl": trial.kl, "nll": trial.nll, "seconds": round(trial.seconds, 4)}
        step, value = trial.windows, trial.fitness()
        trial_id = self.ids.get(trial.candidate)
        if trial_id is None:
            template = optuna.trial.create_trial(
                state=TrialState.RUNNING,
                params={f"g{i}": g for i, g in enumerate(trial.candidate)},
                distributions=self.distributions,
                user_attrs={
                    "number": trial.number, "origin": trial.origin, "costs": trial.costs,
                    "fractions": trial.fractions, "feasible": trial.feasible, "scores": scores,
                },
                intermediate_values={step: value},
            )  # fmt: skip
            self.ids[trial.candidate] = self.storage.create_new_trial(self.study_id, template)
        else:
            self.storage.set_trial_user_attr(trial_id, "scores", scores)
            self.storage.set_trial_intermediate_value(trial_id, step, value)
        self.windows[trial.candidate] = trial.windows
        rest = [s for s in trial.trained if (trial.candidate, s) not in self._trained]
        if rest:  # (a candidate whose trained score came before its first plain one)
            self._append_trained(trial, rest)

    def _append_trained(self, trial: Trial, steps: list[int]) -> None:
        """The trial's trained scores, as one user attribute (by steps) of its Optuna trial."""
        for s in steps:
            t = trial.trained[s]
            self._trained[trial.candidate, s] = Outcome(
                np.asarray(t.kl), np.asarray(t.nll), t.seconds
            )
        every = {
            str(s): {"kl": o.kl.tolist(), "nll": o.nll.tolist(), "seconds": round(o.seconds, 4)}
            for (c, s), o in self._trained.items()
            if c == trial.candidate
        }
        self.storage.set_trial_user_attr(self.ids[trial.candidate], "trained", every)

    def finish(
        self, trials: Iterable[Trial], full: int, values: Callable[[Trial], list[float]]
    ) -> None:
        """COMPLETE the candidates scored at full fidelity, PRUNE the rest."""
        for trial in trials:
            trial_id = self.ids.get(trial.candidate)
            if trial_id is None or self.storage.get_trial(trial_id).state.is_finished():
                continue
            if trial.windows >= full:
                self.storage.set_trial_state_values(trial_id, TrialState.COMPLETE, values(trial))
            else:
                self.storage.set_trial_state_values(trial_id, TrialState.PRUNED)

    def close(self) -> None:
        close_storage(self.storage)


def _parse(frozen: optuna.trial.FrozenTrial) -> tuple[Candidate | None, Outcome]:
    try:
        genes = tuple(int(frozen.params[f"g{i}"]) for i in range(len(frozen.params)))
        outcome = _outcome(frozen.user_attrs["scores"])
    except (KeyError, TypeError, ValueError):
        return None, Outcome(np.zeros(0), np.zeros(0), 0.0)
    return genes, outcome


def _outcome(s: dict) -> Outcome:
    return Outcome(
        np.asarray(s["kl"], dtype=float), np.asarray(s["nll"], dtype=float), float(s["seconds"])
    )
