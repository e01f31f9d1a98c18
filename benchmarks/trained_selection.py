"""Training-aware selection: does it change the winner, and does its winner heal better?

On the embedded SmolLM2-135M at width flops=0.5 (``--preset quick``), two evo searches with
the same seed and the same ``--evals`` (training counted in window evaluations, see
``searcher.trained_selection``):

- ``plain``: ranked by the KL of each candidate as pruned;
- ``trained``: ``--select trained:STEPS``, the last stage ranked by the KL after STEPS
  distillation steps of 4x256 tokens.

Then each winner is scored the other way (the plain winner after STEPS steps, with the same
scorer and seed the trained search used), and both winners are healed for ``--heal-steps``
steps (``searcher heal``, 4x256 tokens a step, held-out = the last 16 windows of the text),
each heal in a process of its own. Writes under ``--out`` (default results/trained-selection/):
runs/, healed/, summary.json and summary.md; an interrupted benchmark picks up where it stopped.

    .venv/bin/python benchmarks/trained_selection.py          # about 1.5 hours on 2 cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SEARCHER = [sys.executable, "-m", "searcher"]


def search(out: Path, name: str, evals: int, select: str) -> Path:
    run = out / "runs" / name
    if not (run / "best.json").is_file():
        cmd = [*SEARCHER, "run", "--space", "width", "--budget", "flops=0.5", "--preset",
               "quick", "--evals", str(evals), "--select", select, "--out", str(run)]  # fmt: skip
        if (run / "run.json").is_file():
            cmd = [*SEARCHER, "run", "--resume", str(run)]
        subprocess.run(cmd, check=True)
    return run


def trained_kl(run: Path, steps: int) -> dict:
    """The run's winner's calibration KL after ``steps`` steps, scored as a ``--select
    trained:steps`` search scores (same windows, batches, seed and reference)."""
    import torch

    from searcher.fitness import Evaluator
    from searcher.run import read_config, session_of_config
    from searcher.trained_selection import scorer_for

    torch.set_num_threads(2)
    config = read_config(str(run / "best.json"), None)
    session, genes = session_of_config(str(run), config)
    space, full = session.space, config["calibration"]["windows"]
    ev = Evaluator(
        session.loaded.model, session.windows.calibration[:full], space.apply, space.dense(),
        config["data"]["batch_size"],
    )  # fmt: skip
    seed = json.loads((run / "run.json").read_text())["spec"]["seed"]
    scorer = scorer_for(session.key, space, ev, session.loaded.tokenizer, seed)
    t0 = time.perf_counter()
    kl = float(scorer.score(genes, steps, 0, full).kl.mean())
    return {"steps": steps, "kl": kl, "seconds": time.perf_counter() - t0}


def heal(out: Path, name: str, run: Path, steps: int) -> dict:
    healed = out / "healed" / name
    if not (healed / "heal.json").is_file():
        cmd = [*SEARCHER, "heal", str(run), "--out", str(healed), "--steps", str(steps),
               "--batch-size", "4", "--seq-len", "256", "--json"]  # fmt: skip
        if (healed / "checkpoints").is_dir():
            cmd.append("--resume")
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((healed / "heal.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/trained-selection")
    ap.add_argument("--evals", type=int, default=400)
    ap.add_argument("--steps", type=int, default=4, help="STEPS of --select trained:STEPS")
    ap.add_argument("--heal-steps", type=int, default=50)
    args = ap.parse_args()
    out = Path(args.out)
    runs = {
        "plain": search(out, "plain", args.evals, "plain"),
        "trained": search(out, "trained", args.evals, f"trained:{args.steps}"),
    }
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    for name, run in runs.items():
        best = json.loads((run / "best.json").read_text())
        info = json.loads((run / "run.json").read_text())
        row = summary.setdefault(name, {})
        row.update(
            genes=best["genes"], trial=best["trial"], untrained_kl=best["calibration"]["kl"],
            validation_kl=best["validation"]["kl"], validation_ppl=best["validation"]["ppl"],
            evals=info["evals"], search_seconds=info["timings"]["search"],
            selection=info.get("selection"),
        )  # fmt: skip
        if "trained" in best["calibration"]:
            row["trained_kl"] = best["calibration"]["trained"]["kl"]
        elif "trained_kl" not in row:
            row["trained_kl"] = trained_kl(run, args.steps)["kl"]
        summary_path.write_text(json.dumps(summary, indent=1))
    for name, run in runs.items():
        h = heal(out, name, run, args.heal_steps)
        summary[name]["healed"] = {
            "steps": h["steps"], "kl_before": h["before"]["kl"], "kl_after": h["after"]["kl"],
            "ppl_after": h["after"]["ppl"], "dense_ppl": h["dense_ppl"],
            "train_seconds": h["train_seconds"],
        }  # fmt: skip
        summary_path.write_text(json.dumps(summary, indent=1))
    summary["winner_changed"] = summary["plain"]["genes"] != summary["trained"]["genes"]
    summary["settings"] = vars(args)
    summary_path.write_text(json.dumps(summary, indent=1))
    lines = [
        "| search | evals | search s | untrained KL | KL after "
        f"{args.steps} steps | val KL | healed {args.heal_steps} steps: held-out KL | ppl |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in runs:
        r = summary[name]
        lines.append(
            f"| {name} | {r['evals']:.1f} | {r['search_seconds']:.0f} | {r['untrained_kl']:.4f} "
            f"| {r['trained_kl']:.4f} | {r['validation_kl']:.4f} | {r['healed']['kl_after']:.4f} "
            f"| {r['healed']['ppl_after']:.2f} |"
        )
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    selection = summary["trained"]["selection"]
    print(f"winner changed: {summary['winner_changed']}; trained run: {selection}")


if __name__ == "__main__":
    main()
