"""The embedded SmolLM2-135M, where only real weights prove the point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from searcher.cli import main
from searcher.run import open_session

pytestmark = pytest.mark.embedded


def measured_flops(model: torch.nn.Module, seq_len: int) -> int:
    model.set_attn_implementation("eager")  # so attention scores are plain, counted matmuls
    ids = torch.zeros(1, seq_len, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    return counter.get_total_flops()


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
    session = open_session(
        None, d["source"], "width", best["space"]["options"], d["seq_len"],
        d["calibration_windows"], d["validation_windows"], d["importance_windows"],
        4, "cpu", "float32", False,
    )  # fmt: skip
    dense = measured_flops(session.space.materialize(session.space.dense()), d["seq_len"])
    pruned = measured_flops(session.space.materialize(tuple(best["genes"])), d["seq_len"])
    assert pruned / dense <= 0.5
    assert pruned == pytest.approx(best["costs"]["flops"], rel=0, abs=0)
    # Real weights: the pruned model is worse than dense but far from random guessing
    v = best["validation"]
    assert 0 < v["kl"] < 10 and v["dense_ppl"] < 40 < v["ppl"] < 49152
