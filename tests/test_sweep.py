"""Several budgets in one command: one refined best per budget, one front, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from searcher.cli import main
from searcher.pool import LocalPool

ARGS = ["--seq-len", "32", "--importance-windows", "2", "--validation-windows", "2",
        "--offspring", "4", "--stages", "1:2,2:1", "--threads", "1", "--evals", "12"]  # fmt: skip
BUDGETS = "flops=0.7,0.5,0.6"


def sweep(out: Path, model: Path, *extra: str) -> int:
    return main(["run", "--model", str(model), "--budget", BUDGETS, "--out", str(out), *ARGS,
                 *extra])  # fmt: skip


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SEARCHER_SCORE_CACHE", str(root))
    return root


def scored(run_dir: Path) -> list:
    trials = pd.read_parquet(run_dir / "trials.parquet")
    return list(zip(trials["genes"].map(tuple), trials["kl"], strict=True))


def test_a_sweep_gives_one_best_per_budget_and_reuses_the_profile(
    cache: Path, tiny_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "sweep"
    assert sweep(out, tiny_dir) == 0
    info = json.loads((out / "sweep.json").read_text())
    assert info["status"] == "complete" and (out / "front.png").stat().st_size > 0
    assert [b["budget"] for b in info["budgets"]] == ["flops=0.7", "flops=0.5", "flops=0.6"]
    cached = []
    for entry in info["budgets"]:
        limit = float(entry["budget"].split("=")[1])
        assert entry["best"]["fractions"]["flops"] <= limit + 1e-9
        run = json.loads((out / entry["run"] / "run.json").read_text())
        assert run["status"] == "complete" and run["spec"]["budget"] == entry["budget"]
        cached.append(run["cached_evals"])
    # later budgets reuse the profile candidates they share with earlier ones: here 0.6's
    # profile (around the same uniform allocation) is 0.5's, 0.7's is apart
    assert cached[0] == 0 and cached[2] > 0
    printed = capsys.readouterr().out
    assert "3 budgets" in printed and "flops=0.5" in printed


def test_an_interrupted_sweep_resumes_where_it_stopped(
    tiny_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    whole = tmp_path / "whole"
    assert sweep(whole, tiny_dir) == 0

    real = LocalPool.run
    calls = {"n": 0}

    def crashing(self, jobs, on_outcome=None):
        calls["n"] += 1
        if calls["n"] == 12:  # well into the second budget
            raise KeyboardInterrupt
        return real(self, jobs, on_outcome)

    monkeypatch.setattr(LocalPool, "run", crashing)
    out = tmp_path / "cut"
    assert sweep(out, tiny_dir) == 130
    info = json.loads((out / "sweep.json").read_text())
    assert info["status"] == "running" and "best" in info["budgets"][0]
    monkeypatch.setattr(LocalPool, "run", real)
    assert main(["run", "--resume", str(out)]) == 0
    done = json.loads((out / "sweep.json").read_text())
    assert done["status"] == "complete"
    for entry in done["budgets"]:
        assert scored(out / entry["run"]) == scored(whole / entry["run"])


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ("flops=0.5,0.6,params=0.6,0.7", "sweep one key at a time"),
        ("flops=0.5,0.5", "given twice"),
        ("flops=0.5,1.5", "must lie in (0, 1]"),
    ],
)
def test_bad_sweeps_fail_in_one_line(
    budget: str, message: str, tiny_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "bad"
    code = main(["run", "--model", str(tiny_dir), "--budget", budget, "--out", str(out), *ARGS])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not out.exists()  # refused before anything was written
