"""Latency for searcher's spaces: profile a model's space on a device, load and check its
table, price candidates with it, measure candidates, and validate the table's predictions."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import spaces
from latency_models.backends import Backend, Measurement, Timing, backend
from latency_models.graph import DecoderWeights
from latency_models.latency_table import Block, LatencyTable
from latency_models.profile import BLOCK_TIMING, MODEL_TIMING, architecture, profile
from latency_models.table import CostTable
from latency_models.workload import KINDS, Workload, both
from searcher.errors import SearcherError
from spaces.base import digest

TABLE_DIR = Path("results") / "latency"


@dataclass(frozen=True)
class LatencySettings:
    """Where and what to time: the device, the workload shapes, the threads."""

    device: str = "ort-cpu"
    batch: int = 1
    seq_len: int = 128
    threads: int | None = None  # None: every core

    def __post_init__(self) -> None:
        if self.batch < 1 or self.seq_len < 1:
            raise SearcherError("--latency-batch / --latency-seq must be at least 1")

    @property
    def workloads(self) -> tuple[Workload, Workload]:
        return both(self.batch, self.seq_len)

    def backend(self) -> Backend:
        return backend(self.device, self.threads)


def check_workload(kind: str) -> str:
    if kind not in KINDS:
        raise SearcherError(f"unknown workload {kind!r}: choose one of {', '.join(KINDS)}")
    return kind


def default_table_path(
    identity: dict[str, Any], settings: LatencySettings, space: spaces.SearchSpace
) -> Path:
    """results/latency/<model>-<device>-t<threads>-b<B>-s<S>-<space>[-<options digest>].json:
    one table per thing its numbers depend on, so profiling one never overwrites another."""
    name = str(identity.get("source", "model")).rsplit(":", 1)[-1].rstrip("/")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name) or "model"
    tag = f"{space.name}-{digest(sorted(space.options().items()))[:8]}"
    threads = settings.backend().threads
    return TABLE_DIR / (
        f"{name}-{settings.device}-t{threads}-b{settings.batch}-s{settings.seq_len}-{tag}.json"
    )


def table_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def space_shapes(space: spaces.SearchSpace) -> dict[str, list[int]]:
    """Every block size a space's candidates can run, per kind."""
    fixed, genes = space.blocks()
    out: dict[str, set[int]] = {}
    for kind, size in [*fixed, *(b for gene in genes for b in gene if b is not None)]:
        out.setdefault(kind, set()).add(size)
    return {k: sorted(v - {0}) for k, v in out.items()}


def candidate_blocks(space: spaces.SearchSpace, genes: Sequence[int]) -> list[Block]:
    fixed, per_gene = space.blocks()
    return [*fixed, *(b for g, lv in zip(per_gene, genes) if (b := g[lv]) is not None)]


def candidate_weights(space: spaces.SearchSpace, genes: Sequence[int]) -> DecoderWeights:
    """The candidate's physically pruned weights (views into the resident model)."""
    space.apply(genes)
    s = space.structure
    return s.family.lean(s.model)


def latency_costs(table: LatencyTable, space: spaces.SearchSpace, kind: str) -> CostTable:
    fixed, genes = space.blocks()
    return table.workload(kind).costs(fixed, genes)


def refuse_untimed(space: spaces.SearchSpace, metrics: set[str]) -> None:
    """A latency budget on a space whose candidates all run as fast as dense is refused."""
    if "latency" in metrics and space.latency_note:
        raise SearcherError(
            f"--budget latency: {space.latency_note}. Budget sparsity= or params= for this "
            "space, or search the width or depth space"
        )


def spread_candidates(
    n_levels: Sequence[int], n: int, rng: np.random.Generator
) -> list[tuple[int, ...]]:
    """Random candidates spread from heavily pruned to dense: each draws a keep level p, and
    each gene a level near p (so totals are not all near the middle, as uniform genes are)."""
    out = []
    for _ in range(n):
        p = rng.uniform(0.0, 1.0)
        genes = []
        for k in n_levels:
            top = k - 1
            level = round(rng.normal(p * top, 0.25 * top)) if top else 0
            genes.append(int(min(max(level, 0), top)))
        out.append(tuple(genes))
    return out


def correction_set(space: spaces.SearchSpace, n: int, seed: int) -> list[tuple[int, ...]]:
    """The dense model, the most pruned one, and spread random ones."""
    dense = space.dense()
    smallest = tuple(0 for _ in dense)
    rng = np.random.default_rng(seed)
    return [dense, smallest, *spread_candidates(space.n_levels, max(n - 2, 0), rng)][:n]


def profile_space(
    space: spaces.SearchSpace,
    settings: LatencySettings,
    corrections: int = 8,
    seed: int = 0,
    on_step: Callable[[str], None] = lambda text: None,
    block_timing: Timing = BLOCK_TIMING,
    model_timing: Timing = MODEL_TIMING,
    method: str = "stack",
) -> LatencyTable:
    """A latency table for the space's model on ``settings.device``, covering the space
    (``method``: how block sizes are timed, ``latency_models.profile.METHODS``)."""
    device = settings.backend()
    dense = candidate_weights(space, space.dense())
    models = [
        (candidate_blocks(space, c), lambda c=c: candidate_weights(space, c))
        for c in correction_set(space, corrections, seed + 1)
    ]
    try:
        table = profile(
            device, dense, settings.workloads, space_shapes(space), models, block_timing,
            model_timing, on_step, method,
        )  # fmt: skip
    finally:
        space.apply(space.dense())
    table.info.update(space=space.name, space_options=space.options(), seed=seed)
    return table


def load_table(
    path: str | Path, space: spaces.SearchSpace, settings: LatencySettings, allow_mismatch: bool
) -> tuple[LatencyTable, list[str]]:
    """The table at ``path``, checked against this model, workload and device."""
    table = LatencyTable.load(path)
    notes = table.check(
        settings.backend().fingerprint(), architecture(candidate_weights(space, space.dense())),
        settings.batch, settings.seq_len, allow_mismatch, where=f"latency table {path}",
    )  # fmt: skip
    return table, notes


@dataclass(frozen=True)
class Timed:
    """A candidate's latency, timed round-robin with the dense model's."""

    candidate: Measurement
    dense: Measurement

    @property
    def ratio(self) -> float:
        """Candidate over dense latency (median of per-round ratios; drift cancels)."""
        return self.candidate.ratio(self.dense)


class Meter:
    """Measures candidates of a space end to end on one device, each beside the dense model."""

    def __init__(
        self, space: spaces.SearchSpace, settings: LatencySettings, timing: Timing = MODEL_TIMING
    ) -> None:
        self.space = space
        self.settings = settings
        self.device = settings.backend()
        self.timing = timing
        self.count = 0
        self._dense: dict[str, Callable[[], Any]] = {}

    def _dense_call(self, workload: Workload) -> Callable[[], Any]:
        if workload.kind not in self._dense:
            weights = candidate_weights(self.space, self.space.dense())
            self._dense[workload.kind] = self.device.prepare(weights, workload)
        return self._dense[workload.kind]

    def measure(self, genes: Sequence[int], kinds: Sequence[str] = KINDS) -> dict[str, Timed]:
        out = {}
        try:
            for wl in self.settings.workloads:
                if wl.kind not in kinds:
                    continue
                dense = self._dense_call(wl)
                call = self.device.prepare(candidate_weights(self.space, genes), wl)
                d, c = self.device.time([dense, call], self.timing)
                out[wl.kind] = Timed(c, d)
        finally:
            self.space.apply(self.space.dense())
        self.count += 1
        return out


@dataclass
class Validation:
    device: str
    workload: Workload
    predicted: list[float] = field(default_factory=list)  # ms, from the table
    measured: list[float] = field(default_factory=list)  # ms, median
    predicted_fraction: list[float] = field(default_factory=list)  # of the dense prediction
    measured_fraction: list[float] = field(default_factory=list)  # of dense, timed alongside
    dense_measured: list[float] = field(default_factory=list)  # ms, timed alongside each
    candidates: list[tuple[int, ...]] = field(default_factory=list)

    @staticmethod
    def _stats(predicted: Sequence[float], measured: Sequence[float]) -> dict[str, float]:
        p, m = np.asarray(predicted), np.asarray(measured)
        e = (p - m) / m
        return {
            "within_5pct": float(np.mean(np.abs(e) <= 0.05)),
            "within_10pct": float(np.mean(np.abs(e) <= 0.10)),
            "rmse_pct": float(math.sqrt(np.mean(e**2)) * 100),
            "mean_error_pct": float(np.mean(e) * 100),
            "max_abs_error_pct": float(np.max(np.abs(e)) * 100),
        }

    def pairs(self) -> list[dict[str, Any]]:
        cols = (self.predicted, self.measured, self.predicted_fraction, self.measured_fraction,
                self.dense_measured)  # fmt: skip
        names = ("predicted_ms", "measured_ms", "predicted_fraction", "measured_fraction",
                 "dense_measured_ms")  # fmt: skip
        return [
            {"genes": list(c), **{n: round(x, 5) for n, x in zip(names, xs)}}
            for c, *xs in zip(self.candidates, *cols)
        ]

    def summary(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "workload": self.workload.describe(),
            "n": len(self.measured),
            **self._stats(self.predicted, self.measured),
            "measured_range_ms": [float(min(self.measured)), float(max(self.measured))],
            # how much the machine's speed moved during the validation
            "dense_measured_range_ms": [min(self.dense_measured), max(self.dense_measured)],
            "relative_to_dense": self._stats(self.predicted_fraction, self.measured_fraction),
        }


def validate(
    space: spaces.SearchSpace,
    table: LatencyTable,
    settings: LatencySettings,
    n: int,
    seed: int = 0,
    kinds: Sequence[str] = KINDS,
    on_step: Callable[[int, int], None] = lambda done, total: None,
    timing: Timing = MODEL_TIMING,
) -> dict[str, Validation]:
    """Predict and measure ``n`` random candidates (not those the correction was fitted on).

    Each is timed beside the dense model, so besides milliseconds the share of the dense
    latency is compared too: that is what ``--budget latency=R`` limits, and it does not move
    when a shared machine's speed drifts between profiling and validation.
    """
    meter = Meter(space, settings, timing)
    rng = np.random.default_rng(10_000 + seed)  # apart from the correction set's seeds
    candidates = spread_candidates(space.n_levels, n, rng)
    costs = {k: latency_costs(table, space, k) for k in kinds}
    out = {k: Validation(settings.device, table.workload(k).workload) for k in kinds}
    for i, genes in enumerate(candidates):
        timed = meter.measure(genes, kinds)
        for k in kinds:
            v, c = out[k], costs[k]
            v.candidates.append(genes)
            v.predicted.append(c.cost(genes))
            v.measured.append(timed[k].candidate.median_ms)
            v.predicted_fraction.append(c.cost(genes) / c.dense())
            v.measured_fraction.append(timed[k].ratio)
            v.dense_measured.append(timed[k].dense.median_ms)
        on_step(i + 1, len(candidates))
    return out


def repredicted(v: Validation, costs: CostTable) -> Validation:
    """The same measurements with another table's predictions."""
    out = Validation(
        v.device, v.workload, measured=list(v.measured),
        measured_fraction=list(v.measured_fraction), dense_measured=list(v.dense_measured),
        candidates=list(v.candidates),
    )  # fmt: skip
    for genes in v.candidates:
        out.predicted.append(costs.cost(genes))
        out.predicted_fraction.append(costs.cost(genes) / costs.dense())
    return out


def plot_validation(path: Path, results: dict[str, Validation], title: str) -> None:
    """Predicted against measured: milliseconds (top) and share of dense (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(results)
    fig, axes = plt.subplots(2, cols, figsize=(5.2 * cols, 9.4), squeeze=False)
    for c, (kind, v) in enumerate(results.items()):
        s = v.summary()
        _scatter(axes[0][c], v.measured, v.predicted, s, f"{kind}, ms", "latency (ms)")
        _scatter(
            axes[1][c], v.measured_fraction, v.predicted_fraction, s["relative_to_dense"],
            f"{kind}, share of dense", "latency / dense latency",
        )  # fmt: skip
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _scatter(ax: Any, measured: Sequence[float], predicted: Sequence[float],
             s: dict[str, float], name: str, unit: str) -> None:  # fmt: skip
    lo = 0.9 * min(min(measured), min(predicted))
    hi = 1.1 * max(max(measured), max(predicted))
    xs = np.linspace(lo, hi, 2)
    ax.fill_between(xs, xs * 0.9, xs * 1.1, color="tab:green", alpha=0.12, label="±10%")
    ax.fill_between(xs, xs * 0.95, xs * 1.05, color="tab:green", alpha=0.2, label="±5%")
    ax.plot(xs, xs, color="tab:green", lw=1)
    ax.scatter(measured, predicted, s=14, color="tab:blue", alpha=0.8)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(f"measured {unit}")
    ax.set_ylabel(f"predicted {unit}")
    ax.set_title(
        f"{name}: {s['within_10pct']:.0%} within ±10%, {s['within_5pct']:.0%} within ±5%,"
        f"\nRMSE {s['rmse_pct']:.1f}% (n={len(measured)})",
        fontsize=10,
    )
    ax.legend(loc="upper left", fontsize=8)


MODES = ("predicted", "measured")


def wanted(spec: Any, metrics: set[str], objectives: Sequence[str]) -> bool:
    """Whether a run involves latency: budgeted, an objective, or a device named for it."""
    return (
        "latency" in metrics
        or "latency" in objectives
        or spec.latency_device is not None
        or spec.latency == "measured"
    )


def run_settings(spec: Any) -> LatencySettings:
    """The run's latency device and workload, checked before anything loads."""
    if spec.latency not in MODES:
        raise SearcherError(f"unknown --latency {spec.latency!r}: choose one of {', '.join(MODES)}")
    check_workload(spec.workload)
    device = spec.latency_device or ("torch-cuda" if spec.device.startswith("cuda") else "ort-cpu")
    settings = LatencySettings(device, spec.latency_batch, spec.latency_seq, spec.latency_threads)
    settings.backend()
    if spec.latency_table is not None and not Path(spec.latency_table).is_file():
        raise SearcherError(
            f"--latency-table {spec.latency_table}: no such file; build it with searcher "
            f"profile --device {device} --out {spec.latency_table}"
        )
    return settings


def workload_report(costs: CostTable | None, genes: Sequence[int], timed: Timed) -> dict[str, Any]:
    """One workload's latency of a config: measured beside dense, and predicted if a table."""
    c, d = timed.candidate, timed.dense
    out: dict[str, Any] = {
        "measured_ms": round(c.median_ms, 4),
        "p10_ms": round(c.p10_ms, 4),
        "p90_ms": round(c.p90_ms, 4),
        "dense_measured_ms": round(d.median_ms, 4),
        "measured_fraction": round(timed.ratio, 5),
        "speedup": round(1.0 / timed.ratio, 4),
    }
    if costs is not None:
        out["predicted_ms"] = round(costs.cost(genes), 4)
        out["dense_predicted_ms"] = round(costs.dense(), 4)
    return out


@dataclass
class RunLatency:
    """A run's latency model: the table (with its path and any mismatch the user allowed),
    and a meter for measured mode and the final re-measurement.

    In measured mode each measurement is appended to ``log`` (``RUN_DIR/latency.jsonl``) as
    it is taken, and a resumed run reads them back rather than timing again: a candidate
    keeps the latency (and so the feasibility) it had.
    """

    settings: LatencySettings
    workload: str
    mode: str
    table: LatencyTable
    path: Path
    notes: list[str]
    meter: Meter
    log: Path | None = None
    dense: dict[str, Measurement] = field(default_factory=dict)
    limit: float | None = None  # the budget's latency limit, as a fraction of dense
    _logged: dict[tuple[int, ...], float] = field(default_factory=dict)

    def costs(self, space: spaces.SearchSpace) -> CostTable:
        """The cost table the search uses; in measured mode rescaled so that its dense value
        is the measured dense latency (the predictions then only guide repairs)."""
        table = latency_costs(self.table, space, self.workload)
        if self.mode != "measured":
            return table
        k = self.dense_ms / table.dense()
        return CostTable.build("latency", table.base * k, [lv * k for lv in table.levels])

    @property
    def dense_ms(self) -> float:
        return self._logged.get((), 0.0) or self.dense[self.workload].median_ms

    def start_measured(self, space: spaces.SearchSpace, on_phase: Callable[[str], None]) -> None:
        """Measured mode: read the log of an interrupted run, or time the dense model."""
        assert self.log is not None
        if self.log.is_file():
            for line in self.log.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self._logged[tuple(row["genes"])] = float(row["latency_ms"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a kill
        if () not in self._logged:
            on_phase(f"measuring the dense model on {self.settings.device}")
            timed = self.meter.measure(space.dense(), [self.workload])[self.workload]
            self._append((), timed.dense.median_ms)

    def _append(self, genes: tuple[int, ...], ms: float) -> None:
        assert self.log is not None
        self._logged[genes] = ms
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"genes": list(genes), "latency_ms": ms}) + "\n")
            f.flush()

    def measure(self, genes: Sequence[int]) -> dict[str, float]:
        """Measured mode: the candidate's latency, timed beside the dense model and expressed
        in the dense model's milliseconds as measured at the start."""
        key = tuple(genes)
        if key not in self._logged:
            timed = self.meter.measure(genes, [self.workload])[self.workload]
            self._append(key, timed.ratio * self.dense_ms)
        return {"latency": self._logged[key]}

    def report(self, space: spaces.SearchSpace, genes: Sequence[int]) -> dict[str, Any]:
        """Predicted and measured latency of both workloads, and the speed-up over dense
        (timed beside the dense model); for the budgeted workload, whether it is within."""
        out: dict[str, Any] = {}
        for kind, t in self.meter.measure(genes).items():
            out[kind] = workload_report(latency_costs(self.table, space, kind), genes, t)
            if kind == self.workload and self.limit is not None:
                out[kind]["within_budget"] = bool(t.ratio <= self.limit + 1e-9)
            self.dense.setdefault(kind, t.dense)
        return out

    def info(self) -> dict[str, Any]:
        return {
            "device": self.meter.device.fingerprint(),
            "table": str(self.path),
            "table_sha256": table_digest(self.path),
            "table_mismatch": self.notes,
            "mode": self.mode,
            "workload": self.workload,
            "batch": self.settings.batch,
            "seq_len": self.settings.seq_len,
            "dense_measured_ms": {k: round(m.median_ms, 4) for k, m in self.dense.items()}
            | ({self.workload: self.dense_ms} if self.mode == "measured" else {}),
            "measured_candidates": self.meter.count,
        }


def open_run_latency(
    spec: Any,
    settings: LatencySettings,
    space: spaces.SearchSpace,
    identity: dict[str, Any],
    out: Path,
    table_sha256: str | None = None,
    on_phase: Callable[[str], None] = lambda text: None,
) -> RunLatency:
    """Load (or, the first time, build and save) the device's table, checked for this run.

    ``spec.latency_table`` is set to the table's absolute path, so that run.json names it and
    a resumed run uses the same table; ``table_sha256`` (from an interrupted run) must match.
    """
    if spec.latency_table:
        path = Path(spec.latency_table).resolve()
    else:
        path = default_table_path(identity, settings, space).resolve()
    if not path.is_file():
        on_phase(f"profiling {settings.device} latency once (saved to {path})")
        table = profile_space(space, settings, on_step=lambda text: on_phase(f"profiling: {text}"))
        table.info["model"] = identity.get("source")
        table.save(path)
    if table_sha256 is not None and table_digest(path) != table_sha256:
        raise SearcherError(
            f"the latency table {path} has changed since this run started: the run's "
            "latencies cannot be continued with it; start a new run"
        )
    spec.latency_table = str(path)
    table, notes = load_table(path, space, settings, spec.allow_table_mismatch)
    lat = RunLatency(
        settings, spec.workload, spec.latency, table, path, notes, Meter(space, settings),
        log=out / "latency.jsonl" if spec.latency == "measured" else None,
    )  # fmt: skip
    if spec.latency == "measured":
        lat.start_measured(space, on_phase)
    return lat
