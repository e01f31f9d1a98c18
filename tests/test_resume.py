"""Runs that survive crashes: a resumed run repeats no evaluation and ends where an
uninterrupted one does."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

from searcher.cli import main
from searcher.pool import LocalPool
from searcher.run import resume
from searcher.rundir import JOURNAL, RunDir
from searcher.store import DEFAULT_FILE, open_storage

ARGS = ["--seq-len", "32", "--importance-windows", "2", "--validation-windows", "2",
        "--offspring", "4", "--stages", "1:2,2:1", "--threads", "1", "--seed", "5"]  # fmt: skip


def stored(run_dir: Path) -> list[optuna.trial.FrozenTrial]:
    """The trials in the run's own Optuna storage (a journal file in the run directory)."""
    storage = open_storage(str(run_dir / "trials.journal"))
    return optuna.load_study(study_name=None, storage=storage).get_trials(deepcopy=False)


def results(run_dir: Path) -> tuple[list, list, dict]:
    trials = pd.read_parquet(run_dir / "trials.parquet")
    best = json.loads((run_dir / "best.json").read_text())
    return trials["genes"].map(tuple).tolist(), trials["kl"].tolist(), best


@pytest.fixture(scope="module")
def uninterrupted(tiny_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    assert main(["run", "--model", str(tiny_dir), "--evals", "10", "--out", str(out), *ARGS]) == 0
    return out


def test_resume_after_a_crash_repeats_nothing_and_matches(
    uninterrupted: Path, tiny_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "run"
    real_run = LocalPool.run
    calls = {"n": 0, "jobs": 0}

    def crashing(self, jobs, on_outcome=None):
        calls["n"] += 1
        if calls["n"] == 4:  # profile, its two starts, evo's first stage: then Ctrl-C
            raise KeyboardInterrupt  # as Ctrl-C would, mid-search
        calls["jobs"] += len(jobs)
        return real_run(self, jobs, on_outcome)

    monkeypatch.setattr(LocalPool, "run", crashing)
    code = main(["run", "--model", str(tiny_dir), "--evals", "10", "--out", str(out), *ARGS])
    assert code == 130
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    logged = {tuple(t.params.values()) for t in stored(out)}
    assert len(logged) > 0
    assert all(t.state == optuna.trial.TrialState.RUNNING for t in stored(out))

    fresh = {"jobs": 0, "starts": []}

    def counting(self, jobs, on_outcome=None):
        fresh["jobs"] += len(jobs)
        fresh["starts"] += [(j.candidate, j.start) for j in jobs]
        return real_run(self, jobs, on_outcome)

    monkeypatch.setattr(LocalPool, "run", counting)
    result = resume(str(out))
    genes, kl, best = results(out)
    genes0, kl0, best0 = results(uninterrupted)
    assert genes == genes0 and kl == kl0  # the same trials, in the same order, same scores
    assert best["genes"] == best0["genes"] and best["validation"] == best0["validation"]
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "complete" and len(info["resumed"]) == 1
    assert info["replayed_evals"] > 0
    assert info["evals"] == json.loads((uninterrupted / "run.json").read_text())["evals"]
    # nothing logged before the crash was scored again
    assert not [c for c, start in fresh["starts"] if c in logged and start == 0]
    assert result.trials == len(genes0)
    # one Optuna trial per candidate: full-fidelity ones COMPLETE with their KL, the rest PRUNED
    trials = stored(out)
    assert len(trials) == len(genes0)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert {t.state for t in trials} == {optuna.trial.TrialState.COMPLETE,
                                         optuna.trial.TrialState.PRUNED}  # fmt: skip
    assert min(t.value for t in done) == pytest.approx(best0["calibration"]["kl"])


def test_resume_after_sigkill(uninterrupted: Path, tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["run", "--model", str(tiny_dir), "--evals", "10", "--out", str(out), *ARGS]
    # Each batch is slowed down so that the kill lands mid-search whatever the machine's speed.
    script = (
        "import sys, time\n"
        "from searcher.pool import LocalPool\n"
        "real = LocalPool.run\n"
        "LocalPool.run = lambda self, jobs, cb=None: (time.sleep(0.2), real(self, jobs, cb))[1]\n"
        "from searcher.cli import main\n"
        f"sys.exit(main({args!r}))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if count_stored(out) >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    before = len(stored(out))
    assert before >= 6
    assert main(["run", "--resume", str(out)]) == 0
    genes, kl, best = results(out)
    genes0, kl0, best0 = results(uninterrupted)
    assert genes == genes0 and kl == kl0 and best["genes"] == best0["genes"]
    assert len(genes) > before  # the resumed run went on past what was stored
    assert len(stored(out)) == len(genes)  # and stored each candidate once


def count_stored(run_dir: Path) -> int:
    """Trials stored so far (0 while the journal does not exist yet)."""
    if not (run_dir / "trials.journal").is_file():
        return 0
    try:
        return len(stored(run_dir))
    except (ValueError, KeyError):  # no study written yet
        return 0


def test_resume_errors_are_one_line(uninterrupted: Path, tmp_path: Path, capsys) -> None:
    code = main(["run", "--resume", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 2 and "no readable run.json" in err and len(err.strip().splitlines()) == 1
    code = main(["run", "--resume", str(uninterrupted), "--budget", "flops=0.3"])
    assert code == 2 and "drop all flags but" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    info = json.loads((uninterrupted / "run.json").read_text())
    info["model"]["fingerprint"] = "0" * 16
    (other / "run.json").write_text(json.dumps(info))
    code = main(["run", "--resume", str(other)])
    err = capsys.readouterr().err
    assert code == 2 and "belongs to another model" in err


def test_resume_may_change_where_evaluations_run(uninterrupted: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(uninterrupted, tmp_path / "run"))
    (run / ".lock").unlink(missing_ok=True)
    before = RunDir(run).read_info()
    assert main(["run", "--resume", str(run), "--threads", "2"]) == 0
    after = RunDir(run).read_info()
    assert after["spec"]["threads"] == 2 and after["hardware"]["threads"] == 2
    assert {**after["spec"], "threads": 0, "out": ""} == {**before["spec"], "threads": 0, "out": ""}
    assert after["replayed_evals"] == after["evals"]  # every score read back


def test_the_run_directory_names_the_stores_journal(tmp_path: Path) -> None:
    assert JOURNAL == DEFAULT_FILE
    assert RunDir(tmp_path).journal_lock == tmp_path / f"{DEFAULT_FILE}.lock"


def test_a_resume_over_a_changed_text_is_refused(
    tiny_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """Its logged scores (and what it would give the score cache) belong to the old text."""
    text = tmp_path / "calibration.txt"
    text.write_text("The first calibration text, long enough for a few windows. " * 300)
    out = tmp_path / "run"
    real_run = LocalPool.run
    calls = {"n": 0}

    def crashing(self, jobs, on_outcome=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_run(self, jobs, on_outcome)

    monkeypatch.setattr(LocalPool, "run", crashing)
    args = ["run", "--model", str(tiny_dir), "--data", str(text), "--evals", "10"]
    assert main([*args, "--out", str(out), *ARGS]) == 130
    text.write_text("Another text altogether, also long enough for its windows. " * 300)
    capsys.readouterr()
    assert main(["run", "--resume", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "has changed since the run started" in err and len(err.splitlines()) == 1
