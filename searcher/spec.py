"""RunSpec: every setting of a run, from CLI flags or a YAML/JSON file, saved in run.json."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
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


# Flag groups of `searcher run --help`, by a setting's ``group``.
GROUPS = {
    "latency": "used when --budget or --objectives name latency, or a latency device is given"
}


def setting(
    default: Any = None,
    help: str | None = None,
    *,
    positive: bool = False,
    placement: bool = False,
    group: str | None = None,
    **flag: Any,
) -> Any:
    """A ``RunSpec`` field, declared with everything its checks and its CLI flag need.

    ``help``: the flag's help; ``{default}`` and the names in braces that ``searcher.cli``
    fills in from the registries (``{spaces}``, ``{searches}``, ...) are allowed.
    ``positive``: at least 1 once presets apply. ``placement``: changes where evaluations
    run, never their results (a resumed run may change it). ``group``: a key of ``GROUPS``.
    ``flag``: more ``argparse`` options (``option`` names the flag when it is not the
    field's name).
    """
    meta = {"help": help, "positive": positive, "placement": placement, "group": group,
            "flag": flag}  # fmt: skip
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunSpec:
    """Every setting of a run. ``None`` means: take it from the preset (or the default).

    Frozen: change a copy with ``dataclasses.replace``.
    """

    model: str | None = setting(None, "local HF model directory (default: embedded){families}")
    data: str | None = setting(None, ".txt or .jsonl calibration text (default: pydoc)")
    space: str = setting("width", "{spaces} (default {default})")
    space_options: dict[str, Any] = setting(
        {}, "space setting, e.g. mlp_steps=8 (repeatable)", option="--space-option",
        metavar="KEY=VALUE",
    )  # fmt: skip
    budget: str = setting(
        "flops=0.5",
        "one or more of {budgets}, e.g. params=0.6,flops=0.5; several values of one key "
        "(flops=0.4,0.5,0.6) run one search per value",
    )
    algo: str = setting("evo", "{searches}; baselines: {baselines}")
    init: str = setting("profile", "evo's starting allocation: {seeds} (profile: sized to --evals)")
    select: str = setting(
        "plain", "{readers}: plain, or trained:STEPS: each survivor of the last selection stage "
        "is distilled from the dense model for STEPS steps of --batch-size windows before its "
        "final score (DarwinLM); a step on B windows counts as 4B window scores of --evals",
        metavar="HOW",
    )  # fmt: skip
    objectives: str = setting(
        "kl", "kl, or kl,flops / kl,latency: a Pareto front ({multi_objective})"
    )
    seed: int = setting(0)
    preset: str = setting("default", "default: {default}", choices=tuple(sorted(PRESETS)))
    evals: float | None = setting(
        None, "search budget in full-fidelity-equivalent evaluations", positive=True
    )
    offspring: int | None = setting(None, "{readers}: offspring per generation", positive=True)
    stages: str | None = setting(None, "{readers}: WINDOWS:SURVIVORS per stage, e.g. 1:4,4:1")
    random_batch: int = setting(8, "{readers}: candidates per batch", positive=True)
    seq_len: int | None = setting(None, "tokens per window", positive=True)
    importance_windows: int | None = setting(None, positive=True)
    validation_windows: int | None = setting(None, positive=True)
    batch_size: int = setting(4, "windows per forward pass", positive=True)
    device: str = setting("cpu", "cpu | cuda | cuda:N (default {default})")
    dtype: str = setting("float32", "{dtypes} (default {default})")
    threads: int | None = setting(
        None, "torch threads per worker (default: the cores over the workers)", positive=True,
        placement=True,
    )  # fmt: skip
    workers: int = setting(
        1, "parallel evaluations on Ray actors (default {default}: in this process)", positive=True,
        placement=True,
    )  # fmt: skip
    address: str | None = setting(
        None, "Ray cluster to join: auto, HOST:PORT or ray://HOST:PORT (local: a new local "
        "instance, even for one worker)", placement=True, metavar="ADDR",
    )  # fmt: skip
    storage: str | None = setting(
        None, "Optuna storage of the trials: postgresql://USER@HOST/DB, sqlite:///PATH.db or a "
        "journal file (default: RUN_DIR/trials.journal)", metavar="URL",
    )  # fmt: skip
    out: str | None = setting(None, "run directory (default results/<run-id>)")
    trust_remote_code: bool = setting(False, "allow the model directory's own Python code to run")
    latency_device: str | None = setting(
        None, "{latency_devices} (default: ort-cpu, torch-cuda with --device cuda)",
        group="latency", metavar="DEVICE",
    )  # fmt: skip
    latency: str = setting(
        "predicted", "predicted from the device's latency table (default), or measured for "
        "every candidate", group="latency", choices=("predicted", "measured"),
    )  # fmt: skip
    latency_table: str | None = setting(
        None, "table from searcher profile (default: results/latency/<model>-<device>-b<B>-"
        "s<S>.json, profiled on first use)", group="latency", metavar="PATH",
    )  # fmt: skip
    workload: str = setting(
        "prefill", "the latency the budget limits (both are reported)", group="latency",
        choices=("prefill", "decode"),
    )  # fmt: skip
    latency_batch: int = setting(1, "batch B (default {default})", positive=True, group="latency")
    latency_seq: int = setting(
        128, "prefill length / decode KV-cache length S (default {default})", positive=True,
        group="latency",
    )  # fmt: skip
    latency_threads: int | None = setting(
        None, "threads the device runs with (default: every core)", group="latency"
    )
    allow_table_mismatch: bool = setting(
        False, "use a table profiled on another device or software stack", group="latency"
    )

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
        _check(values)
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


def _members(hint: Any) -> tuple[Any, ...]:
    """The types of an annotation: ``int | None`` -> (int, NoneType), ``str`` -> (str,)."""
    return typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)


def _kind(hint: Any) -> type:
    """The type a field's annotation names, without ``None`` (``dict[str, Any]``: dict)."""
    kind = next(k for k in _members(hint) if k is not type(None))
    return typing.get_origin(kind) or kind


_HINTS = typing.get_type_hints(RunSpec)
# Each setting's type: what its flag parses to, and what a config file must give
KINDS: dict[str, type] = {name: _kind(hint) for name, hint in _HINTS.items()}
# Settings a resumed run may change: where evaluations run, never their results
PLACEMENT = tuple(f.name for f in dataclasses.fields(RunSpec) if f.metadata["placement"])
_OPTIONAL = {name for name, hint in _HINTS.items() if type(None) in _members(hint)}
_POSITIVE = [f.name for f in dataclasses.fields(RunSpec) if f.metadata["positive"]]


def _check(values: dict[str, Any]) -> None:
    """Types, positive counts and the seed, once presets apply (what a preset fills is set)."""
    for name, kind in KINDS.items():
        value = values[name]
        if value is None and name in _OPTIONAL:
            continue
        accepted = (int, float) if kind is float else (kind,)  # ints too, where floats are
        if not isinstance(value, accepted) or isinstance(value, bool) and kind is not bool:
            raise SearcherError(f"run setting {name} = {value!r} should be {_describe(accepted)}")
    for name in _POSITIVE:
        if not math.isfinite(values[name]):  # nan and inf pass every comparison below
            raise SearcherError(f"--{name.replace('_', '-')} must be a finite number")
        if values[name] <= 0:
            raise SearcherError(f"--{name.replace('_', '-')} must be at least 1")
    if values["seed"] < 0:
        raise SearcherError("--seed must be 0 or more")


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one: the problem and where it is."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    if "constructor for the tag" in problem:  # e.g. !!python/object: never constructed
        problem = f"{problem} (tags that build Python objects are not allowed)"
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def _describe(kinds: tuple[type, ...]) -> str:
    names = {int: "a whole number", float: "a number", str: "a string", dict: "a mapping",
             bool: "true or false"}  # fmt: skip
    return " or ".join(names.get(k, str(k)) for k in kinds)
