"""Time per evaluation in the service vs a bare forward pass of the same pruned model.

For random on-budget candidates of the width and depth spaces, it times
  service: Evaluator.score (apply the candidate to the resident model by slicing, forward,
           KL to the dense reference and NLL), as the search runs it;
  bare:    a forward pass of an independent, physically pruned copy with compact weights
           (space.materialize) on the same tokens, returning logits and nothing else;
and prints service / bare per candidate and overall (target: at most 1.10).

    .venv/bin/python benchmarks/eval_overhead.py [--model DIR] [--windows 4] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import spaces
from searcher import data, models
from searcher.budget import Budget
from searcher.fitness import Evaluator
from searcher.run import problem_for


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budget", default="flops=0.5")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = models.load(args.model)
    win = data.windows(loaded.tokenizer, data.read_text(None), args.seq_len, args.windows, 1)
    ids = win.calibration
    ratios_all, totals = [], [0.0, 0.0]
    for name in ("width", "depth"):
        structure = spaces.Structure.of(loaded.model)
        space = spaces.build(name, structure, args.seq_len, ids)
        problem = problem_for(space, Budget.parse(args.budget))
        evaluator = Evaluator(loaded.model, ids, space.apply, space.dense(), batch_size=len(ids))
        rng = np.random.default_rng(0)
        for i in range(args.candidates):
            cand = problem.random(rng)
            pruned = space.materialize(cand)

            def bare(pruned=pruned):
                with torch.inference_mode():
                    return pruned(input_ids=ids, use_cache=False).logits

            def service(cand=cand, space=space, evaluator=evaluator):
                space.apply(space.dense())  # as in a search: the previous candidate differs
                return evaluator.score(cand, 0, len(ids))

            bare()  # warm-up
            service()
            # Interleaved, so both see the same machine load; the minimum of each is the
            # least disturbed run (shared machines are noisy upwards, never downwards).
            t_bare, t_service = [], []
            for _ in range(args.repeats):
                t_bare.append(timed(bare))
                t_service.append(timed(service))
            b, s = min(t_bare), min(t_service)
            ratios_all.append(s / b)
            totals[0] += s
            totals[1] += b
            frac = problem.fractions(cand)["flops"]
            print(f"{name:6s} cand {i}: flops {frac:.3f}  bare {b * 1e3:7.1f} ms  "
                  f"service {s * 1e3:7.1f} ms  ratio {s / b:.3f}", flush=True)  # fmt: skip
            del pruned
        space.apply(space.dense())
    print(f"overall: service/bare {totals[0] / totals[1]:.3f} in total, median ratio "
          f"{statistics.median(ratios_all):.3f}, max {max(ratios_all):.3f} over "
          f"{len(ratios_all)} candidates ({args.windows}x{args.seq_len} tokens, "
          f"{args.threads} threads)")  # fmt: skip


if __name__ == "__main__":
    main()
