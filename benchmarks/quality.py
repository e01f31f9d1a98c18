"""Search quality side by side: baselines and search algorithms at equal evaluations.

For each setting (space and budget) every method runs on the same model, calibration and
validation windows: the one-shot baselines (``uniform``, ``owl`` for sparsity, ``flap`` for
width, ``additive``), and the searches (``evo``, ``random``, ``tpe``, ``gp``, ``nsga2``,
``pymoo-ga``, plus the multi-objective ``nsga2-mo`` and ``pymoo-nsga2-mo`` that minimise the
cost beside KL) with the same number of full-fidelity-equivalent evaluations, for several
seeds. Calibration windows are the first windows of the text and validation windows the
last ones (held out); the search sees calibration KL only, and methods are compared on the
validation KL and perplexity of each one's best config.

Writes under ``--out`` (default results/bench/): quality.csv (one row per run), summary.csv
(mean and spread over seeds), curves-<setting>.png (best-so-far calibration KL against
evaluations), summary.md (the table and the targets' verdicts) and runs/ (every run
directory, so an interrupted benchmark picks up where it stopped).

    .venv/bin/python benchmarks/quality.py            # the full benchmark (hours, see README)
    .venv/bin/python benchmarks/quality.py --quick    # under 15 minutes on a 2-core CPU
    .venv/bin/python benchmarks/quality.py --no-run   # tables of every finished run only

Each evaluation budget after the first (``--evals 40,additive``: additive's own count in
each setting) is a setting of its own in the tables, named ``<setting>@<evals>``, with its
runs in ``runs/<setting>/<method>-e<evals>-s<seed>``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from searcher.pareto import pareto_front
from searcher.run import run as search
from searcher.score_cache import ENV
from searcher.spec import RunSpec

# setting -> (space, budget, cost objective for the multi-objective methods)
SETTINGS: dict[str, tuple[str, str, str]] = {
    "width-flops0.5": ("width", "flops=0.5", "flops"),
    "width-flops0.7": ("width", "flops=0.7", "flops"),
    "depth-blocks0.75": ("depth", "blocks=0.75", "blocks"),
    "sparsity-0.5": ("sparsity", "sparsity=0.5", "params"),
    "sparsity-0.6": ("sparsity", "sparsity=0.6", "params"),
    "sparsity-0.7": ("sparsity", "sparsity=0.7", "params"),
    # width and depth in one genome, against each alone, at the same FLOPs
    "joint-flops0.5": ("joint", "flops=0.5", "flops"),
    "depth-flops0.5": ("depth", "flops=0.5", "flops"),
}


@dataclass(frozen=True)
class Method:
    algo: str
    search: bool  # runs for the evaluation budget (else a one-shot baseline)
    spaces: tuple[str, ...] = ("width", "depth", "sparsity", "joint")
    multi_objective: bool = False
    init: str = "uniform"  # evo's first parent: a baseline's allocation
    space_options: tuple[tuple[str, Any], ...] = ()  # e.g. a finer sparsity grid
    follows: str = ""  # the paper setting a baseline follows


METHODS: dict[str, Method] = {
    "uniform": Method("uniform", False, follows="the same kept fraction in every gene"),
    # OWL's continuous layer ratios need a grid finer than the default 10%: 1% steps
    "owl": Method(
        "owl",
        False,
        ("sparsity",),
        space_options=(("step", 0.01),),
        follows="Yin et al. 2024: Wanda scores, M=5, lambda=0.08, per layer",
    ),
    "flap": Method(
        "flap",
        False,
        ("width", "joint"),
        follows="An et al. 2024: activation-aware unit scores standardised per "
        "layer and kind, one global threshold (no bias compensation)",
    ),
    "additive": Method(
        "additive", False, follows="EvoPress's additive baseline: 6 levels per gene alone, DP"
    ),
    "default": Method("evo", True, init="profile"),  # what `searcher run` does
    "evo": Method("evo", True),
    "random": Method("random", True),
    "tpe": Method("tpe", True),
    "gp": Method("gp", True),
    "nsga2": Method("nsga2", True),
    "pymoo-ga": Method("pymoo-ga", True),
    "nsga2-mo": Method("nsga2", True, multi_objective=True),
    "pymoo-nsga2-mo": Method("pymoo-nsga2", True, multi_objective=True),
    # Opt-in (--methods): evo started from additive's allocation, with additive's evaluations
    # on top of the search budget (additive must run before it in the same invocation).
    "evo+additive": Method("evo", True, init="additive"),
}


def seeded_by(name: str) -> str | None:
    """The method whose allocation starts this one (evo --init owl|flap|additive), if any."""
    init = METHODS[name].init
    return init if init not in ("uniform", "profile") else None


# Three seeds per search method everywhere (--seeds N gives N). Optuna's GP runs at width
# flops=0.5 only: its acquisition optimisation takes ~7 s per trial over the 60 width genes
# here (~300 s per 40-evaluation run against ~40 s for the others), and over the 210
# sparsity genes one run did not finish in 22 minutes (--methods ... names it again for any
# setting).
TARGETS = ("width-flops0.5", "sparsity-0.7")
ADDITIVE = "additive"  # an evaluation budget: what the additive baseline spent in the setting
FULL = {  # the settings the targets are judged on first
    "settings": [*TARGETS, *(s for s in SETTINGS if s not in TARGETS)],
    "methods": [m for m in METHODS if seeded_by(m) is None],
    "seeds": {s: 3 for s in SETTINGS},
    "skip": {(s, "gp") for s in SETTINGS if s != "width-flops0.5"},
    # the benchmark's budget, and the count additive needs in each setting (additive then
    # competes: at 40 it does not fit, and it is listed without being counted)
    "evals": [40.0, ADDITIVE],
}
QUICK = {
    "settings": ["width-flops0.5", "sparsity-0.7"],
    "methods": ["uniform", "flap", "owl", "default", "evo", "tpe", "pymoo-ga", "pymoo-nsga2-mo"],
    "seeds": {"width-flops0.5": 1, "sparsity-0.7": 1},
    "evals": [24.0],
}


def spec_for(
    args: argparse.Namespace, setting: str, name: str, seed: int, out: Path, evals: float
) -> RunSpec:
    space, budget, cost = SETTINGS[setting]
    method = METHODS[name]
    return RunSpec(
        model=args.model, space=space, budget=budget, algo=method.algo, init=method.init,
        space_options=dict(method.space_options),
        seed=seed, objectives=f"kl,{cost}" if method.multi_objective else "kl", evals=evals,
        offspring=args.offspring, stages=args.stages, random_batch=args.batch,
        seq_len=args.seq_len, importance_windows=args.importance_windows,
        validation_windows=args.validation_windows, threads=args.threads, out=str(out),
    )  # fmt: skip


def run_one(spec: RunSpec, run: bool = True) -> dict[str, Any] | None:
    """One run (or its saved result, if it finished before); its best-so-far curve too.
    None for a run not finished before, with ``run=False``."""
    out = Path(spec.out)
    saved = out / "bench.json"
    if saved.is_file() and same_spec(out / "run.json", spec):
        return json.loads(saved.read_text())
    if not run:
        return None
    if out.exists():
        shutil.rmtree(out)  # an interrupted run, or one with other settings: run it again
    curve: list[tuple[float, float]] = []

    def progress(p) -> None:
        if p.best_kl is not None:
            curve.append((p.spent, p.best_kl))

    t0 = time.perf_counter()
    result = search(spec, on_progress=progress)
    record = {
        "wall_s": time.perf_counter() - t0,
        "evals": result.evals,
        "best": {k: result.best[k] for k in ("calibration", "validation", "fractions")},
        "curve": curve,
    }
    saved.write_text(json.dumps(record))
    return record


def same_spec(run_json: Path, spec: RunSpec) -> bool:
    """Whether the run directory holds a run of ``spec`` (wherever it was written: a finished
    run copied from another benchmark directory counts)."""
    try:
        saved = json.loads(run_json.read_text())["spec"]
    except (OSError, ValueError, KeyError):
        return False
    want = json.loads(json.dumps(spec.to_dict()))
    return {**saved, "out": None} == {**want, "out": None}


def front_points(run_dir: Path, cost: str, full: int) -> np.ndarray:
    """(calibration KL, cost fraction) of the run's feasible full-fidelity trials."""
    trials = pd.read_parquet(run_dir / "trials.parquet")
    col = f"kl@{full}"
    done = trials[trials["feasible"] & trials[col].notna()]
    return done[[col, f"{cost}_fraction"]].to_numpy(dtype=float)


def hypervolume(points: np.ndarray, ideal: np.ndarray, nadir: np.ndarray) -> float:
    """Share of the box from ``ideal`` to ``nadir`` (both objectives scaled to [0, 1]) that
    the front of ``points`` dominates (pymoo's exact 2-D hypervolume)."""
    from pymoo.indicators.hv import HV

    if len(points) == 0:
        return 0.0
    scaled = (points - ideal) / np.where(nadir > ideal, nadir - ideal, 1.0)
    front = scaled[pareto_front(scaled.tolist())]
    front = front[(front < 1.0).all(axis=1)]
    return float(HV(ref_point=np.ones(2))(front)) if len(front) else 0.0


def evals_to_reach(curve: list[list[float]], target: float) -> float:
    """Evaluations after which a best-so-far curve is at or below ``target`` (inf: never)."""
    return next((spent for spent, kl in curve if kl <= target + 1e-12), float("inf"))


def summarise(rows: pd.DataFrame, out: Path) -> str:
    agg = (
        rows.groupby(["setting", "method"], sort=False)
        .agg(
            val_kl=("val_kl", "mean"),
            val_kl_sd=("val_kl", "std"),
            val_ppl=("val_ppl", "mean"),
            cal_kl=("cal_kl", "mean"),
            evals=("evals", "mean"),
            wall_s=("wall_s", "mean"),
            hv=("hv", "mean"),
            seeds=("seed", "count"),
        )  # fmt: skip
        .reset_index()
    )
    agg.to_csv(out / "summary.csv", index=False)
    lines = ["| setting | method | val KL (mean ± sd) | val ppl | evals | wall s | HV |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for _, r in agg.iterrows():
        sd = f" ± {r.val_kl_sd:.3f}" if r.seeds > 1 else ""
        lines.append(
            f"| {r.setting} | {r.method} | {r.val_kl:.3f}{sd} | {r.val_ppl:.1f} | "
            f"{r.evals:.0f} | {r.wall_s:.0f} | {'' if np.isnan(r.hv) else f'{r.hv:.3f}'} |"
        )
    follows = [f"- {m}: {METHODS[m].follows}" for m in dict.fromkeys(agg["method"])
               if METHODS[m].follows]  # fmt: skip
    lines += ["", "Baselines, and the setting each follows:", *follows]
    lines += ["", *targets(rows)]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def targets(rows: pd.DataFrame) -> list[str]:
    """The issue's targets for the default search, measured (whatever they come out as).

    A one-shot baseline that spent more evaluations than a setting's budget (additive at
    40) is listed there but not counted against the default: it competes at its own count
    (the ``<setting>@<evals>`` rows)."""
    out = ["Targets (the default search, `searcher run` without --algo):"]
    mean = rows.groupby(["setting", "method"])["val_kl"].mean()
    seeds = rows.groupby(["setting", "method"])["seed"].nunique()
    spent = rows.groupby(["setting", "method"])["evals"].mean()
    budget = rows.groupby("setting")["budget"].max()
    lowest = 0
    settings = [s for s in dict.fromkeys(rows["setting"]) if (s, "default") in mean]
    for s in settings:
        here = {m: v for (st, m), v in mean.items() if st == s and m != "default"}
        over = [m for m in here if not METHODS[m].search and spent[s, m] > budget[s] + 1e-9]
        others = {m: v for m, v in here.items() if m not in over}
        lost = sorted(m for m, v in others.items() if mean[s, "default"] >= v)
        lowest += not lost
        note = f"; not below {', '.join(f'{m} ({others[m]:.3f})' for m in lost)}" if lost else ""
        note += "".join(f"; {m} ({here[m]:.3f}) not counted: it needs {spent[s, m]:.0f} evals"
                        for m in over)  # fmt: skip
        out.append(
            f"- {s}: default val KL {mean[s, 'default']:.3f} (mean of {seeds[s, 'default']} "
            f"seeds, {budget[s]:.0f} evals), lower than {len(others) - len(lost)}/"
            f"{len(others)} other methods{note}"
        )
    out.append(f"- default lowest in {lowest} of {len(settings)} settings (target: all)")
    s = "width-flops0.5"
    if (s, "default") in mean and (s, "uniform") in mean:
        cut = 1 - mean[s, "default"] / mean[s, "uniform"]
        out.append(
            f"- {s}: default {100 * cut:.1f}% below uniform's val KL "
            f"({mean[s, 'default']:.3f} vs {mean[s, 'uniform']:.3f}; target >= 35%)"
        )
    for rival in ("pymoo-ga", "evo"):
        ratios = []
        for _, group in rows.groupby(["setting", "seed"]):
            by = {r.method: r for r in group.itertuples()}
            if "default" in by and rival in by and by[rival].curve:
                final = by[rival].curve[-1][1]
                ratios.append(evals_to_reach(by["default"].curve, final) / by[rival].evals)
        if ratios:
            out.append(
                f"- default reaches {rival}'s final calibration KL after a median "
                f"{np.median(ratios):.2f} of {rival}'s evaluations (target <= 0.5; "
                f"{sum(r <= 0.5 for r in ratios)}/{len(ratios)} setting-seed pairs meet it)"
            )
    return out


def plot_curves(rows: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for setting, group in rows.groupby("setting", sort=False):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method, runs in group.groupby("method", sort=False):
            if METHODS[method].search:
                grid = np.linspace(0, max(r.evals for r in runs.itertuples()), 200)
                ys = []
                for r in runs.itertuples():
                    xs = [c[0] for c in r.curve]
                    ks = [c[1] for c in r.curve]
                    ys.append([ks[max(0, np.searchsorted(xs, g, "right") - 1)]
                               if xs and g >= xs[0] else np.nan for g in grid])  # fmt: skip
                with warnings.catch_warnings():  # before a run's first full score: no value
                    warnings.simplefilter("ignore", RuntimeWarning)
                    mean = np.nanmean(np.array(ys, dtype=float), axis=0)
                ax.plot(grid, mean, label=method)
            else:
                ax.axhline(runs["cal_kl"].mean(), ls="--", lw=1, color="grey")
                ax.annotate(method, (0.01, runs["cal_kl"].mean()), xycoords=("axes fraction",
                            "data"), fontsize=7, color="grey", va="bottom")  # fmt: skip
        ax.set_xlabel("full-fidelity-equivalent evaluations")
        ax.set_ylabel("best calibration KL so far (mean over seeds)")
        ax.set_yscale("log")
        ax.set_title(f"{setting}: best-so-far KL")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        fig.savefig(out / f"curves-{setting}.png", dpi=120)
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a subset, under 15 minutes")
    parser.add_argument("--model", help="model directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--settings", help=f"comma-separated, from {', '.join(SETTINGS)}")
    parser.add_argument("--methods", help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument("--seeds", type=int, help="seeds per search method")
    parser.add_argument(
        "--evals",
        help="evaluations per search run: comma-separated budgets, each a number or "
        f"'{ADDITIVE}' (the count the additive baseline needs in the setting); "
        "default 40,additive (--quick: 24)",
    )
    parser.add_argument(
        "--no-run", action="store_true", help="report finished runs only, run nothing"
    )
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--importance-windows", type=int, default=4)
    parser.add_argument("--validation-windows", type=int, default=8)
    parser.add_argument("--stages", default="1:2,4:1", help="evo's stages; the last sets full")
    parser.add_argument("--offspring", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="random/Optuna/pymoo batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/bench")
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    if args.settings:
        plan["settings"] = args.settings.split(",")
    if args.methods:
        plan["methods"] = args.methods.split(",")
        plan["skip"] = set()
    if args.seeds:
        plan["seeds"] = {s: args.seeds for s in SETTINGS}
    if args.evals:
        try:
            plan["evals"] = [b if b == ADDITIVE else float(b) for b in args.evals.split(",")]
        except ValueError:
            parser.error(f"--evals takes numbers or '{ADDITIVE}', not {args.evals!r}")
    bad = [s for s in plan["settings"] if s not in SETTINGS]
    bad += [m for m in plan["methods"] if m not in METHODS]
    if bad:
        parser.error(f"unknown setting or method: {', '.join(bad)}")
    methods = plan["methods"]
    late = [m for i, m in enumerate(methods) if seeded_by(m) not in (None, *methods[:i])]
    if late:
        parser.error(f"{', '.join(late)} need their seed's method listed before them")
    full = int(args.stages.split(",")[-1].split(":")[0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the default's profile scores pass from seed to seed and setting to setting of the
    # same space (as they would between a user's runs), in a cache of the benchmark's own
    os.environ.setdefault(ENV, str(out / "score-cache"))

    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    t0 = time.perf_counter()

    def measure(setting: str, label: str, budget: float, name: str, evals: float) -> None:
        """Every seed of one method at one budget, appended to ``rows``."""
        method = METHODS[name]
        _, _, cost = SETTINGS[setting]
        tag = "" if budget == plan["evals"][0] or not method.search else f"-e{budget:g}"
        for seed in range(plan["seeds"].get(setting, 1) if method.search else 1):
            run_dir = out / "runs" / setting / f"{name}{tag}-s{seed}"
            spec = spec_for(args, setting, name, seed, run_dir, evals)
            rec = run_one(spec, run=not args.no_run)
            if rec is None:
                missing.append(str(run_dir))
                continue
            best = rec["best"]
            rows.append({
                "setting": label, "budget": budget, "method": name, "seed": seed,
                "evals": rec["evals"], "wall_s": rec["wall_s"],
                "cal_kl": best["calibration"]["kl"], "val_kl": best["validation"]["kl"],
                "val_ppl": best["validation"]["ppl"],
                "dense_ppl": best["validation"]["dense_ppl"], "curve": rec["curve"],
                "run_dir": str(run_dir), "cost": cost,
                **{f"{k}_fraction": v for k, v in best["fractions"].items()},
            })  # fmt: skip
            print(f"[{time.perf_counter() - t0:6.0f}s] {label} {name} seed {seed}: "
                  f"val KL {best['validation']['kl']:.4f}, {rec['evals']:.0f} evals, "
                  f"{rec['wall_s']:.0f} s", flush=True)  # fmt: skip

    for setting in plan["settings"]:
        space = SETTINGS[setting][0]
        names = [m for m in plan["methods"] if space in METHODS[m].spaces
                 and (setting, m) not in plan.get("skip", ())]  # fmt: skip
        for budget in plan["evals"]:
            if budget == ADDITIVE:  # additive's own count: it runs (or is read) first
                where = out / "runs" / setting / "additive-s0"
                rec = run_one(spec_for(args, setting, "additive", 0, where, 10**6), not args.no_run)
                if rec is None:
                    missing.append(str(where))
                    continue
                budget = float(rec["evals"])
            label = setting if budget == plan["evals"][0] else f"{setting}@{budget:g}"
            for name in names:
                # Baselines take what they need (additive: one window per level scored
                # alone); a seeded search gets its seed's evaluations on top of the budget.
                evals = budget if METHODS[name].search else 10**6
                if seeded_by(name) is not None:
                    ran = [r for r in rows if (r["setting"], r["method"]) ==
                           (label, METHODS[name].init)]  # fmt: skip
                    if not ran:
                        continue
                    evals += ran[0]["evals"]
                measure(setting, label, budget, name, evals)
    if not rows:
        print("no finished runs", flush=True)
        return 0
    frame = pd.DataFrame(rows)
    # Hypervolume of each multi-objective run's (calibration KL, cost) front, in the box from
    # (KL 0, the least cost any such run reached) to (the uniform allocation's KL, the most
    # cost any run of the setting used): 1 would be a point at KL 0 and that least cost.
    hv = {}
    for _, group in frame.groupby("setting", sort=False):
        multi = [r for r in group.itertuples() if METHODS[r.method].multi_objective]
        pts = {r.run_dir: front_points(Path(r.run_dir), r.cost, full) for r in group.itertuples()}
        uniform = group[group["method"] == "uniform"]["cal_kl"]
        if not multi or uniform.empty:
            continue
        allp = np.vstack([p for p in pts.values() if len(p)])
        least = np.vstack([pts[r.run_dir] for r in multi if len(pts[r.run_dir])])[:, 1].min()
        ideal = np.array([0.0, least])
        nadir = np.array([float(uniform.iloc[0]), allp[:, 1].max()])
        hv.update({r.Index: hypervolume(pts[r.run_dir], ideal, nadir) for r in multi})
    frame["hv"] = pd.Series(hv, dtype=float)
    frame.drop(columns=["curve"]).to_csv(out / "quality.csv", index=False)
    plot_curves(frame, out)
    text = summarise(frame, out)
    print(text)
    if missing:
        where = pd.Series([str(Path(m).parent.name) for m in dict.fromkeys(missing)])
        counts = ", ".join(f"{s} {n}" for s, n in where.value_counts(sort=False).items())
        print(f"{len(where)} runs not finished (--no-run): {counts}; first: {missing[0]}")
    print(f"wrote {out}/quality.csv, summary.csv, summary.md, curves-*.png "
          f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
