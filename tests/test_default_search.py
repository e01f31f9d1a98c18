"""The default search end to end on the tiny model: its profile fits --evals, and a run too
short for any profile still ends with a result instead of a refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from searcher.cli import main

ARGS = ["--seq-len", "32", "--importance-windows", "2", "--validation-windows", "2",
        "--offspring", "4", "--stages", "1:2,2:1", "--threads", "1", "--seed", "3"]  # fmt: skip


def search(out: Path, model: Path, evals: str) -> tuple[dict, pd.DataFrame]:
    assert main(["run", "--model", str(model), "--evals", evals, "--out", str(out), *ARGS]) == 0
    trials = pd.read_parquet(out / "trials.parquet")
    return json.loads((out / "run.json").read_text()), trials


def test_too_few_evaluations_for_a_profile_still_give_a_result(
    tiny_dir: Path, tmp_path: Path
) -> None:
    info, trials = search(tmp_path / "short", tiny_dir, "1")
    assert info["status"] == "complete" and info["evals"] <= 1.5
    assert (tmp_path / "short" / "best.json").is_file()
    assert trials["origin"].str.contains("profile seed").all()  # the uniform start, scored


def test_the_profile_is_spent_first_and_within_its_share(tiny_dir: Path, tmp_path: Path) -> None:
    info, trials = search(tmp_path / "run", tiny_dir, "20")
    profiled = trials[trials["origin"].str.contains("profiling")]
    assert len(profiled) > 0 and (profiled["windows"] == 1).all()
    assert len(profiled) * 1 / 2 <= 0.6 * 20  # one window of two each, within 60% of --evals
    assert 20 - 1 < info["evals"] <= 20  # --evals is a hard cap, short by less than a job
    assert any(t.startswith("generation") for t in trials["origin"])  # then evo refined it
