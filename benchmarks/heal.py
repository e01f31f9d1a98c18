"""Healing by distillation: does it close the gap, and does the searched config keep its lead?

On the embedded SmolLM2-135M, this searches (``--preset quick``) and heals:

- width at flops=0.5: the ``uniform`` baseline, the ``flap`` baseline and the default search;
- sparsity at 70%: the default search (masks fixed while training);
- the searched width config once more with LoRA (``--lora 16``), for its memory and quality.

Each heal is ``searcher heal RUN --steps 150 --batch-size 4 --seq-len 256`` (150 steps of
4x256 tokens) in a process of its own, so that its peak RSS is its own. Held-out KL and
perplexity are measured every 25 steps on the last 16 windows of the text (never trained on).
Writes under ``--out`` (default results/heal/): runs/ and healed/ (every run and healed
model: an interrupted benchmark picks up where it stopped), heal.csv, curves.png and heal.md.

    .venv/bin/python benchmarks/heal.py                 # about 2 hours on a 2-core CPU
    .venv/bin/python benchmarks/heal.py --steps 10      # a smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

# name -> (space, budget, algorithm, extra heal flags)
CASES: dict[str, tuple[str, str, str, list[str]]] = {
    "width-searched": ("width", "flops=0.5", "default", []),
    "width-uniform": ("width", "flops=0.5", "uniform", []),
    "width-flap": ("width", "flops=0.5", "flap", []),
    "sparsity70-searched": ("sparsity", "sparsity=0.7", "default", []),
    "width-searched-lora16": ("width", "flops=0.5", "default", ["--lora", "16"]),
}
SEARCHER = [sys.executable, "-m", "searcher"]


def search(out: Path, space: str, budget: str, algo: str) -> Path:
    run = out / "runs" / f"{space}-{budget.replace('=', '')}-{algo}"
    if (run / "best.json").is_file():
        return run
    cmd = [*SEARCHER, "run", "--space", space, "--budget", budget, "--preset", "quick"]
    if algo != "default":
        cmd += ["--algo", algo]
    subprocess.run([*cmd, "--out", str(run)], check=True)
    return run


def heal(out: Path, name: str, run: Path, extra: list[str], steps: int) -> dict:
    healed = out / "healed" / name
    if (healed / "heal.json").is_file():
        return json.loads((healed / "heal.json").read_text())
    cmd = [*SEARCHER, "heal", str(run), "--out", str(healed), "--steps", str(steps),
           "--batch-size", "4", "--seq-len", "256", "--eval-every", str(max(steps // 6, 1)),
           "--json", *extra]  # fmt: skip
    if (healed / "checkpoints").is_dir():
        cmd.append("--resume")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((healed / "heal.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/heal")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    args = ap.parse_args()
    out = Path(args.out)
    rows, curves = [], {}
    for name in args.cases.split(","):
        space, budget, algo, extra = CASES[name]
        run = search(out, space, budget, algo)
        h = heal(out, name, run, extra, args.steps)
        best = json.loads((run / "best.json").read_text())
        rows.append({
            "case": name, "space": space, "budget": budget, "algo": algo, "mode": h["mode"],
            "search_val_kl": best["validation"]["kl"],
            "kl_before": h["before"]["kl"], "kl_after": h["after"]["kl"],
            "kl_ratio": h["kl_ratio"], "ppl_before": h["before"]["ppl"],
            "ppl_after": h["after"]["ppl"], "dense_ppl": h["dense_ppl"],
            "steps": h["steps"], "tokens": h["tokens"], "train_s": h["train_seconds"],
            "tokens_per_s": h["tokens_per_second"], "wall_s": h["wall_seconds"],
            "peak_rss_mib": h["memory"]["peak_rss_mib"],
            "trained_params": h["trained_parameters"],
            "pruned_nonzero": h.get("pruned_weights_nonzero"),
        })  # fmt: skip
        curves[name] = h["curve"]
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "heal.csv", index=False)
    (out / "curves.json").write_text(json.dumps(curves, indent=1))
    _plot(curves, out / "curves.png")
    (out / "heal.md").write_text(_markdown(frame))
    print(frame.to_string(index=False))


def _markdown(frame: pd.DataFrame) -> str:
    """The table as Markdown (pandas' own needs tabulate, which searcher does not install)."""
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r] for r in frame.values]
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells]) + "\n"


def _plot(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        ax.plot([c["step"] for c in curve], [c["kl"] for c in curve], marker="o", label=name)
    ax.set_xlabel("distillation steps (4 x 256 tokens each)")
    ax.set_ylabel("held-out KL to dense")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
