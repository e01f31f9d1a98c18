"""Per-candidate overhead of scoring through a Ray Tune experiment vs the project's RayPool.

The same N fixed random on-budget candidates are scored at full fidelity, one at a time on
one CPU, by
  pool: searcher.workers.RayPool with 1 worker, ``pool.run([Job(candidate, 0, full), ...])``;
  tune: searcher.tune.CandidateTrainable in a Tune experiment (reuse_actors, 1 CPU per trial,
        one trial at a time, FIFO, BasicVariantGenerator with the candidates as
        points_to_evaluate), one window per training iteration.
Overhead per candidate = (wall time - sum of in-worker scoring seconds) / N, in ms and as a
fraction of the mean scoring time. Tune is shown twice: steady state (from the first trial's
model being loaded to the last result) and the whole ``Tuner.fit()`` call (actor start, model
load in the actor, experiment set-up and teardown included). The pool's start-up (actor start,
model load) is shown separately and is not in its wall time.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tune_overhead.py [--samples 24]
        [--model DIR | --embedded] [--seq-len N] [--windows 2]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray import tune
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from searcher.pool import Job
from searcher.spec import RunSpec
from searcher.tune import CandidateTrainable, param_space, portable, resident
from searcher.workers import RayPool, WorkerSetup


class TimedTrainable(CandidateTrainable):
    """CandidateTrainable that also reports wall-clock times (same machine, same clock)."""

    def setup(self, config: dict[str, Any]) -> None:
        super().setup(config)
        self.ready_at = time.time()

    def step(self) -> dict[str, Any]:
        result = super().step()
        return {**result, "ready_at": self.ready_at, "at": time.time()}


def bench_pool(spec: RunSpec, cands: list[tuple[int, ...]]) -> dict[str, Any]:
    state = resident(spec)
    setup = WorkerSetup(
        state.session.key, state.full, state.session.space.fingerprint(), spec.threads
    )
    t0 = time.perf_counter()
    pool = RayPool(setup, state.session.windows.calibration, state.evaluator.reference(), 1)
    startup = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        outcomes = pool.run([Job(c, 0, state.full) for c in cands])
        wall = time.perf_counter() - t0
    finally:
        pool.close()
    return {
        "startup": startup,
        "wall": wall,
        "scoring": sum(o.seconds for o in outcomes),
        "kl": [float(o.kl.mean()) for o in outcomes],
    }


def bench_tune(spec: RunSpec, cands: list[tuple[int, ...]], storage: Path) -> list[dict]:
    space = param_space(spec)
    points = [{f"g{i}": g for i, g in enumerate(c)} for c in cands]
    tuner = tune.Tuner(
        tune.with_resources(TimedTrainable, {"cpu": spec.threads}),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric="kl", mode="min", num_samples=len(cands),
            # one trial at a time: Tune 2.60 ignores TuneConfig(max_concurrent_trials) for a
            # BasicVariantGenerator (it only wraps a Searcher), so the generator limits it
            search_alg=BasicVariantGenerator(points_to_evaluate=points, max_concurrent=1),
            scheduler=FIFOScheduler(), reuse_actors=True,
        ),
        run_config=tune.RunConfig(storage_path=str(storage), name="bench", verbose=0),
    )  # fmt: skip
    t0 = time.time()
    grid = tuner.fit()
    t1 = time.time()
    if grid.num_errors:
        raise RuntimeError(f"{grid.num_errors} Tune trials failed: {grid.errors[0]}")
    metrics = [r.metrics for r in grid]
    full = resident(spec).full
    assert all(m["windows"] == full for m in metrics), "every trial runs to full fidelity"
    by_genes = {tuple(m["genes"]): m for m in metrics}
    scoring = sum(m["score_seconds"] for m in metrics)
    ready = min(m["ready_at"] for m in metrics)
    last = max(m["at"] for m in metrics)
    kl = [by_genes[c]["kl"] for c in cands]
    return [
        {"startup": ready - t0, "wall": last - ready, "scoring": scoring, "kl": kl},
        {"startup": float("nan"), "wall": t1 - t0, "scoring": scoring, "kl": kl},
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=24, help="candidates (default 24)")
    ap.add_argument("--model", default=None, help="HF model dir (default: a tiny random Llama)")
    ap.add_argument("--embedded", action="store_true", help="use the embedded SmolLM2-135M")
    ap.add_argument("--seq-len", type=int, default=None, help="default 64, 256 with --embedded")
    ap.add_argument("--windows", type=int, default=2, help="windows per full evaluation")
    ap.add_argument("--budget", default="flops=0.5")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="tune-overhead-") as tmp:
        if args.embedded:
            model, label = None, "embedded SmolLM2-135M"
        elif args.model:
            model, label = args.model, args.model
        else:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.helpers
            from tests.helpers import save_tiny

            model, label = str(save_tiny(Path(tmp) / "tiny")), "tiny random Llama"
        seq_len = args.seq_len or (256 if args.embedded else 64)
        spec = portable(
            RunSpec(
                model=model, seq_len=seq_len, importance_windows=args.windows,
                validation_windows=1, stages=f"{args.windows}:1", threads=1,
                budget=args.budget, seed=args.seed,
            )
        )  # fmt: skip
        state = resident(spec)
        rng = np.random.default_rng(args.seed)
        cands: list[tuple[int, ...]] = []
        while len(cands) < args.samples:  # distinct, so Tune's results map back to them
            c = state.problem.random(rng)
            if c not in cands:
                cands.append(c)
        ray.init(address="local", num_cpus=1, include_dashboard=False,
                 dashboard_host="127.0.0.1", object_store_memory=256 << 20,
                 log_to_driver=False, logging_level=logging.WARNING)  # fmt: skip
        try:
            pool = bench_pool(spec, cands)
            steady, whole = bench_tune(spec, cands, Path(tmp) / "tune")
        finally:
            ray.shutdown()

    n = len(cands)
    print(
        f"{label}, {spec.space} space, seq_len {seq_len}, {args.windows} windows per candidate, "
        f"{n} candidates, 1 CPU, {spec.budget}"
    )
    rows = [
        ("RayPool, 1 worker", pool),
        ("Tune, steady state", steady),
        ("Tune, whole fit()", whole),
    ]
    print(
        f"{'path':<20} {'start-up s':>10} {'wall s':>8} {'scoring s':>9} "
        f"{'mean score ms':>13} {'overhead ms/cand':>16} {'overhead/score':>14}"
    )
    for name, r in rows:
        mean = r["scoring"] / n
        over = (r["wall"] - r["scoring"]) / n
        print(
            f"{name:<20} {r['startup']:>10.2f} {r['wall']:>8.2f} {r['scoring']:>9.2f} "
            f"{mean * 1e3:>13.1f} {over * 1e3:>16.1f} {over / mean:>14.2f}"
        )
    diff = max(abs(a - b) for a, b in zip(pool["kl"], steady["kl"], strict=True))
    print(f"max |KL(pool) - KL(tune)| over the candidates: {diff:.2e}")


if __name__ == "__main__":
    main()
