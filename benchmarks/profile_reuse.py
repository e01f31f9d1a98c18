"""What the score cache saves: a second run at a new budget against the same run uncached.

Three runs of the default search on the same model, text and space, one after another:

1. ``first``: budget A, with an empty score cache (it fills it);
2. ``second``: budget B, with the cache the first run left;
3. ``uncached``: budget B again, with the cache off.

The second and the uncached run take the same path (cached scores are replayed, not
re-ranked) and end at the same config, so the ratio of their times is the time to equal
quality with and without reuse. Writes ``--out``/profile_reuse.json and prints a table.

    .venv/bin/python benchmarks/profile_reuse.py                   # width, flops 0.5 then 0.6
    .venv/bin/python benchmarks/profile_reuse.py --space sparsity --budgets sparsity=0.6,0.7
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from searcher.run import run
from searcher.score_cache import ENV
from searcher.spec import RunSpec


def one(spec: RunSpec, cache: str) -> dict:
    os.environ[ENV] = cache
    t0 = time.perf_counter()
    result = run(spec)
    wall = time.perf_counter() - t0
    info = json.loads((result.out / "run.json").read_text())
    return {
        "budget": spec.budget,
        "wall_s": round(wall, 1),
        "search_s": info["timings"]["search"],
        "evals": info["evals"],
        "cached_evals": info["cached_evals"],
        "calibration_kl": result.best["calibration"]["kl"],
        "validation_kl": result.best["validation"]["kl"],
        "genes": result.best["genes"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--space", default="width")
    parser.add_argument("--budgets", default="flops=0.5,flops=0.6", help="A,B: first, second")
    parser.add_argument("--evals", type=float, default=40)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/bench-profile-reuse")
    args = parser.parse_args(argv)
    first, second = args.budgets.split(",", 1)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    cache = tempfile.mkdtemp(prefix="searcher-cache-")
    base = RunSpec(
        model=args.model, space=args.space, evals=args.evals, seq_len=args.seq_len,
        importance_windows=4, validation_windows=8, stages="1:2,4:1", offspring=8,
        threads=args.threads,
    )  # fmt: skip
    rows = {}
    for name, budget, where in (("first", first, cache), ("second", second, cache),
                                ("uncached", second, "off")):  # fmt: skip
        spec = RunSpec.from_dict({**base.to_dict(), "budget": budget, "out": str(out / name)})
        rows[name] = one(spec, where)
        print(name, {k: v for k, v in rows[name].items() if k != "genes"}, flush=True)
    shutil.rmtree(cache, ignore_errors=True)
    same = rows["second"]["genes"] == rows["uncached"]["genes"]
    summary = {
        "runs": rows,
        "same_result": same,
        "second_over_uncached_wall": rows["second"]["wall_s"] / rows["uncached"]["wall_s"],
        "second_over_uncached_search": rows["second"]["search_s"] / rows["uncached"]["search_s"],
        "second_over_first_wall": rows["second"]["wall_s"] / rows["first"]["wall_s"],
    }
    (out / "profile_reuse.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"second run ({second}) with the cache: {rows['second']['wall_s']:.0f} s "
        f"(search {rows['second']['search_s']:.0f} s); uncached: "
        f"{rows['uncached']['wall_s']:.0f} s (search {rows['uncached']['search_s']:.0f} s); "
        f"ratio {summary['second_over_uncached_wall']:.2f} wall, "
        f"{summary['second_over_uncached_search']:.2f} search; same config: {same}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
