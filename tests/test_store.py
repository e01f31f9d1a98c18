"""Trials in an Optuna storage: a journal file in the run directory, or a database."""

from __future__ import annotations

import json
import os
from pathlib import Path

import optuna
import pandas as pd
import pytest

from searcher.cli import main
from searcher.store import open_storage, redacted

ARGS = ["--seq-len", "32", "--importance-windows", "2", "--validation-windows", "2",
        "--offspring", "4", "--stages", "1:2,2:1", "--threads", "1", "--seed", "2",
        "--evals", "6"]  # fmt: skip


def check_study(url: str, study: str, run_dir: Path) -> None:
    """The storage holds one trial per candidate, with the run's scores."""
    trials = optuna.load_study(study_name=study, storage=open_storage(url)).get_trials()
    frame = pd.read_parquet(run_dir / "trials.parquet")
    assert len(trials) == len(frame)
    by_genes = {tuple(t.params[f"g{i}"] for i in range(len(t.params))): t for t in trials}
    for genes, kl in zip(frame["genes"].map(tuple), frame["kl"]):
        stored = by_genes[genes].user_attrs["scores"]["kl"]
        assert sum(stored[: len(stored)]) / len(stored) == pytest.approx(kl)
    best = json.loads((run_dir / "best.json").read_text())
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    feasible = [t for t in complete if t.user_attrs["feasible"]]
    assert min(t.value for t in feasible) == pytest.approx(best["calibration"]["kl"])


def test_default_storage_is_a_journal_in_the_run_dir(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", "--model", str(tiny_dir), "--out", str(out), *ARGS]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["storage"] == {"url": "trials.journal", "study": "run"}  # relative: movable
    check_study(str(out / "trials.journal"), "run", out)
    moved = tmp_path / "moved"
    out.rename(moved)
    assert main(["run", "--resume", str(moved)]) == 0
    again = json.loads((moved / "run.json").read_text())
    assert again["replayed_evals"] == again["evals"] == info["evals"]


def test_sqlite_storage(tiny_dir: Path, tmp_path: Path) -> None:
    out, url = tmp_path / "run", f"sqlite:///{tmp_path / 'all-runs.db'}"
    assert main(["run", "--model", str(tiny_dir), "--out", str(out), "--storage", url,
                 *ARGS]) == 0  # fmt: skip
    check_study(url, "run", out)


@pytest.fixture
def postgres() -> str:
    url = os.environ.get("SEARCHER_TEST_POSTGRES")
    if not url:
        if os.environ.get("SEARCHER_REQUIRE_POSTGRES") == "1":
            pytest.fail("SEARCHER_TEST_POSTGRES is not set: run through .ci/with-postgres.sh")
        pytest.skip("no PostgreSQL server: `make test` starts one")
    return url


def test_postgresql_backed_run_and_resume(postgres: str, tiny_dir: Path, tmp_path: Path):
    out = tmp_path / "pg-run"
    args = ["run", "--model", str(tiny_dir), "--out", str(out), "--storage", postgres, *ARGS]
    assert main(args) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["storage"] == {"url": postgres, "study": "pg-run"}
    assert not (out / "trials.journal").exists()
    check_study(postgres, "pg-run", out)
    # a resume reads the database back: everything replayed, nothing scored again
    assert main(["run", "--resume", str(out)]) == 0
    again = json.loads((out / "run.json").read_text())
    assert again["replayed_evals"] == again["evals"] == info["evals"]
    check_study(postgres, "pg-run", out)
    # the same study name twice in one database is refused
    other = tmp_path / "x" / "pg-run"
    code = main(["run", "--model", str(tiny_dir), "--out", str(other), "--storage", postgres,
                 *ARGS])  # fmt: skip
    assert code == 2


@pytest.mark.parametrize(
    ("url", "message"),
    [("postgresql://nobody:secret@127.0.0.1:1/db", "cannot open it"),
     ("redis://127.0.0.1/0", "expected a database URL"),
     ("sqlite:////no/such/dir/trials.db", "cannot open it"),
     ("/no/such/dir/trials.journal", "does not exist")],
)  # fmt: skip
def test_bad_storage_is_one_line(url: str, message: str, tiny_dir: Path, tmp_path, capsys):
    code = main(["run", "--model", str(tiny_dir), "--storage", url, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert "secret" not in err


def test_redacted_drops_the_password() -> None:
    assert redacted("postgresql://u:pw@h:5432/db") == "postgresql://u@h:5432/db"
    assert redacted("postgresql://u:pw@h:54x2/db") == "postgresql://u@h:54x2/db"
    assert redacted("postgresql://h/db?user=u&password=pw&x=1") == "postgresql://h/db?user=u&x=1"
    assert redacted("sqlite:///a/b.db") == "sqlite:///a/b.db"


def test_a_file_that_is_not_a_journal_is_one_line(tiny_dir: Path, tmp_path, capsys) -> None:
    (tmp_path / "trials.db").write_bytes(b"SQLite format 3\x00" + bytes(range(256)))
    for target in (tmp_path / "trials.db", tmp_path):
        code = main(["run", "--model", str(tiny_dir), "--storage", str(target),
                     "--out", str(tmp_path / "run")])  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2, err
        assert "not a writable Optuna journal file" in err or "not a regular file" in err, err
        assert (tmp_path / "trials.db").read_bytes()[:16] == b"SQLite format 3\x00"
        assert len(err.strip().splitlines()) == 1
