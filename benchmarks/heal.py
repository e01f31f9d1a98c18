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

``--memory`` measures instead what healing holds: each case (full fine-tuning, LoRA r=16,
the sparsity config; with and without ``--gradient-checkpointing``) is a ``searcher heal``
of ``--steps`` (3 by default) steps of 4x256 tokens with a checkpoint after step 2 and the
held-out KL (16 windows of 256) after the last, in a fresh process under
``/usr/bin/time -v``, on the embedded SmolLM2-135M and on the 427 M random Llama of
``benchmarks/memory.py``. Memory peaks in the first steps (the optimizer's state exists
from the first step on; every later step allocates the same) and in an evaluation, so a few
steps measure it. Configs are the ``uniform`` baseline's at width flops=0.5 and sparsity
70%: the shapes a config has, not its search, set the memory. Peaks are reported against
the dense model's weight bytes, above ``runtime`` (Python with searcher, torch and
transformers imported and the tokenizer loaded: ``benchmarks/memory.py``'s definition).
``--code DIR`` runs another checkout's searcher (``--label old``), for before/after.
Writes ``benchmarks/results/heal-memory[-TAG].json``, adding to what is there:

    .venv/bin/python benchmarks/heal.py --memory
    .venv/bin/python benchmarks/heal.py --memory --code /tmp/old-heal --label old \
        --cases full,lora,sparsity
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from latency_models.backends import cpu_name

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
    ap.add_argument("--steps", type=int, help="150 (--memory: 3)")
    ap.add_argument("--cases", help="comma-separated case names (default: all)")
    ap.add_argument("--memory", action="store_true", help="measure peak memory instead")
    ap.add_argument("--models", default=",".join(MODELS), help="--memory: models to heal")
    ap.add_argument("--code", help="--memory: a searcher checkout to run instead of this one")
    ap.add_argument("--label", default="new", help="--memory: the name of --code's rows")
    ap.add_argument("--tag", default="", help="--memory: results file heal-memory-TAG.json")
    args = ap.parse_args()
    if args.memory:
        memory(args)
        return
    args.steps = args.steps or 150
    args.cases = args.cases or ",".join(CASES)
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


# --memory: name -> (space, budget, heal flags)
MEMORY_CASES: dict[str, tuple[str, str, list[str]]] = {
    "full": ("width", "flops=0.5", []),
    "full-ckpt": ("width", "flops=0.5", ["--gradient-checkpointing"]),
    "lora": ("width", "flops=0.5", ["--lora", "16"]),
    "lora-ckpt": ("width", "flops=0.5", ["--lora", "16", "--gradient-checkpointing"]),
    "sparsity": ("sparsity", "sparsity=0.7", []),
    "sparsity-ckpt": ("sparsity", "sparsity=0.7", ["--gradient-checkpointing"]),
}
MODELS = ("embedded", "random427m")
RESULTS = Path(__file__).resolve().parent / "results"


def memory(args: argparse.Namespace) -> None:
    """``--memory``: peak RSS of ``searcher heal`` per model and case (see the docstring)."""
    from memory import (
        build,
        peak_rss,
        runtime_rss,
    )  # benchmarks/memory.py: its model, its measurement

    from searcher.models import load

    steps = args.steps or 3
    cases = (args.cases or ",".join(MEMORY_CASES)).split(",")
    work = Path(args.out if args.out != "results/heal" else "results/heal-memory").resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.code:  # the heals (subprocesses) run another checkout's searcher and spaces:
        # first on the path, and the working directory (which ``python -m`` puts before it)
        os.environ["PYTHONPATH"] = str(Path(args.code).resolve())
        os.chdir(args.code)
    result_file = RESULTS / f"heal-memory{'-' + args.tag if args.tag else ''}.json"
    loaded = load(None, "cpu", "float32", False)  # the embedded model: its tokenizer, its bytes
    tokenizer = work / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        loaded.tokenizer.save_pretrained(tokenizer)
    weights = {"embedded": sum(p.numel() * p.element_size() for p in loaded.model.parameters())}
    del loaded
    big = work / "random427m"
    if "random427m" in args.models.split(","):
        if not (big / "weight_bytes").is_file():
            (big / "weight_bytes").write_text(str(build(big)))
        weights["random427m"] = int((big / "weight_bytes").read_text())
    runtime = runtime_rss(tokenizer)[0]
    for model in args.models.split(","):
        flags = [] if model == "embedded" else ["--model", str(big)]
        for case in cases:
            space, budget, extra = MEMORY_CASES[case]
            run = work / "runs" / f"{model}-{space}-{budget.replace('=', '')}"
            if not (run / "best.json").is_file():
                subprocess.run(
                    [*SEARCHER, "run", *flags, "--space", space, "--budget", budget, "--algo",
                     "uniform", "--seq-len", "128", "--threads", "1", "--out", str(run)],
                    check=True, stdout=subprocess.DEVNULL,
                )  # fmt: skip
            healed = work / "healed" / f"{args.label}-{model}-{case}"
            shutil.rmtree(healed, ignore_errors=True)
            command = [
                *SEARCHER, "heal", str(run), "--out", str(healed), "--steps", str(steps),
                "--batch-size", "4", "--seq-len", "256", "--checkpoint-every", "2",
                "--eval-every", str(steps), "--json", *extra,
            ]  # fmt: skip
            rss, wall = peak_rss(command)
            h = json.loads((healed / "heal.json").read_text())
            student = (healed / "model.safetensors").stat().st_size
            row = {
                "model": model, "case": case, "label": args.label, "space": space,
                "budget": budget, "flags": " ".join(extra), "steps": steps,
                "weights_bytes": weights[model], "student_file_bytes": student,
                "student_over_dense": round(student / weights[model], 3),
                "trained_parameters": h["trained_parameters"],
                "runtime_bytes": runtime, "peak_rss_bytes": rss,
                "above_runtime_over_weights": round((rss - runtime) / weights[model], 3),
                "peak_over_weights": round(rss / weights[model], 3),
                "kl_before": h["before"]["kl"], "kl_after": h["after"]["kl"],
                "ppl_after": h["after"]["ppl"], "dense_ppl": h["dense_ppl"],
                "losses": h["losses"], "curve": h["curve"], "wall_s": round(wall, 1),
                "machine": f"{cpu_name()}, {os.cpu_count()} cores",
                "date": time.strftime("%Y-%m-%d"),
                "command": " ".join(["searcher", *command[3:]]),
            }  # fmt: skip
            shutil.rmtree(healed, ignore_errors=True)
            _add(result_file, row)
            print(f"{model} {case} {args.label}: peak {rss / 2**20:.0f} MiB, above runtime "
                  f"{row['above_runtime_over_weights']:.2f}x weights, KL {h['before']['kl']:.4f}"
                  f" -> {h['after']['kl']:.4f}", flush=True)  # fmt: skip


def _add(path: Path, row: dict) -> None:
    """``row`` into the results file, in place of an earlier row of its model, case and label
    (read again each time: benchmarks of the old and the new code may run side by side)."""
    done = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    key = (row["model"], row["case"], row["label"])
    done["rows"] = [r for r in done["rows"] if (r["model"], r["case"], r["label"]) != key]
    done["rows"].append(row)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(done, indent=1) + "\n")
    frame = pd.DataFrame(done["rows"]).drop(columns=["losses", "curve", "command"])
    frame.to_csv(path.with_suffix(".csv"), index=False)


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
