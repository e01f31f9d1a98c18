"""What a run leaves behind: trials.parquet, pareto.json, best.json, run.json, pareto.png."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from searcher.engine import Trial
from searcher.pareto import pareto_front


def write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def trials_frame(trials: Sequence[Trial], fidelities: Sequence[int]) -> pd.DataFrame:
    rows = []
    for t in trials:
        row: dict[str, Any] = {
            "number": t.number,
            "origin": t.origin,
            "genes": list(t.candidate),
            "feasible": t.feasible,
            "windows": t.windows,
            "kl": t.fitness() if t.windows else None,  # unscored: measured over budget
            "ppl": math.exp(sum(t.nll) / len(t.nll)) if t.nll else None,
            "seconds": t.seconds,
        }
        if t.trained:  # training-aware selection: KL after the most steps it had
            steps = max(t.trained)
            row["trained_steps"], row["trained_kl"] = steps, t.trained[steps].fitness()
        for metric, value in t.costs.items():
            row[metric] = value
            row[f"{metric}_fraction"] = t.fractions[metric]
        for w in fidelities:
            row[f"kl@{w}"] = t.fitness(w) if t.windows >= w else None
        rows.append(row)
    return pd.DataFrame(rows)


def front(trials: Sequence[Trial], full: int, metric: str) -> list[Trial]:
    """Non-dominated full-fidelity trials over (cost ``metric``, calibration KL), by cost."""
    scored = [t for t in trials if t.windows >= full]
    idx = pareto_front([(t.costs[metric], t.fitness(full)) for t in scored])
    return [scored[i] for i in idx]


def plot_front(
    path: Path, trials: Sequence[Trial], front_trials: Sequence[Trial], full: int,
    best: Trial | None, metric: str, limit: float | None, title: str,
) -> None:  # fmt: skip
    """KL against the cost ``metric`` (a fraction of dense) for every trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def xs(ts: Sequence[Trial]) -> list[float]:
        return [t.fractions[metric] for t in ts]

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    low = [t for t in trials if 0 < t.windows < full]
    high = [t for t in trials if t.windows >= full]
    if low:
        ax.scatter(xs(low), [t.fitness() for t in low], s=8, c="0.8",
                   label=f"scored on fewer windows ({len(low)})")  # fmt: skip
    ax.scatter(xs(high), [t.fitness(full) for t in high], s=14, c="tab:blue",
               label=f"scored on {full} windows ({len(high)})")  # fmt: skip
    ax.plot(xs(front_trials), [t.fitness(full) for t in front_trials], "-o", c="tab:orange",
            ms=4, label="Pareto front")  # fmt: skip
    if best is not None:
        ax.scatter(xs([best]), [best.fitness(full)], marker="*", s=180, c="tab:red", zorder=5,
                   label="best under budget")  # fmt: skip
    if limit is not None:
        ax.axvline(limit, ls="--", c="0.4", lw=1, label="budget")
    ax.set_xlabel(f"{metric} (fraction of dense)")
    ax.set_ylabel("KL to dense (calibration)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, framealpha=0.85)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
