"""Latency: the lean decoder and its ONNX graph, tables (construction, additivity,
fingerprints), validation, and runs under latency budgets, on tiny models.

No test depends on how fast or busy the machine is. Tests about the search use tables of
fixed numbers (``fixed_table``); tests about measurement assert relations that hold under any
load, with budgets that every candidate's measurement can meet or that come from the table
just measured.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import spaces
from latency_models.backends import Measurement, Timing, backend, ort_options
from latency_models.graph import Decoder
from latency_models.latency_table import LatencyTable, WorkloadTable
from latency_models.onnx_graph import build
from latency_models.profile import architecture
from latency_models.workload import Workload
from searcher.budget import Budget
from searcher.cli import main
from searcher.errors import SearcherError
from searcher.families import family_of
from searcher.latency import (
    LatencySettings,
    Meter,
    Timed,
    candidate_blocks,
    candidate_weights,
    latency_costs,
    load_table,
    profile_space,
    space_shapes,
    validate,
)
from tests.helpers import candidates, tiny_model

FAST = Timing(warmup=1, repeats=3, min_seconds=0.0)
TINY = ["--seq-len", "32", "--importance-windows", "2", "--validation-windows", "2",
        "--offspring", "4", "--stages", "1:2,2:1", "--threads", "1"]  # fmt: skip


def _space(name: str, kind: str = "llama", windows=None, **options):
    model = tiny_model(kind)
    g = torch.Generator().manual_seed(0)
    win = torch.randint(0, 320, (2, 32), generator=g) if windows is None else windows
    return spaces.build(name, spaces.Structure.of(model), 32, win, 2, options)


def fixed_table(space: spaces.SearchSpace, settings: LatencySettings, path: Path) -> Path:
    """A latency table of fixed numbers for ``space``, saved to ``path``: block times that grow
    with the block's size, a fixed correction, and this machine's fingerprint for
    ``settings`` (so that it is not refused as another device's table)."""
    workloads = {}
    for wl in settings.workloads:
        k = 1.0 if wl.prefill else 0.25  # a decode step: a quarter of the prefill
        blocks = {
            kind: {size: k * (0.2 + size / sizes[-1]) for size in sizes}
            for kind, sizes in space_shapes(space).items()
        }
        workloads[wl.kind] = WorkloadTable(wl, k, blocks, 0.05 * k, scale=1.1, offset_ms=0.2 * k)
    model = architecture(candidate_weights(space, space.dense()))
    LatencyTable(settings.backend().fingerprint(), model, workloads, {"fixed": True}).save(path)
    return path


def _hf_step(model, ids, nxt):
    """HF logits of the last prefill position and of one decode step after it."""
    with torch.no_grad():
        pre = model(ids, use_cache=True)
        dec = model(nxt, past_key_values=pre.past_key_values, use_cache=True)
    return pre.logits[:, -1], dec.logits[:, -1]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("space_name", ["width", "depth"])
def test_lean_decoder_and_onnx_graph_compute_what_hf_computes(kind: str, space_name: str) -> None:
    """Pruned candidates: torch decoder == HF (prefill and a cached decode step), and the
    hand-built ONNX graph run by ONNX Runtime == the torch decoder."""
    import onnxruntime as ort

    space = _space(space_name, kind)
    model = space.structure.model
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 320, (2, 12), generator=g)
    nxt = torch.randint(0, 320, (2, 1), generator=g)
    for genes in candidates(space, seed=3, n=2)[1:]:  # most pruned and random ones
        weights = candidate_weights(space, genes)
        pre_ref, dec_ref = _hf_step(model, ids, nxt)
        prefill = Decoder(weights, Workload("prefill", 2, 12)).eval()
        with torch.no_grad():
            out = prefill(ids)
        torch.testing.assert_close(out[0], pre_ref, atol=1e-4, rtol=1e-4)
        decode = Decoder(weights, Workload("decode", 2, 12)).eval()
        with torch.no_grad():
            step = decode(nxt, *out[1:])
        torch.testing.assert_close(step[0], dec_ref, atol=1e-4, rtol=1e-4)
        for wl, inputs, expect in (
            (prefill.workload, (ids,), out), (decode.workload, (nxt, *out[1:]), step)
        ):  # fmt: skip
            graph = build(weights, wl)
            opts = ort_options()
            opts.add_external_initializers(
                list(graph.weights),
                [ort.OrtValue.ortvalue_from_numpy(a) for a in graph.weights.values()],  # fmt: skip
            )
            sess = ort.InferenceSession(graph.model.SerializeToString(), opts)
            got = sess.run(None, {n: x.numpy() for n, x in zip(graph.inputs, inputs)})
            assert len(got) == len(expect)
            for a, b in zip(got, expect):
                np.testing.assert_allclose(a, b.numpy(), atol=1e-4, rtol=1e-4)
        space.apply(space.dense())


def test_onnx_graph_saves_as_a_standalone_model(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    model = tiny_model()
    weights = family_of(model).lean(model)
    wl = Workload("prefill", 1, 8)
    graph = build(weights, wl)
    graph.save(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(str(tmp_path / "m.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), ort_options())
    ids = torch.arange(8)[None]
    with torch.no_grad():
        ref = Decoder(weights, wl)(ids)[0]
    np.testing.assert_allclose(sess.run(None, {"input_ids": ids.numpy()})[0], ref.numpy(),
                               atol=1e-4, rtol=1e-4)  # fmt: skip


@pytest.fixture(scope="module")
def width_space():
    return _space("width", mlp_steps=4)


@pytest.fixture(scope="module")
def ort_table(width_space) -> LatencyTable:
    return profile_space(
        width_space, LatencySettings("ort-cpu", 1, 16), corrections=5, block_timing=FAST,
        model_timing=FAST,
    )  # fmt: skip


@pytest.mark.parametrize("device", ["ort-cpu", "torch-cpu"])
def test_profile_builds_a_table_for_every_block_size(width_space, ort_table, device) -> None:
    table = ort_table if device == "ort-cpu" else profile_space(
        width_space, LatencySettings(device, 1, 16), corrections=4, block_timing=FAST,
        model_timing=FAST,
    )  # fmt: skip
    s = width_space.structure
    assert space_shapes(width_space) == {
        "attn": list(range(1, s.kv_heads + 1)),
        "mlp": [32, 64, 96, 128],
    }
    assert set(table.workloads) == {"prefill", "decode"}
    for wt in table.workloads.values():
        assert (wt.workload.batch, wt.workload.seq_len) == (1, 16)
        assert sorted(wt.blocks["attn"]) == [1, 2, 3]
        assert sorted(wt.blocks["mlp"]) == [32, 64, 96, 128]
        assert wt.fixed_ms > 0 and all(v >= 0 for d in wt.blocks.values() for v in d.values())
        for times in wt.blocks.values():  # a bigger block is never faster, even under noise
            assert all(times[a] <= times[b] for a, b in zip(sorted(times), sorted(times)[1:]))
        assert len(wt.fit) == table.info["corrections"] and wt.scale > 0
    assert table.device["backend"] == device and table.device["threads"] >= 1
    assert {"cpu", "python", "torch"} <= set(table.device)
    assert table.model["layers"] == 3 and table.model["kv_heads"] == 3


def test_table_round_trips_and_is_additive(width_space, ort_table, tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    ort_table.save(path)
    loaded = LatencyTable.load(path)
    rng = np.random.default_rng(0)
    for kind in ("prefill", "decode"):
        costs = latency_costs(loaded, width_space, kind)
        wt = loaded.workload(kind)
        for _ in range(20):
            genes = tuple(int(rng.integers(0, n)) for n in width_space.n_levels)
            blocks = candidate_blocks(width_space, genes)
            # the cost table the search uses is the table's own prediction of the blocks ...
            assert costs.cost(genes) == pytest.approx(wt.predict(blocks), rel=1e-9)
            # ... and additive: one gene's change moves it by that block's corrected latency
            g = int(rng.integers(0, len(genes)))
            other = tuple(lv if i != g else (lv + 1) % width_space.n_levels[g]
                          for i, lv in enumerate(genes))  # fmt: skip
            kind_g, size_old = blocks_of(width_space, g, genes[g])
            _, size_new = blocks_of(width_space, g, other[g])
            delta = wt.scale * (wt.block(kind_g, size_new) - wt.block(kind_g, size_old))
            assert costs.cost(other) - costs.cost(genes) == pytest.approx(delta, abs=1e-9)
        assert costs.dense() == pytest.approx(
            latency_costs(ort_table, width_space, kind).dense(), rel=1e-6
        )


def blocks_of(space, gene: int, level: int):
    return space.blocks()[1][gene][level]


def test_correction_fit_recovers_a_linear_map() -> None:
    from latency_models.latency_table import WorkloadTable

    wt = WorkloadTable(Workload("prefill", 1, 8), 1.0, {"mlp": {4: 1.0}})
    raw = [10.0, 20.0, 35.0, 50.0]
    wt.fit_correction(raw, [1.2 * r + 3.0 for r in raw])
    assert wt.scale == pytest.approx(1.2) and wt.offset_ms == pytest.approx(3.0)


def test_anchored_correction_fits_the_per_call_cost_the_blocks_miss() -> None:
    """Through the anchor (dense, timed as the reference) the fit keeps its latency and fits
    one constant to the models' shares of the dense model timed among them: shares made with a
    known constant give it back, and a candidate's predicted share is (raw + c) / (dense + c)."""
    from latency_models.latency_table import WorkloadTable

    wt = WorkloadTable(Workload("decode", 1, 8), 4.0, {"mlp": {4: 1.0}})
    raw = [100.0, 40.0, 55.0, 70.0, 85.0]  # the first: the dense model
    c, dense_item = 6.0, 30.0
    measured = [dense_item * (r + c) / (raw[0] + c) for r in raw]
    wt.fit_correction(raw, measured, anchor=(raw[0], 1.05 * dense_item))  # reference 5% slower
    assert wt.offset_ms / wt.scale == pytest.approx(c, rel=1e-3)
    assert wt.scale * raw[0] + wt.offset_ms == pytest.approx(1.05 * dense_item)
    share = (wt.scale * 40.0 + wt.offset_ms) / (wt.scale * raw[0] + wt.offset_ms)
    assert share == pytest.approx(measured[1] / dense_item, rel=1e-4)
    # shares that are the raw ratio give no constant: the plain ratio through the anchor
    wt.fit_correction(raw, [0.3 * r for r in raw], anchor=(raw[0], 31.0))
    assert abs(wt.offset_ms) < 1e-3 * 31.0 and wt.scale == pytest.approx(0.31, rel=1e-3)
    # too few models apart from the anchor to fit anything: the ratio
    wt.fit_correction([100.0, 50.0], [30.0, 20.0], anchor=(100.0, 30.0))
    assert wt.offset_ms == 0.0 and wt.scale == pytest.approx(0.3)


def test_sparsity_latency_is_the_dense_latency_and_a_latency_budget_is_refused() -> None:
    space = _space("sparsity")
    blocks_fixed, per_gene = space.blocks()
    assert all(b is None for gene in per_gene for b in gene) and len(blocks_fixed) == 6
    from searcher.latency import refuse_untimed

    with pytest.raises(SearcherError, match="dense kernels"):
        refuse_untimed(space, Budget.parse("latency=0.8").metrics)


def test_a_table_from_another_device_is_refused_unless_allowed(width_space, tmp_path: Path) -> None:
    settings = LatencySettings("ort-cpu", 1, 16)
    here = fixed_table(width_space, settings, tmp_path / "here.json")
    assert load_table(here, width_space, settings, allow_mismatch=False)[1] == []  # this device's
    d = json.loads(here.read_text())
    d["device"]["cpu"] = "Some Other CPU 9000"
    d["device"]["onnxruntime"] = "0.1.0"
    path = tmp_path / "other.json"
    path.write_text(json.dumps(d))
    with pytest.raises(SearcherError, match="another device.*allow-table-mismatch") as err:
        load_table(path, width_space, settings, allow_mismatch=False)
    assert "Some Other CPU 9000" in str(err.value)
    _, notes = load_table(path, width_space, settings, allow_mismatch=True)
    assert notes and "onnxruntime" in notes[0]
    # another workload shape or model shape is never usable
    with pytest.raises(SearcherError, match="--batch 2 --seq 16"):
        load_table(path, width_space, LatencySettings("ort-cpu", 2, 16), True)
    d["model"]["hidden"] = 4096
    path.write_text(json.dumps(d))
    with pytest.raises(SearcherError, match="another model shape"):
        load_table(path, width_space, settings, True)


def test_validation_reports_shares_and_errors(width_space, ort_table) -> None:
    res = validate(width_space, ort_table, LatencySettings("ort-cpu", 1, 16), n=4, seed=0)
    for kind, v in res.items():
        s = v.summary()
        assert s["n"] == 4 and 0 <= s["within_5pct"] <= s["within_10pct"] <= 1
        errors = np.abs(np.array(v.predicted) / np.array(v.measured) - 1)
        assert s["within_10pct"] == pytest.approx(np.mean(errors <= 0.1))
        assert s["rmse_pct"] == pytest.approx(np.sqrt(np.mean(errors**2)) * 100)
        assert len(v.pairs()) == 4 and v.workload.kind == kind


def test_unknown_or_missing_devices_are_clear_errors() -> None:
    with pytest.raises(SearcherError, match="choose one of"):
        backend("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(SearcherError, match="no CUDA GPU"):
            backend("torch-cuda")
        with pytest.raises(SearcherError, match="CUDAExecutionProvider"):
            backend("ort-cuda")


def test_budget_parses_latency_terms() -> None:
    b = Budget.parse("latency=0.6,flops=0.7")
    assert b.limits == {"latency": 0.6, "flops": 0.7}
    ms = Budget.parse("latency_ms=120")
    assert ms.absolute == {"latency": 120.0} and ms.metrics == {"latency"}
    assert ms.resolved({"latency": 200.0}).limits == {"latency": pytest.approx(0.6)}
    for bad in ("latency_ms=0", "latency=0.5,latency_ms=10", "latency_ms=abc"):
        with pytest.raises(SearcherError):
            Budget.parse(bad)


WIDE = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32}  # fmt: skip


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory) -> Path:
    """A small model wide enough that compute, not per-op overhead, sets its latency."""
    from tests.helpers import save_tiny

    return save_tiny(tmp_path_factory.mktemp("wide"), **WIDE)


def _wide_session(wide_dir: Path):
    from searcher.run import SessionKey, open_session

    return open_session(
        SessionKey(
            str(wide_dir), None, "width", {"mlp_steps": 4}, 32, 2, 2, 2, 4, "cpu", "float32", False
        )
    )


@pytest.fixture(scope="module")
def wide(wide_dir: Path):
    """The CLI runs' model and width space, opened once."""
    return _wide_session(wide_dir)


@pytest.fixture(scope="module")
def wide_table(wide, tmp_path_factory) -> Path:
    """A table of fixed numbers for the CLI runs' model, space and latency settings: the most
    compressed candidate is predicted at 0.44 of dense, whatever the machine's load."""
    path = tmp_path_factory.mktemp("lat") / "wide-fixed.json"
    return fixed_table(wide.space, LatencySettings("torch-cpu", 1, 64), path)


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


LAT = ["--latency-device", "torch-cpu", "--latency-seq", "64", "--space-option", "mlp_steps=4"]


def test_predicted_latency_run(wide_dir: Path, wide_table: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r"
    code, stdout, err = _run(
        ["run", "--model", str(wide_dir), "--budget", "latency=0.7", "--evals", "6",
         "--out", str(out), "--latency-table", str(wide_table), *LAT, *TINY], capsys,
    )  # fmt: skip
    assert code == 0, err
    best = json.loads((out / "best.json").read_text())
    assert best["fractions"]["latency"] <= 0.7 + 1e-9 and best["feasible"]
    for kind in ("prefill", "decode"):  # both workloads, predicted and re-measured
        lat = best["latency"][kind]
        assert lat["measured_ms"] > 0 and lat["dense_measured_ms"] > 0 and lat["speedup"] > 0
        table = LatencyTable.load(wide_table).workload(kind)
        assert lat["dense_predicted_ms"] >= table.fixed_ms * table.scale
    predicted = best["latency"]["prefill"]["predicted_ms"]
    assert predicted == pytest.approx(best["costs"]["latency"], rel=1e-3)
    front = json.loads((out / "pareto.json").read_text())["front"]
    assert all("measured_ms" in e["latency"]["decode"] for e in front)
    run = json.loads((out / "run.json").read_text())
    assert run["latency"]["mode"] == "predicted" and run["latency"]["table"] == str(wide_table)
    assert "faster" in stdout and "prefill latency" in stdout


def test_latency_ms_budget_resolves_against_the_dense_prediction(
    wide_dir: Path, wide, wide_table: Path, tmp_path: Path, capsys
) -> None:
    dense_ms = latency_costs(LatencyTable.load(wide_table), wide.space, "decode").dense()
    out = tmp_path / "r"
    code, _, err = _run(
        ["run", "--model", str(wide_dir), "--budget", f"latency_ms={0.8 * dense_ms:.6f}",
         "--workload", "decode", "--evals", "4", "--out", str(out),
         "--latency-table", str(wide_table), *LAT, *TINY], capsys,
    )  # fmt: skip
    assert code == 0, err
    best = json.loads((out / "best.json").read_text())
    assert best["costs"]["latency"] <= 0.8 * dense_ms * (1 + 1e-6)
    assert best["fractions"]["latency"] == pytest.approx(best["costs"]["latency"] / dense_ms)


def test_measured_latency_run(
    wide_dir: Path, wide, wide_table: Path, tmp_path: Path, capsys
) -> None:
    """--latency measured: every candidate is timed on the device, and its measurement, not
    the table, is its latency and decides its feasibility. What a measurement gives moves with
    the machine's load, so the budget is one any candidate of at most 0.4 of the FLOPs meets
    (no slower than dense) and the test asserts how the run treats the measurements, whatever
    they are; test_measured_feasibility_follows_the_measurements checks outcomes."""
    out = tmp_path / "r"
    code, _, err = _run(
        ["run", "--model", str(wide_dir), "--budget", "flops=0.4,latency=1.0", "--latency",
         "measured", "--evals", "8", "--out", str(out), "--latency-table", str(wide_table),
         *LAT, *TINY], capsys,
    )  # fmt: skip
    assert code == 0, err
    import pandas as pd

    run = json.loads((out / "run.json").read_text())
    every = pd.read_parquet(out / "trials.parquet")
    profile = every["origin"].str.contains("profiling")  # one layer lowered from dense
    assert profile.any() and every.loc[profile, "windows"].eq(1).all()  # scored, not timed
    trials = every[~profile]  # the rest: every one timed on the device
    assert run["latency"]["mode"] == "measured"
    assert run["latency"]["measured_candidates"] >= len(trials) + 1  # plus the final re-measure
    dense_ms = run["latency"]["dense_measured_ms"]["prefill"]
    assert trials["latency_fraction"].to_numpy() == pytest.approx(
        trials["latency"].to_numpy() / dense_ms,
        rel=1e-4,  # run.json rounds to 0.1 us
    )
    # measured, so not what the (additive) table predicts for the same candidates
    costs = latency_costs(LatencyTable.load(wide_table), wide.space, "prefill")
    scale = dense_ms / costs.dense()
    predicted = np.array([costs.cost(tuple(g)) * scale for g in trials["genes"]])
    assert not np.allclose(predicted, trials["latency"].to_numpy(), rtol=1e-6)
    feasible = (trials["latency_fraction"] <= 1.0 + 1e-9) & (trials["flops_fraction"] <= 0.4 + 1e-9)
    assert (trials["feasible"] == feasible).all()
    assert trials.loc[~feasible, "windows"].eq(0).all()  # over budget when measured: unscored
    best = json.loads((out / "best.json").read_text())
    assert best["feasible"] and best["fractions"]["latency"] <= 1.0 + 1e-9
    assert isinstance(best["latency"]["prefill"]["within_budget"], bool)

    # resumed, a measured run reads its measurements back instead of timing again
    log = (out / "latency.jsonl").read_text().splitlines()
    assert len(log) == len(trials) + 1  # every candidate and the dense model, once
    code, _, err = _run(["run", "--resume", str(out)], capsys)
    assert code == 0, err
    assert (out / "latency.jsonl").read_text().splitlines() == log
    again = pd.read_parquet(out / "trials.parquet")
    assert again["latency"].tolist() == every["latency"].tolist()
    assert again["feasible"].tolist() == every["feasible"].tolist()


def test_measured_feasibility_follows_the_measurements(
    wide_dir: Path, wide, wide_table: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """--latency measured on a device that measures fixed numbers, 0.1 of dense above the
    table's prediction or below it (by the first gene's parity): candidates the table fits
    into the budget are over it when measured, and are then neither scored nor chosen."""
    import pandas as pd

    costs = latency_costs(LatencyTable.load(wide_table), wide.space, "prefill")

    def fraction(genes) -> float:  # what "the device" measures, as a share of dense
        g = tuple(int(x) for x in genes)
        shift = 0.0 if g == wide.space.dense() else 0.1 if g[0] % 2 else -0.1
        return costs.cost(g) / costs.dense() + shift

    def measure(self: Meter, genes, kinds=("prefill", "decode")) -> dict[str, Timed]:
        self.count += 1
        dense = Measurement.of([10.0])
        return {k: Timed(Measurement.of([10.0 * fraction(genes)]), dense) for k in kinds}

    monkeypatch.setattr(Meter, "measure", measure)
    out = tmp_path / "r"
    code, _, err = _run(
        ["run", "--model", str(wide_dir), "--budget", "latency=0.7", "--latency", "measured",
         "--evals", "8", "--out", str(out), "--latency-table", str(wide_table), *LAT, *TINY],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    trials = pd.read_parquet(out / "trials.parquet")
    trials = trials[~trials["origin"].str.contains("profiling")]  # profiles are not timed
    measured = trials["latency_fraction"].to_numpy()
    assert measured == pytest.approx([fraction(g) for g in trials["genes"]], rel=1e-6)
    fits = np.array([costs.cost(tuple(g)) / costs.dense() <= 0.7 + 1e-9 for g in trials["genes"]])
    over = measured > 0.7 + 1e-9
    assert (fits & over).any() and (~over).any()  # the table fits them; measured, some do not
    assert (trials["feasible"] == ~over).all()
    assert trials.loc[over, "windows"].eq(0).all()
    best = json.loads((out / "best.json").read_text())
    assert best["feasible"] and best["fractions"]["latency"] <= 0.7 + 1e-9
    assert best["fractions"]["latency"] == pytest.approx(fraction(best["genes"]))
    assert best["latency"]["prefill"]["within_budget"] is True


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--latency-device", "tpu"], "unknown latency device"),
        (["--latency-table", "/nonexistent/t.json"], "no such file"),
        (["--latency-device", "torch-cuda"], "no CUDA GPU"),
        (["--space", "sparsity", "--budget", "latency=0.5"], "dense kernels"),
    ],
)
def test_latency_errors_are_one_line(args, needle, wide_dir: Path, tmp_path: Path, capsys) -> None:
    if needle == "no CUDA GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    base = ["run", "--model", str(wide_dir), "--budget", "latency=0.7", "--out",
            str(tmp_path / "r"), *LAT[:4], *TINY]  # fmt: skip
    code, _, err = _run([*base, *args], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


DROP = object()  # remove the entry


@pytest.mark.parametrize(
    ("entry", "value", "needle"),
    [
        ("workloads.prefill.blocks.mlp.256", -873.95, "blocks.mlp.256 is -873.95, not a latency"),
        ("workloads.decode.blocks.attn.2", math.nan, "decode.blocks.attn.2 is nan, not a latency"),
        ("workloads.prefill.fixed_ms", math.inf, "prefill.fixed_ms is inf, not a latency"),
        ("workloads.prefill.fixed_ms", -1, "prefill.fixed_ms is -1.0, not a latency"),
        ("workloads.decode.fixed_ms", math.nan, "decode.fixed_ms is nan, not a latency"),
        ("workloads.prefill.correction.scale", 0, "scale is 0.0, not a finite number above 0"),
        ("workloads.prefill.correction.scale", -1.1, "scale is -1.1, not a finite number above"),
        ("workloads.decode.correction.scale", math.inf, "scale is inf, not a finite number above"),
        ("workloads.prefill.correction.offset_ms", math.nan, "offset_ms is nan, not a finite"),
        ("workloads.decode.correction.offset_ms", -math.inf, "offset_ms is -inf, not a finite"),
        ("workloads.prefill.fixed_ms", DROP, "workloads.prefill.fixed_ms is missing"),
        ("workloads.decode.correction", DROP, "workloads.decode.correction is missing"),
        ("device", DROP, "device is missing"),
        ("workloads.prefill.blocks", [1.0], "workloads.prefill.blocks is a list, not an object"),
        ("workloads.prefill.blocks.mlp.512", "0.5", "mlp.512 is a string, not a latency"),
        ("workloads.decode.batch", "1", "decode.batch is '1', not a whole number"),
        ("workloads.prefill.blocks.mlp.big", 1.0, "mlp has the size 'big', not a whole number"),
        ("", [], "the table is a list, not an object"),
    ],
)
def test_an_unusable_table_is_refused_in_one_line(
    entry: str, value, needle: str, wide_dir: Path, wide_table: Path, tmp_path: Path, capsys
) -> None:
    """A table whose numbers cannot be latencies (or that is not a table) is refused when it
    is loaded, naming the file and the entry, rather than pricing candidates with it."""
    d = json.loads(wide_table.read_text())
    *parents, last = entry.split(".")
    node = d
    for key in parents:
        node = node[key]
    if not entry:
        d = value
    elif value is DROP:
        del node[last]
    else:
        node[last] = value
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(d))
    code, _, err = _run(
        ["run", "--model", str(wide_dir), "--budget", "latency=0.7", "--evals", "3", "--out",
         str(tmp_path / "r"), "--latency-table", str(bad), *LAT, *TINY], capsys,
    )  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"latency table {bad} is unusable: " in err and needle in err, err
    assert err.strip().endswith("profile the device again with searcher profile"), err


def test_a_mismatched_table_is_refused_by_run(
    wide_dir: Path, wide_table: Path, tmp_path: Path, capsys
) -> None:
    d = json.loads(wide_table.read_text())
    d["device"]["threads"] += 1
    other = tmp_path / "other.json"
    other.write_text(json.dumps(d))
    args = ["run", "--model", str(wide_dir), "--budget", "latency=0.7", "--evals", "3",
            "--latency-table", str(other), *LAT, *TINY]  # fmt: skip
    code, _, err = _run([*args, "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "allow-table-mismatch" in err and "threads" in err
    code, _, err = _run([*args, "--out", str(tmp_path / "b"), "--allow-table-mismatch"], capsys)
    assert code == 0, err
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert "threads" in run["latency"]["table_mismatch"][0]


def test_profile_validate_and_measure_commands(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    table = tmp_path / "t.json"
    dev = ["--device", "torch-cpu", "--seq", "16", "--model", str(tiny_dir)]
    code, out, err = _run(["profile", *dev, "--out", str(table), "--corrections", "3"], capsys)
    assert code == 0, err
    assert table.is_file() and "correction" in out
    code, out, err = _run(
        ["latency", "validate", *dev, "--table", str(table), "--n", "3", "--out",
         str(tmp_path / "v"), "--json"], capsys,
    )  # fmt: skip
    assert code == 0, err
    res = json.loads(out)
    assert set(res["summary"]) == {"prefill", "decode"}
    assert (tmp_path / "v" / "validation.png").read_bytes()[:4] == b"\x89PNG"
    pairs = json.loads((tmp_path / "v" / "validation.json").read_text())["pairs"]
    assert len(pairs["decode"]) == 3
    run_dir = tmp_path / "r"
    assert main(["run", "--model", str(tiny_dir), "--budget", "flops=0.5", "--evals", "3",
                 "--out", str(run_dir), *TINY]) == 0  # fmt: skip
    capsys.readouterr()
    code, out, err = _run(
        ["latency", "measure", str(run_dir / "best.json"), *dev[:4], "--table", str(table),
         "--json"], capsys,
    )  # fmt: skip
    assert code == 0, err
    res = json.loads(out)
    for w in res["workloads"].values():
        assert w["measured_ms"] > 0 and w["speedup"] > 0 and "predicted_ms" in w


def test_a_run_profiles_the_device_once_when_it_has_no_table(
    wide_dir: Path, wide, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["run", "--model", str(wide_dir), "--evals", "3", *LAT, *TINY]
    # A latency device and no table: the run profiles the device and saves the table ...
    code, _, err = _run([*args, "--budget", "flops=0.5", "--out", "a"], capsys)
    assert code == 0, err
    tables = list((tmp_path / "results" / "latency").glob("*.json"))
    assert len(tables) == 1
    name = tables[0].name  # model, device, threads, workload and space are in the name
    assert name.startswith("wide0-torch-cpu-t") and "-b1-s64-width-" in name
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["spec"]["latency_table"] == str(tables[0].resolve())
    stamp = tables[0].stat().st_mtime_ns
    # ... which the next run reuses, here under a latency budget half-way between the table's
    # most compressed candidate and dense (how much pruning gains depends on the load when the
    # table was measured)
    costs = latency_costs(LatencyTable.load(tables[0]), wide.space, "prefill")
    limit = min((costs.minimum() / costs.dense() + 1) / 2, 1.0)
    code, _, err = _run([*args, "--budget", f"latency={limit!r}", "--out", "b"], capsys)
    assert code == 0, err
    assert tables[0].stat().st_mtime_ns == stamp
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["latency"]["table"] == str(tables[0].resolve())


class _InteractingBackend:
    """A device whose graphs take exactly: one call, the ends, every attention block (1 ms per
    KV group), and every MLP (0.01 ms per neuron), 20% slower when an attention block runs
    before it in its layer, and wide MLPs (over 64 neurons) 10% slower again: an MLP's cost
    depends on its context, as measured on an AMD EPYC VM."""

    name = "interacting"
    threads = 1

    @staticmethod
    def latency(w) -> float:
        ms = 0.5 + (3.0 if w.head is not None else 0.0)
        for attn, mlp in w.layers:
            ms += attn.groups if attn is not None else 0.0
            if mlp is not None:
                after_attention = 1.2 * (1.1 if mlp.width > 64 else 1.0)
                ms += 0.01 * mlp.width * (after_attention if attn is not None else 1.0)
        return ms

    def measure_many(self, weights, workload, timing):
        return [Measurement.of([self.latency(w)] * 3) for w in weights]

    def fingerprint(self):
        return {"backend": self.name, "cpu": "synthetic", "cores": 1, "threads": 1}


@pytest.mark.parametrize("method", ["context", "stack"])
def test_profiling_in_context_prices_what_a_block_adds_where_it_runs(width_space, method) -> None:
    from latency_models.profile import profile

    device = _InteractingBackend()
    dense = candidate_weights(width_space, width_space.dense())
    rng = np.random.default_rng(3)
    picks = [tuple(int(rng.integers(0, n)) for n in width_space.n_levels) for _ in range(12)]
    # every candidate keeps at least one KV group per layer (the width space's lowest level)
    models = [(candidate_blocks(width_space, g), lambda g=g: candidate_weights(width_space, g))
              for g in picks[:4]]  # fmt: skip
    table = profile(device, dense, [Workload("prefill", 1, 16)], space_shapes(width_space),
                    models, FAST, FAST, method=method)  # fmt: skip
    width_space.apply(width_space.dense())
    assert table.info["method"] == method
    costs = latency_costs(table, width_space, "prefill")
    truth = device.latency(dense)
    errors = []
    for genes in picks[4:]:
        share = device.latency(candidate_weights(width_space, genes)) / truth
        errors.append(abs(costs.cost(genes) / costs.dense() - share))
    width_space.apply(width_space.dense())
    if method == "context":  # exact: the MLPs' interaction is priced where it happens
        assert max(errors) < 1e-9
    else:  # alone, MLPs miss the interaction and wide ones are under-priced
        assert max(errors) > 1e-3
