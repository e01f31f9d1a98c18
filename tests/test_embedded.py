"""The embedded SmolLM2-135M, where only real weights prove the point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from searcher.cli import main
from searcher.run import SessionKey, open_session
from tests.helpers import counted_flops

pytestmark = pytest.mark.embedded


def test_embedded_width_run_meets_budget_by_independent_count(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["run", "--budget", "flops=0.5", "--space", "width", "--seq-len", "128",
            "--importance-windows", "2", "--validation-windows", "2", "--offspring", "4",
            "--stages", "1:2,2:1", "--evals", "4", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    best = json.loads((out / "best.json").read_text())
    assert best["model"]["architecture"] == "LlamaForCausalLM"
    assert best["model"]["config"]["num_hidden_layers"] == 30
    d = best["data"]
    key = SessionKey(
        None, d["source"], "width", best["space"]["options"], d["seq_len"],
        d["calibration_windows"], d["validation_windows"], d["importance_windows"],
        d["batch_size"], "cpu", "float32", False,
    )  # fmt: skip
    session = open_session(key)
    ids = session.windows.calibration[:1]
    dense = counted_flops(session.space.materialize(session.space.dense()), ids)
    pruned = counted_flops(session.space.materialize(tuple(best["genes"])), ids)
    assert pruned / dense <= 0.5
    assert pruned == pytest.approx(best["costs"]["flops"], rel=0, abs=0)
    # Real weights: the pruned model is worse than dense but far from random guessing
    v = best["validation"]
    assert 0 < v["kl"] < 10 and v["dense_ppl"] < 40 < v["ppl"] < 49152
