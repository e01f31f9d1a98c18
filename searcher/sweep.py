"""Several budgets in one command: ``--budget flops=0.4,0.5,0.6,0.7``.

Each budget is its own run, in a subdirectory of the sweep's, searched with the same
settings one after another; single-unit profile scores pass between them through the score
cache (``searcher.score_cache``), so the budgets after the first pay mostly for their own
refinement. The sweep's directory holds sweep.json (the budgets, each one's best config and
where its run is) and front.png (each budget's best, validation KL against cost).
``searcher run --resume DIR`` goes on with the budget that was interrupted and runs the
ones not started.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from searcher.budget import Budget
from searcher.engine import Progress
from searcher.errors import SearcherError
from searcher.results import write_json
from searcher.rundir import SWEEP, claimed
from searcher.spec import RunSpec

FILE = SWEEP
PLOT = "front.png"


@dataclass(frozen=True)
class SweepResult:
    out: Path
    runs: list[Any]  # searcher.run.RunResult per budget, in the order given
    seconds: float


def is_sweep(budget: str) -> bool:
    return len(Budget.sweep(budget)) > 1


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / FILE).is_file()


def sweep(
    spec: RunSpec,
    on_progress: Callable[[Progress], None] | None = None,
    on_phase: Callable[[str], None] = lambda text: None,
    resume: bool = False,
) -> SweepResult:
    """Search every budget of ``spec.budget`` (a sweep) and write the sweep directory."""
    from searcher.run import default_out, prepare, run

    spec = spec.resolved()
    texts = Budget.sweep(spec.budget)
    out = Path(spec.out) if spec.out else default_out(spec)
    for text in texts:  # every budget's run checked before the first one starts
        prepare(replace(spec, budget=text, out=str(out / _slug(text))), resume)
    started = dt.datetime.now()
    results = []
    with claimed(out, resume):
        info = _read(out) if resume else {"spec": spec.to_dict(), "started": str(started)}
        info["status"] = "running"
        info.setdefault("budgets", [{"budget": t, "run": _slug(t)} for t in texts])
        write_json(out / FILE, info)
        for i, entry in enumerate(info["budgets"]):
            run_dir = out / entry["run"]
            done = _finished(run_dir)
            on_phase(f"budget {entry['budget']} ({i + 1}/{len(texts)})")
            if done is not None:
                results.append(done)
                continue
            again = resume and (run_dir / "run.json").is_file()
            sub = replace(spec, budget=entry["budget"], out=str(run_dir))
            results.append(run(sub, on_progress, on_phase, resume=again))
            entry["best"] = _summary(results[-1].best)
            write_json(out / FILE, info)
        for entry, result in zip(info["budgets"], results, strict=True):
            entry["best"] = _summary(result.best)
        info["status"] = "complete"
        info["finished"] = str(dt.datetime.now())
        write_json(out / FILE, info)
        plot(out / PLOT, info["budgets"], swept_metric(texts), spec.space)
    seconds = (dt.datetime.now() - started).total_seconds()
    return SweepResult(out, results, seconds)


def resume_sweep(
    sweep_dir: str,
    on_progress: Callable[[Progress], None] | None = None,
    on_phase: Callable[[str], None] = lambda text: None,
    **placement: Any,
) -> SweepResult:
    """Continue an interrupted sweep; ``placement`` as for ``searcher.run.resume``."""
    from searcher.run import placed

    spec = placed(_read(Path(sweep_dir))["spec"], sweep_dir, placement)
    return sweep(spec, on_progress, on_phase, resume=True)


def _read(out: Path) -> dict[str, Any]:
    try:
        info = json.loads((out / FILE).read_text(encoding="utf-8"))
        info["spec"], info["budgets"]  # noqa: B018 (both must be there)
        return info
    except (OSError, ValueError, KeyError, TypeError):
        raise SearcherError(
            f"--resume {out}: no readable {FILE} there; pass a directory that "
            "`searcher run --budget KEY=A,B,...` made"
        ) from None


def _slug(text: str) -> str:
    return Budget.parse(text).slug()


class _Finished:
    """A budget's run that completed before (read back from its directory)."""

    def __init__(self, out: Path, info: dict[str, Any], best: dict[str, Any]) -> None:
        self.out, self.best = out, best
        self.trials, self.evals = info.get("trials", 0), info.get("evals", 0.0)
        self.seconds = info.get("timings", {}).get("total", 0.0)


def _finished(run_dir: Path) -> _Finished | None:
    try:
        info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        if info.get("status") != "complete":
            return None
        return _Finished(run_dir, info, json.loads((run_dir / "best.json").read_text()))
    except (OSError, ValueError):
        return None


def _summary(best: dict[str, Any]) -> dict[str, Any]:
    keys = ("genes", "fractions", "calibration", "validation")
    return {k: best[k] for k in keys if k in best}


def swept_metric(texts: list[str]) -> str:
    """The cost metric whose limit changes from one budget of the sweep to the next."""
    parsed = [Budget.parse(t) for t in texts]
    for metric in sorted(parsed[0].metrics):
        values = {(b.limits.get(metric), b.absolute.get(metric)) for b in parsed}
        if len(values) > 1:
            return metric
    return sorted(parsed[0].metrics)[0]


def plot(path: Path, budgets: list[dict[str, Any]], metric: str, space: str) -> None:
    """Each budget's best: validation KL against the swept metric's fraction of dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [b for b in budgets if metric in b.get("best", {}).get("fractions", {})]
    if not rows:
        return
    xs = [b["best"]["fractions"][metric] for b in rows]
    ys = [b["best"]["validation"]["kl"] for b in rows]
    order = sorted(range(len(xs)), key=xs.__getitem__)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.plot([xs[i] for i in order], [ys[i] for i in order], "-o", c="tab:orange")
    for b, x, y in zip(rows, xs, ys, strict=True):
        ax.annotate(b["budget"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(f"{metric} (fraction of dense)")
    ax.set_ylabel("KL to dense (validation)")
    ax.set_yscale("log")
    ax.set_title(f"{space}: the best config of each budget", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
