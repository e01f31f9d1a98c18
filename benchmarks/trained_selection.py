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
each heal in a process of its own.

Then the ranking itself, apart from the budget: the plain run's ``--rank-top`` best distinct
candidates, each scored again after each of ``--rank-steps`` steps of the same training. Does a
short training reorder them, and does its order predict the order after a long one better than
the untrained order does?

Writes under ``--out`` (default results/trained-selection/): runs/, healed/, ranking.json,
summary.json and summary.md; an interrupted benchmark picks up where it stopped.

    .venv/bin/python benchmarks/trained_selection.py          # about 70 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import functools
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


@functools.cache  # one model load per run, however many candidates are scored
def scorer_of(run: Path):
    """The run's best genes and a scorer of candidates after training, as a ``--select
    trained:STEPS`` search scores them (same windows, batches, seed and reference)."""
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
    return genes, scorer_for(session.key, space, ev, session.loaded.tokenizer, seed), full


def trained_kl(run: Path, steps: int) -> dict:
    """The run's winner's calibration KL after ``steps`` steps of training."""
    genes, scorer, full = scorer_of(run)
    t0 = time.perf_counter()
    kl = float(scorer.score(genes, steps, 0, full).kl.mean())
    return {"steps": steps, "kl": kl, "seconds": time.perf_counter() - t0}


def ranking(out: Path, run: Path, top: int, steps: list[int]) -> dict:
    """Do a few training steps reorder the best candidates? The ``top`` distinct feasible
    candidates of ``run`` scored on all calibration windows, each scored again after each of
    ``steps`` steps of training (a fresh training per count: the cosine schedule spans it).
    Kendall's tau between the orders, and the winner under each. Restartable: every score is
    written to ranking.json as it is made."""
    import pandas as pd
    from scipy.stats import kendalltau

    path = out / "ranking.json"
    done = json.loads(path.read_text()) if path.is_file() else {"candidates": []}
    trials = pd.read_parquet(run / "trials.parquet")
    full = int(trials["windows"].max())
    best = trials[(trials["windows"] == full) & trials["feasible"]].sort_values("kl")
    seen, picks = set(), []
    for row in best.itertuples():
        key = tuple(int(g) for g in row.genes)
        if key not in seen:
            seen.add(key)
            picks.append({
                "trial": int(row.number), "genes": list(key), "kl": {"0": float(row.kl)},
                "costs": {"flops": row.flops, "params": row.params},
                "fractions": {"flops": row.flops_fraction, "params": row.params_fraction},
            })  # fmt: skip
        if len(picks) == top:
            break
    by_trial = {c["trial"]: c for c in done["candidates"]}
    picks = [{**p, **by_trial.get(p["trial"], {})} for p in picks]
    scorer = None
    for pick in picks:
        for n in steps:
            if str(n) in pick["kl"]:
                continue
            if scorer is None:
                _, scorer, _ = scorer_of(run)
            t0 = time.perf_counter()
            pick["kl"][str(n)] = float(scorer.score(pick["genes"], n, 0, full).kl.mean())
            pick.setdefault("seconds", {})[str(n)] = time.perf_counter() - t0
            done["candidates"] = picks
            path.write_text(json.dumps(done, indent=1))
    counts = ["0", *(str(n) for n in steps)]
    kls = {n: [p["kl"][n] for p in picks] for n in counts}
    winner = {n: picks[min(range(len(picks)), key=kls[n].__getitem__)]["trial"] for n in counts}
    tau = {
        f"{a}-{b}": float(kendalltau(kls[a], kls[b]).statistic)
        for i, a in enumerate(counts)
        for b in counts[i + 1 :]
    }
    done.update(candidates=picks, winner=winner, kendall_tau=tau, steps=steps, top=top)
    path.write_text(json.dumps(done, indent=1))
    return done


def config_of_trial(out: Path, run: Path, pick: dict) -> Path:
    """A config file (best.json's form) for one of ``run``'s trials, for ``searcher heal``."""
    path = out / f"trial-{pick['trial']}.config.json"
    if not path.is_file():
        best = json.loads((run / "best.json").read_text())
        _, scorer, full = scorer_of(run)
        header = ("searcher", "model", "dtype", "space", "data", "budget")
        config = {k: best[k] for k in header} | {
            "genes": pick["genes"], "config": scorer.space.describe(tuple(pick["genes"])),
            "costs": pick["costs"], "fractions": pick["fractions"], "feasible": True,
            "calibration": {"kl": pick["kl"]["0"], "windows": full}, "trial": pick["trial"],
        }  # fmt: skip
        path.write_text(json.dumps(config, indent=1))
    return path


def healed_row(h: dict) -> dict:
    """What the summary keeps of a heal.json."""
    return {
        "steps": h["steps"], "kl_before": h["before"]["kl"], "kl_after": h["after"]["kl"],
        "ppl_after": h["after"]["ppl"], "dense_ppl": h["dense_ppl"],
        "train_seconds": h["train_seconds"],
    }  # fmt: skip


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
    ap.add_argument("--rank-top", type=int, default=8, help="plain's best N, reranked")
    ap.add_argument("--rank-steps", default="4,50", help="training steps they are reranked at")
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
        summary[name]["healed"] = healed_row(heal(out, name, run, args.heal_steps))
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
    rank = ranking(out, runs["plain"], args.rank_top, [int(n) for n in args.rank_steps.split(",")])
    # what reranking plain's best by the shortest training would deploy, healed the same way
    short = str(rank["steps"][0])
    if rank["winner"][short] != summary["plain"]["trial"]:
        pick = next(c for c in rank["candidates"] if c["trial"] == rank["winner"][short])
        h = heal(out, "reranked", config_of_trial(out, runs["plain"], pick), args.heal_steps)
        summary["reranked"] = {
            "trial": pick["trial"], "untrained_kl": pick["kl"]["0"],
            "trained_kl": pick["kl"][short], "healed": healed_row(h),
        }  # fmt: skip
        summary_path.write_text(json.dumps(summary, indent=1))
    counts = ["0", *(str(n) for n in rank["steps"])]
    lines += [
        "",
        f"The plain run's {args.rank_top} best distinct candidates, calibration KL after N steps:",
        "",
        "| trial | " + " | ".join(f"N={n}" for n in counts) + " |",
        "|---|" + "---|" * len(counts),
    ]
    for c in rank["candidates"]:
        lines.append(f"| {c['trial']} | " + " | ".join(f"{c['kl'][n]:.4f}" for n in counts) + " |")
    lines += [
        "",
        "winner (trial) at N: " + ", ".join(f"{n}: {t}" for n, t in rank["winner"].items()),
        "Kendall tau: " + ", ".join(f"{k}: {v:.3f}" for k, v in rank["kendall_tau"].items()),
    ]
    if "reranked" in summary:
        r = summary["reranked"]
        lines += [
            "",
            f"Plain's best reranked by KL after {short} steps: trial {r['trial']}, healed "
            f"{args.heal_steps} steps: held-out KL {r['healed']['kl_before']:.4f} -> "
            f"{r['healed']['kl_after']:.4f}, ppl {r['healed']['ppl_after']:.2f}",
        ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    selection = summary["trained"]["selection"]
    print(f"winner changed: {summary['winner_changed']}; trained run: {selection}")


if __name__ == "__main__":
    main()
