"""The latency commands: ``searcher profile``, ``searcher latency validate`` and
``searcher latency measure``, as functions."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latency_models.backends import Timing
from latency_models.profile import BLOCK_TIMING, MODEL_TIMING
from latency_models.workload import KINDS
from searcher.errors import SearcherError
from searcher.latency import (
    LatencySettings,
    Meter,
    default_table_path,
    latency_costs,
    load_table,
    plot_validation,
    profile_space,
    repredicted,
    validate,
    workload_report,
)
from searcher.results import write_json
from searcher.run import Session, SessionKey, open_session, read_config, session_of_config

# The space is built only to know its block sizes: a short ranking pass is enough.
_RANK = {"seq_len": 128, "calibration": 2, "validation": 1, "importance": 2}


def _session(
    model: str | None, space: str, space_options: dict[str, Any] | None, data: str | None,
    trust_remote_code: bool,
) -> Session:  # fmt: skip
    r = _RANK
    return open_session(
        SessionKey(
            model, data, space, dict(space_options or {}), r["seq_len"], r["calibration"],
            r["validation"], r["importance"], 2, "cpu", "float32", trust_remote_code,
        )
    )  # fmt: skip


@dataclass
class ProfileResult:
    path: Path
    table: Any
    seconds: float


def profile_model(
    settings: LatencySettings,
    model: str | None = None,
    space: str = "width",
    space_options: dict[str, Any] | None = None,
    out: str | None = None,
    corrections: int = 8,
    seed: int = 0,
    data: str | None = None,
    trust_remote_code: bool = False,
    on_step: Callable[[str], None] = lambda text: None,
    block_timing: Timing = BLOCK_TIMING,
    model_timing: Timing = MODEL_TIMING,
    method: str = "stack",
) -> ProfileResult:
    """``searcher profile``: build and save the latency table of a model's space on a device."""
    if corrections < 0:
        raise SearcherError("--corrections must be 0 or more")
    settings.backend()  # an unavailable device fails before the model loads
    start = time.perf_counter()
    on_step("loading model")
    session = _session(model, space, space_options, data, trust_remote_code)
    table = profile_space(
        session.space, settings, corrections, seed, on_step, block_timing, model_timing, method
    )
    table.info["model"] = session.loaded.identity["source"]
    path = (
        Path(out) if out else default_table_path(session.loaded.identity, settings, session.space)
    )
    table.save(path)
    return ProfileResult(path, table, time.perf_counter() - start)


def validate_table(
    settings: LatencySettings,
    n: int = 100,
    table_path: str | None = None,
    model: str | None = None,
    space: str = "width",
    space_options: dict[str, Any] | None = None,
    workload: str | None = None,
    out: str | None = None,
    seed: int = 0,
    allow_mismatch: bool = False,
    data: str | None = None,
    trust_remote_code: bool = False,
    on_step: Callable[[int, int], None] = lambda done, total: None,
    timing: Timing = MODEL_TIMING,
    compare: Sequence[str] = (),
) -> dict[str, Any]:
    """``searcher latency validate``: predicted against measured latency of random candidates;
    writes validation.json (every pair) and a scatter plot. ``compare``: other tables of the
    same model and device, whose predictions of the same measured candidates are summarised
    too (under ``compared``), an A/B of two tables free of the machine's drift."""
    if n < 1:
        raise SearcherError("--n must be at least 1")
    kinds = KINDS if workload is None else (workload,)
    settings.backend()
    session = _session(model, space, space_options, data, trust_remote_code)
    path = table_path or default_table_path(session.loaded.identity, settings, session.space)
    if not Path(path).is_file():
        raise SearcherError(
            f"no latency table at {path}: build one with searcher profile --device "
            f"{settings.device} (or pass --table)"
        )
    table, notes = load_table(path, session.space, settings, allow_mismatch)
    results = validate(session.space, table, settings, n, seed, kinds, on_step, timing)
    target = (
        Path(out)
        if out
        else Path(path).with_suffix("").parent
        / (f"validate-{Path(path).stem}-{session.space.name}-n{n}")
    )
    target.mkdir(parents=True, exist_ok=True)
    summary = {k: v.summary() for k, v in results.items()}
    compared = {}
    for other in compare:
        t, _ = load_table(other, session.space, settings, allow_mismatch)
        compared[str(other)] = {
            k: repredicted(v, latency_costs(t, session.space, k)).summary()
            for k, v in results.items()
        }
    payload = {
        "table": str(path),
        "space": session.space.name,
        "device": settings.backend().fingerprint(),
        "table_mismatch": notes,
        "summary": summary,
        "pairs": {k: v.pairs() for k, v in results.items()},
        "compared": compared,
    }
    write_json(target / "validation.json", payload)
    plot_validation(
        target / "validation.png", results,
        f"{session.loaded.identity['source']} · {session.space.name} space · {settings.device}, "
        f"{settings.backend().threads} threads",
    )  # fmt: skip
    return {
        "out": str(target), "table": str(path), "summary": summary, "notes": notes,
        "compared": compared,
    }  # fmt: skip


def measure_config(
    path: str,
    settings: LatencySettings,
    pick: int | None = None,
    table_path: str | None = None,
    model: str | None = None,
    allow_mismatch: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """``searcher latency measure``: a saved config's latency, timed beside the dense model's
    on the device, and predicted too when there is a table for it (``table_path``, or the
    default table if it exists and fits this machine)."""
    settings.backend()
    config = read_config(path, pick)
    session, genes = session_of_config(path, config, model, "cpu", None, None, trust_remote_code)
    space = session.space
    table, note = None, None
    if table_path:
        table, _ = load_table(table_path, space, settings, allow_mismatch)
    else:
        default = default_table_path(session.loaded.identity, settings, space)
        if default.is_file():
            try:
                table, _ = load_table(default, space, settings, allow_mismatch)
            except SearcherError as exc:
                note = f"no prediction: {exc}"
    timed = Meter(space, settings).measure(genes)
    out: dict[str, Any] = {"config": path, "device": settings.backend().fingerprint()}
    if note:
        out["note"] = note
    out["workloads"] = {}
    for wl in settings.workloads:
        costs = None if table is None else latency_costs(table, space, wl.kind)
        entry = workload_report(costs, genes, timed[wl.kind])
        out["workloads"][wl.kind] = {"workload": wl.describe(), **entry}
    return out


def dumps(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2)
