"""Parallel scaling of the worker pool, and what the pool itself costs per candidate.

The same search (same seed, same candidates, same scores) runs in one process in three
placements: in-process with one thread, on one Ray worker with one thread, and on two Ray
workers with one thread each, all on one local Ray instance. Throughput counts scored windows
per second of search (model loading and worker start-up excluded; they are printed apart).
This VM's speed drifts by 10-30% within minutes, so the placements take turns for
``--rounds`` rounds and the best round of each is compared.

    parallel efficiency = throughput(2 workers) / (2 x throughput(1 worker))
    pool overhead       = (search wall time - time spent scoring inside workers) / candidates
                          on one Ray worker: dispatch, result transfer, the algorithm and the
                          trial store, per scoring job; also as a fraction of the mean job.

    .venv/bin/python benchmarks/scaling.py            # embedded SmolLM2-135M, ~10 minutes
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import pandas as pd
import ray

from searcher.run import run
from searcher.spec import RunSpec


def measure(spec: RunSpec, label: str) -> dict:
    result = run(spec)
    info = json.loads((result.out / "run.json").read_text())
    trials = pd.read_parquet(result.out / "trials.parquet")
    windows = int(trials["windows"].sum())
    scoring = float(trials["seconds"].sum())
    search = info["timings"]["search"]
    jobs = info["jobs"]
    return {
        "pool": label,
        "start_s": round(info["timings"].get("workers_start", 0.0), 1),
        "search_s": round(search, 2),
        "windows": windows,
        "windows_per_s": windows / search,
        "jobs": jobs,
        "overhead_ms": 1000 * (search - scoring / spec.workers) / jobs,
        "overhead_frac": (search - scoring / spec.workers) / scoring * spec.workers,
        "best": result.best["genes"],
        "kl": result.best["calibration"]["kl"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--algo", default="evo")
    parser.add_argument("--evals", type=float, default=24)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    base = {
        "model": args.model, "algo": args.algo, "budget": "flops=0.5", "preset": "quick",
        "evals": args.evals, "seq_len": args.seq_len, "threads": 1, "seed": 0,
    }  # fmt: skip
    placements = [
        ("in-process, 1 thread", {"workers": 1}),
        ("Ray, 1 worker x 1 thread", {"workers": 1, "address": "local"}),
        ("Ray, 2 workers x 1 thread", {"workers": 2}),
    ]
    runs: dict[str, list[dict]] = {label: [] for label, _ in placements}
    # one Ray instance for all runs: run() uses it as it is
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, dashboard_host="127.0.0.1",
        object_store_memory=512 << 20, log_to_driver=False, logging_level=logging.WARNING,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for label, extra in placements:
                out = Path(tmp) / f"{label.replace(' ', '_')}-{r}"
                runs[label].append(measure(RunSpec(**base, **extra, out=str(out)), label))
                print(f"round {r + 1}: {label}: {runs[label][-1]['windows_per_s']:.3f} "
                      "windows/s", flush=True)  # fmt: skip
    ray.shutdown()
    rows = [max(found, key=lambda row: row["windows_per_s"]) for found in runs.values()]
    frame = pd.DataFrame(rows)
    every = [row for found in runs.values() for row in found]
    same = all(r["best"] == rows[0]["best"] and r["kl"] == rows[0]["kl"] for r in every)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(frame.drop(columns=["best"]).to_string(index=False, float_format="%.4g"))
    one, two = rows[1]["windows_per_s"], rows[2]["windows_per_s"]
    print(f"\nparallel efficiency (2 Ray workers vs 1): {two / (2 * one):.3f}  (target >= 0.85)")
    print(f"parallel efficiency (2 Ray workers vs in-process): "
          f"{two / (2 * rows[0]['windows_per_s']):.3f}")  # fmt: skip
    print(f"pool overhead per job on 1 Ray worker: {rows[1]['overhead_ms']:.1f} ms = "
          f"{100 * rows[1]['overhead_frac']:.2f}% of scoring time (target < 3%)")  # fmt: skip
    print(f"same best candidate and KL in all {len(every)} runs: {same}")


if __name__ == "__main__":
    main()
