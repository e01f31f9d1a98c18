"""Latency figures for the README: profile the embedded model on a device, validate the table
on random candidates, and measure the speed-up of the flops=0.5 width config (and of a run
budgeted in latency).

    .venv/bin/python benchmarks/latency.py [--device ort-cpu] [--n 100] [--skip-runs]
        [--method context] [--compare stack]

``--compare METHOD`` also profiles a table with the other way of timing block sizes and
predicts the same measured candidates with it (an A/B on one set of measurements). Writes
benchmarks/figures/latency-validation-<device>.png and prints a JSON summary. Run it
alone: anything else on the machine moves the timings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

from latency_models.backends import cpu_name
from latency_models.profile import BLOCK_TIMING, MODEL_TIMING
from searcher.latency import LatencySettings
from searcher.latency_jobs import measure_config, profile_model, validate_table
from searcher.run import run
from searcher.spec import RunSpec

FIGURES = Path(__file__).parent / "figures"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="ort-cpu")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--out", default="results/bench-latency")
    ap.add_argument("--skip-runs", action="store_true", help="only profile and validate")
    ap.add_argument(
        "--repeats", type=int, default=None,
        help="timing rounds for blocks, correction models and validation (default: searcher's)",
    )  # fmt: skip
    ap.add_argument("--method", default="stack", choices=("context", "stack"))
    ap.add_argument("--compare", choices=("context", "stack"), help="a second table to compare")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = LatencySettings(args.device, 1, 128)
    timings = {}
    if args.repeats:
        timings = {
            "block_timing": replace(BLOCK_TIMING, repeats=args.repeats),
            "model_timing": replace(MODEL_TIMING, repeats=args.repeats),
        }
    validation_timing = replace(MODEL_TIMING, repeats=args.repeats or MODEL_TIMING.repeats)
    summary: dict = {
        "device": args.device, "cpu": cpu_name(), "repeats": args.repeats or "default",
        "method": args.method,
    }  # fmt: skip

    t0 = time.perf_counter()
    prof = profile_model(
        settings, out=str(out / f"table-{args.device}.json"), method=args.method, **timings
    )
    summary["profile_seconds_with_model_load"] = round(time.perf_counter() - t0, 1)
    summary["profile_seconds"] = prof.table.info["seconds"]
    summary["correction"] = {
        k: {"scale": w.scale, "offset_ms": w.offset_ms} for k, w in prof.table.workloads.items()
    }
    compare = []
    if args.compare:
        other = profile_model(
            settings, out=str(out / f"table-{args.device}-{args.compare}.json"),
            method=args.compare, **timings,
        )  # fmt: skip
        compare.append(str(other.path))
        summary["compare_correction"] = {k: w.scale for k, w in other.table.workloads.items()}
    print(json.dumps(summary, indent=2), flush=True)

    t0 = time.perf_counter()
    val = validate_table(
        settings, n=args.n, table_path=str(prof.path), out=str(out / f"validate-{args.device}"),
        timing=validation_timing, compare=compare,
    )  # fmt: skip
    summary["validate_seconds"] = round(time.perf_counter() - t0, 1)
    summary["validation"] = val["summary"]
    if args.compare:
        summary["compare_validation"] = val["compared"][compare[0]]
    FIGURES.mkdir(exist_ok=True)
    figure = FIGURES / f"latency-validation-{args.device}.png"
    shutil.copy(Path(val["out"]) / "validation.png", figure)
    print(json.dumps(summary["validation"], indent=2), flush=True)

    if not args.skip_runs:
        spec = RunSpec(budget="flops=0.5", preset="quick", out=str(out / "flops0.5"))
        res = run(spec)
        m = measure_config(str(res.out / "best.json"), settings, table_path=str(prof.path))
        summary["flops0.5_width"] = {
            "kl": res.best["validation"]["kl"],
            "flops": res.best["fractions"]["flops"],
            "latency": m["workloads"],
        }
        spec = RunSpec(
            budget="latency=0.5", preset="quick", out=str(out / "latency0.5"),
            latency_device=args.device, latency_table=str(prof.path),
        )  # fmt: skip
        res = run(spec)
        summary["latency0.5_width"] = {
            "kl": res.best["validation"]["kl"],
            "fractions": res.best["fractions"],
            "latency": res.best["latency"],
            "seconds": round(res.seconds, 1),
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
