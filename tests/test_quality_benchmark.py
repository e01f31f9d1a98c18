"""benchmarks/quality.py --quick end to end on the tiny model: every file, every method."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def tiny_run(tiny_dir: Path, out: Path) -> list[str]:
    """Flags for small, fast runs on the tiny model."""
    return ["--model", str(tiny_dir), "--seq-len", "32", "--importance-windows", "2",
            "--validation-windows", "2", "--stages", "1:1,2:1", "--offspring", "4",
            "--threads", "1", "--out", str(out)]  # fmt: skip


def test_quick_mode_runs_end_to_end_and_resumes(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    quality = _benchmark()
    args = [*tiny_run(tiny_dir, tmp_path), "--quick", "--evals", "6", "--batch", "4"]
    assert quality.main(args) == 0
    rows = pd.read_csv(tmp_path / "quality.csv")
    want = {("width-flops0.5", m) for m in quality.QUICK["methods"] if m != "owl"} | {
        ("sparsity-0.7", m) for m in quality.QUICK["methods"] if m != "flap"
    }
    assert set(zip(rows["setting"], rows["method"])) == want
    search = rows[rows["method"].isin(["default", "evo", "tpe", "pymoo-ga", "pymoo-nsga2-mo"])]
    # --evals is a hard cap for every method: short of it by less than one evaluation
    assert (search["evals"] > 6 - 1).all() and (search["evals"] <= 6).all()
    multi = rows["method"] == "pymoo-nsga2-mo"
    assert rows[multi]["hv"].between(0, 1).all() and rows[~multi]["hv"].isna().all()
    assert rows["val_kl"].gt(0).all() and rows["val_ppl"].gt(0).all()
    for setting in ("width-flops0.5", "sparsity-0.7"):
        assert (tmp_path / f"curves-{setting}.png").stat().st_size > 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| width-flops0.5 | default |" in summary and "Targets (the default" in summary
    assert "default reaches pymoo-ga's final calibration KL" in summary
    assert "default lowest in" in summary
    # A second invocation reads every finished run back instead of running it again.
    first = json.loads((tmp_path / "runs/width-flops0.5/evo-s0/bench.json").read_text())
    capsys.readouterr()
    assert quality.main(args) == 0
    again = pd.read_csv(tmp_path / "quality.csv")
    assert again["val_kl"].tolist() == rows["val_kl"].tolist()
    assert json.loads((tmp_path / "runs/width-flops0.5/evo-s0/bench.json").read_text()) == first


def test_seeded_evo_gets_its_seeds_evaluations_and_changed_settings_rerun(
    tiny_dir: Path, tmp_path: Path, capsys
) -> None:
    quality = _benchmark()
    base = [*tiny_run(tiny_dir, tmp_path), "--settings", "width-flops0.5", "--seeds", "1"]
    args = [*base, "--methods", "additive,evo+additive,evo", "--evals", "4"]
    assert quality.main(args) == 0
    rows = pd.read_csv(tmp_path / "quality.csv").set_index("method")
    additive, seeded = rows.loc["additive"], rows.loc["evo+additive"]
    assert additive["evals"] + 4 <= seeded["evals"] <= additive["evals"] + 4 + 1
    assert seeded["cal_kl"] <= additive["cal_kl"] + 1e-9  # its first parent is additive's pick
    run = json.loads((tmp_path / "runs/width-flops0.5/evo+additive-s0/run.json").read_text())
    assert run["spec"]["init"] == "additive" and run["spec"]["algo"] == "evo"
    # A run made with other settings is not reused: evo runs again with the new budget.
    assert quality.main([*base, "--methods", "evo", "--evals", "8"]) == 0
    again = pd.read_csv(tmp_path / "quality.csv").set_index("method")
    assert again.loc["evo", "evals"] >= 8 > rows.loc["evo", "evals"]
    # A seeded method needs its seed listed before it.
    with pytest.raises(SystemExit) as exit_:
        quality.main([*base, "--methods", "evo+additive", "--evals", "4"])
    assert exit_.value.code == 2
    assert "evo+additive need their seed's method" in capsys.readouterr().err


def test_additive_budget_is_a_setting_of_its_own_and_no_run_reports_finished_runs(
    tiny_dir: Path, tmp_path: Path, capsys
) -> None:
    quality = _benchmark()
    base = [*tiny_run(tiny_dir, tmp_path), "--settings", "width-flops0.5",
            "--methods", "uniform,additive,default"]  # fmt: skip
    assert quality.main([*base, "--seeds", "1", "--evals", "4,additive"]) == 0
    rows = pd.read_csv(tmp_path / "quality.csv")
    spent = float(rows[rows["method"] == "additive"]["evals"].iloc[0])
    assert spent > 4
    label = f"width-flops0.5@{spent:g}"
    assert set(zip(rows["setting"], rows["method"])) == {
        (s, m) for s in ("width-flops0.5", label) for m in ("uniform", "additive", "default")
    }
    by = rows.set_index(["setting", "method"])
    assert 4 <= by.loc[("width-flops0.5", "default"), "evals"] < spent
    assert by.loc[(label, "default"), "evals"] >= spent
    assert (
        tmp_path / "runs" / "width-flops0.5" / f"default-e{spent:g}-s0" / "bench.json"
    ).is_file()
    summary = (tmp_path / "summary.md").read_text()
    # additive does not fit in 4 evaluations: listed there, counted only at its own count
    assert f"not counted: it needs {spent:.0f} evals" in summary
    assert f"- {label}: default val KL" in summary
    counted = dict(re.findall(r"- (\S+): default val KL .* lower than \d/(\d) other", summary))
    assert counted == {"width-flops0.5": "1", label: "2"}  # uniform; uniform and additive
    # --no-run: only what finished before; a third seed's runs are reported missing
    capsys.readouterr()
    assert quality.main([*base, "--seeds", "2", "--evals", "4,additive", "--no-run"]) == 0
    printed = capsys.readouterr().out
    assert "2 runs not finished (--no-run)" in printed and "default-s1" in printed
    again = pd.read_csv(tmp_path / "quality.csv")
    assert len(again) == len(rows) and not (tmp_path / "runs/width-flops0.5/default-s1").exists()
