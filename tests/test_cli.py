"""The CLI end to end on a tiny Llama, and one-line errors with exit status 2 for bad input."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from searcher.cli import main
from searcher.pareto import pareto_front

TINY = ["--seq-len", "32", "--importance-windows", "2", "--validation-windows", "2",
        "--offspring", "4", "--stages", "1:2,2:1", "--threads", "1"]  # fmt: skip


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_run(tiny_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "r"
    code = main(["run", "--model", str(tiny_dir), "--budget", "flops=0.6", "--evals", "6",
                 "--out", str(out), *TINY])  # fmt: skip
    assert code == 0
    return out


def test_run_writes_every_output(tiny_run: Path) -> None:
    for name in ("trials.parquet", "pareto.json", "best.json", "run.json", "pareto.png"):
        assert (tiny_run / name).is_file(), name
    assert (tiny_run / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    run = json.loads((tiny_run / "run.json").read_text())
    assert run["status"] == "complete"
    assert run["spec"]["budget"] == "flops=0.6"
    assert {"torch", "transformers"} <= set(run["versions"])
    trials = pd.read_parquet(tiny_run / "trials.parquet")
    assert len(trials) == run["trials"] and len(trials) > 4
    assert {"genes", "flops", "params", "kl@1", "kl@2", "seconds"} <= set(trials.columns)
    # the profile lowers one layer at a time from dense (over budget, scored on one window);
    # evo proposes only feasible candidates
    profile = trials["origin"].str.contains("profiling")
    assert profile.any() and (trials[profile]["windows"] == 1).all()
    assert trials[~profile]["flops_fraction"].max() <= 0.6 + 1e-9


def test_best_is_the_best_full_fidelity_trial_and_meets_budget(tiny_run: Path) -> None:
    best = json.loads((tiny_run / "best.json").read_text())
    trials = pd.read_parquet(tiny_run / "trials.parquet")
    full = trials[trials["windows"] >= 2]
    assert best["calibration"]["kl"] == pytest.approx(full["kl@2"].min())
    assert best["fractions"]["flops"] <= 0.6
    assert best["validation"]["windows"] == 2 and best["validation"]["kl"] > 0
    layers = [k for k in best["config"] if k.endswith(".mlp")]
    assert len(layers) == 3 and all("intermediate_size" in best["config"][k] for k in layers)


def test_pareto_json_is_the_non_dominated_set(tiny_run: Path) -> None:
    pareto = json.loads((tiny_run / "pareto.json").read_text())
    trials = pd.read_parquet(tiny_run / "trials.parquet")
    full = trials[trials["windows"] >= 2].reset_index(drop=True)
    expected = pareto_front(list(zip(full["flops"], full["kl@2"])))
    assert sorted(e["trial"] for e in pareto["front"]) == sorted(full["number"][expected])


def test_eval_reproduces_the_runs_validation_kl(tiny_run: Path, capsys) -> None:
    code, out, _ = run_cli(["eval", str(tiny_run / "best.json"), "--json"], capsys)
    assert code == 0
    res = json.loads(out)
    best = json.loads((tiny_run / "best.json").read_text())
    assert res["kl"] == pytest.approx(best["validation"]["kl"], rel=1e-5)
    assert res["ppl"] == pytest.approx(best["validation"]["ppl"], rel=1e-5)


def test_eval_on_other_text_and_pareto_pick(tiny_run: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "notes.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"def f{i}(x): return x * {i}\n" * 8})
                              for i in range(40)))  # fmt: skip
    code, out, _ = run_cli(
        ["eval", str(tiny_run / "pareto.json"), "--pick", "0", "--data", str(text), "--json"],
        capsys,
    )
    assert code == 0
    res = json.loads(out)
    assert res["data"] == str(text) and res["windows"] >= 1 and res["kl"] >= 0


def test_same_seed_same_result(tiny_dir: Path, tmp_path: Path) -> None:
    outs = []
    for name in ("a", "b"):
        args = ["run", "--model", str(tiny_dir), "--budget", "params=0.7", "--evals", "4",
                "--seed", "3", "--out", str(tmp_path / name), *TINY]  # fmt: skip
        assert main(args) == 0
        outs.append(pd.read_parquet(tmp_path / name / "trials.parquet"))
    a, b = outs
    assert a["genes"].map(tuple).tolist() == b["genes"].map(tuple).tolist()
    assert a["kl"].tolist() == b["kl"].tolist()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "--model", "/nonexistent/model"], "does not exist"),
        (["run", "--data", "/nonexistent/text.txt"], "cannot read data file"),
        (["run", "--space", "breadth"], "unknown space"),
        (["run", "--budget", "flops"], "bad budget term"),
        (["run", "--budget", "flops=1.5"], "must lie in (0, 1]"),
        (["run", "--algo", "magic"], "unknown --algo"),
        (["run", "--init", "magic"], "unknown --init"),
        (["run", "--algo", "tpe", "--init", "owl"], "use it with --algo evo"),
        (["run", "--stages", "4:1,1:2"], "bad --stages"),
        (["eval", "/nonexistent/best.json"], "cannot read config"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], needle: str, capsys) -> None:
    code, _, err = run_cli(args, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("searcher: error:")


def test_infeasible_budget_is_one_line(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(["run", "--model", str(tiny_dir), "--budget", "flops=0.05",
                            "--out", str(tmp_path / "x"), *TINY], capsys)  # fmt: skip
    assert code == 2
    assert "infeasible" in err and len(err.strip().splitlines()) == 1


def test_evals_too_few_for_one_full_evaluation(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    """--evals is a hard cap: below one full-fidelity evaluation nothing can be the result."""
    args = ["run", "--model", str(tiny_dir), "--budget", "flops=0.6", "--out", str(tmp_path)]
    code, _, err = run_cli([*args, *TINY, "--evals", "0.5"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "within --evals 0.5" in err and "raise --evals" in err


def test_budget_metric_the_space_lacks(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(["run", "--model", str(tiny_dir), "--budget", "sparsity=0.5",
                            "--out", str(tmp_path / "x"), *TINY], capsys)  # fmt: skip
    assert code == 2 and "cannot be budgeted by 'sparsity'" in err


def test_console_script_errors_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "data.txt"
    bad.write_bytes(b"\xff\xfe\x00broken")
    proc = subprocess.run(
        [sys.executable, "-m", "searcher.cli", "run", "--data", str(bad)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("searcher: error: cannot read data")


def test_eval_refuses_a_config_made_for_another_model(
    tiny_run: Path, tiny_qwen_dir: Path, capsys
) -> None:
    code, _, err = run_cli(
        ["eval", str(tiny_run / "best.json"), "--model", str(tiny_qwen_dir)], capsys
    )
    assert code == 2 and "was made for model" in err and len(err.strip().splitlines()) == 1


def test_eval_refuses_a_config_whose_units_differ(tiny_run: Path, tmp_path: Path, capsys) -> None:
    config = json.loads((tiny_run / "best.json").read_text())
    config["space"]["fingerprint"] = "0" * 16  # as if the run had chosen other neurons
    edited = tmp_path / "best.json"
    edited.write_text(json.dumps(config))
    code, _, err = run_cli(["eval", str(edited)], capsys)
    assert code == 2 and "chose different units" in err


def test_bad_setting_in_a_config_file(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("budget: flops=0.5\nseq_len: '512'\n")
    code, _, err = run_cli(["run", "--config", str(cfg)], capsys)
    assert code == 2 and "seq_len = '512' should be a whole number" in err
    cfg.write_text("budget: flops=0.5\nmystery: 3\n")
    code, _, err = run_cli(["run", "--config", str(cfg)], capsys)
    assert code == 2 and "unknown run setting(s) mystery" in err


def test_multi_objective_run_writes_a_front(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "mo"
    args = ["run", "--model", str(tiny_dir), "--budget", "flops=0.9", "--algo", "nsga2",
            "--objectives", "kl,flops", "--evals", "24", "--out", str(out), *TINY]  # fmt: skip
    assert main(args) == 0
    pareto = json.loads((out / "pareto.json").read_text())
    assert pareto["objectives"] == ["flops", "kl"]
    front = pareto["front"]
    assert len(front) >= 2
    flops = [e["fractions"]["flops"] for e in front]
    kls = [e["calibration"]["kl"] for e in front]
    assert flops == sorted(flops) and kls == sorted(kls, reverse=True)  # a trade-off curve
    code, _, err = run_cli(["run", "--model", str(tiny_dir), "--objectives", "kl,flops",
                            "--out", str(tmp_path / "x"), *TINY], capsys)  # fmt: skip
    assert code == 2 and "needs one of --algo" in err


def test_every_run_setting_has_its_flag() -> None:
    """The flags come from ``RunSpec``'s fields: each parses to the setting's type."""
    from searcher.cli import build_parser
    from searcher.spec import KINDS, RunSpec

    given = {bool: [], int: ["3"], float: ["2.5"], str: ["x"], dict: ["mlp_steps=8"]}
    parsed = {bool: True, int: 3, float: 2.5, str: "x", dict: [("mlp_steps", 8)]}
    for f in dataclasses.fields(RunSpec):
        flag = f.metadata["flag"].get("option", f"--{f.name.replace('_', '-')}")
        value, want = given[KINDS[f.name]], parsed[KINDS[f.name]]
        if "choices" in f.metadata["flag"]:
            want = f.metadata["flag"]["choices"][-1]
            value = [want]
        assert getattr(build_parser().parse_args(["run", flag, *value]), f.name) == want, flag
    assert set(vars(build_parser().parse_args(["run"]))) == {"command", "verbose"}  # all unset


def test_run_help_lists_the_registries(capsys) -> None:
    import spaces
    from searcher.algorithms import ALGORITHMS, SEEDS
    from searcher.budget import KEYS

    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    for names in (spaces.SPACES, ALGORITHMS, SEEDS, KEYS):
        assert all(name in text for name in names)
    assert "evo (default)" in text and "profile (default)" in text
    assert not re.search(r"\{[a-z_]+\}", text)  # every listed name filled in
    try:
        from searcher.families import FAMILIES
    except ImportError:
        return
    assert "supported families:" in text and all(name in text for name in FAMILIES)


def test_run_settings_are_frozen() -> None:
    from searcher.spec import RunSpec

    spec = RunSpec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.evals = 3  # type: ignore[misc]
    assert dataclasses.replace(spec, evals=3).evals == 3 and spec.evals is None
