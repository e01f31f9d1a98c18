"""RunSpec: every setting of a run, from CLI flags or a YAML/JSON file, saved in run.json."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from searcher.errors import SearcherError

# Settings a preset fills in when the user leaves them unset.
PRESETS: dict[str, dict[str, Any]] = {
    # Under ~5 minutes on a 2-core CPU with the embedded model.
    "quick": {
        "seq_len": 256,
        "offspring": 8,
        "stages": "1:2,4:1",
        "evals": 120,
        "importance_windows": 4,
        "validation_windows": 4,
    },
    "default": {
        "seq_len": 512,
        "offspring": 16,
        "stages": "1:4,4:2,8:1",
        "evals": 150,
        "importance_windows": 8,
        "validation_windows": 8,
    },
}


@dataclass
class RunSpec:
    """Every setting of a run. ``None`` means: take it from the preset (or the default)."""

    model: str | None = None  # None: the embedded SmolLM2-135M
    data: str | None = None  # None: CPython's pydoc_data.topics
    space: str = "width"
    space_options: dict[str, Any] = field(default_factory=dict)
    budget: str = "flops=0.5"
    algo: str = "evo"
    init: str = "uniform"  # evo's first parent: uniform, owl, flap or additive
    objectives: str = "kl"  # "kl", or "kl,flops" etc. for a multi-objective search
    seed: int = 0
    preset: str = "default"
    evals: float | None = None  # budget in full-fidelity-equivalent evaluations
    offspring: int | None = None
    stages: str | None = None  # WINDOWS:SURVIVORS per stage, e.g. "1:4,4:1"
    random_batch: int = 8
    seq_len: int | None = None
    importance_windows: int | None = None
    validation_windows: int | None = None
    batch_size: int = 4
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None  # torch threads per worker; None: the cores over the workers
    workers: int = 1  # parallel evaluations; more than 1 (or an address) runs them on Ray
    address: str | None = None  # an existing Ray cluster: auto, HOST:PORT or ray://HOST:PORT
    storage: str | None = None  # Optuna storage URL; None: SQLite in the run directory
    out: str | None = None  # run directory; None: results/<run-id>
    trust_remote_code: bool = False
    # Latency (used when the budget or objectives name latency, or a latency device is given)
    latency_device: str | None = None  # ort-cpu | torch-cpu | ort-cuda | torch-cuda
    latency: str = "predicted"  # predicted (from the device's table) | measured (each candidate)
    latency_table: str | None = None  # None: results/latency/<model>-<device>-b<B>-s<S>.json
    workload: str = "prefill"  # which latency the budget limits: prefill | decode
    latency_batch: int = 1
    latency_seq: int = 128
    latency_threads: int | None = None  # threads the device runs with; None: every core
    allow_table_mismatch: bool = False

    def resolved(self) -> RunSpec:
        """A copy with preset values filled in where the user left settings unset."""
        if self.preset not in PRESETS:
            raise SearcherError(
                f"unknown --preset {self.preset!r}: choose one of {', '.join(PRESETS)}"
            )
        values = dataclasses.asdict(self)
        for key, value in PRESETS[self.preset].items():
            if values[key] is None:
                values[key] = value
        if values["threads"] is None:
            w = values["workers"]
            workers = w if isinstance(w, int) and not isinstance(w, bool) and w > 0 else 1
            values["threads"] = max(1, (os.cpu_count() or 1) // workers)
        for name, kind in _TYPES.items():
            value = values[name]
            if value is None and name in _OPTIONAL:
                continue
            if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
                raise SearcherError(f"run setting {name} = {value!r} should be {_describe(kind)}")
        for name in _POSITIVE:
            if not math.isfinite(values[name]):  # nan and inf pass every comparison below
                raise SearcherError(f"--{name.replace('_', '-')} must be a finite number")
            if values[name] <= 0:
                raise SearcherError(f"--{name.replace('_', '-')} must be at least 1")
        if values["seed"] < 0:
            raise SearcherError("--seed must be 0 or more")
        return RunSpec(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SearcherError(
                f"unknown run setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**values)

    @classmethod
    def from_file(cls, path: str) -> RunSpec:
        """Settings from a YAML or JSON file (safe loading: no code is executed)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
            values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SearcherError(f"cannot read run config {path}: {_yaml_problem(exc)}") from None
        except (OSError, ValueError) as exc:
            reason = " ".join(str(exc).split())
            raise SearcherError(f"cannot read run config {path}: {reason}") from None
        if not isinstance(values, dict):
            raise SearcherError(f"run config {path} must be a mapping of setting: value")
        return cls.from_dict(values)


# Expected types after presets are applied (ints also accepted where floats are).
_TYPES: dict[str, type | tuple[type, ...]] = {
    "model": str, "data": str, "space": str, "space_options": dict, "budget": str,
    "algo": str, "init": str, "objectives": str, "seed": int, "preset": str, "evals": (int, float),
    "offspring": int, "stages": str, "random_batch": int, "seq_len": int, "importance_windows": int,
    "validation_windows": int, "batch_size": int, "device": str, "dtype": str,
    "threads": int, "workers": int, "address": str, "storage": str, "out": str,
    "trust_remote_code": bool, "latency_device": str, "latency": str, "latency_table": str,
    "workload": str, "latency_batch": int, "latency_seq": int, "latency_threads": int,
    "allow_table_mismatch": bool,
}  # fmt: skip
_OPTIONAL = {"model", "data", "out", "address", "storage", "latency_device", "latency_table",
             "latency_threads"}  # fmt: skip
_POSITIVE = ("evals", "offspring", "random_batch", "seq_len", "importance_windows",
             "validation_windows", "batch_size", "threads", "workers", "latency_batch",
             "latency_seq")  # fmt: skip


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one: the problem and where it is."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    if "constructor for the tag" in problem:  # e.g. !!python/object: never constructed
        problem = f"{problem} (tags that build Python objects are not allowed)"
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def _describe(kind: type | tuple[type, ...]) -> str:
    names = {int: "a whole number", float: "a number", str: "a string", dict: "a mapping",
             bool: "true or false"}  # fmt: skip
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, str(k)) for k in kinds)
