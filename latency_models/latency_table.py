"""A device's latency table: what each kind of block costs at each size, plus the fixed parts,
with a linear correction fitted to end-to-end measurements. Saved as JSON with the device's
fingerprint, and refused on another device unless the user says otherwise.

The prediction for a model is ``scale * (fixed + sum of its blocks) + offset``: still additive
over blocks, so it plugs into a search space as one more ``CostTable``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latency_models.table import CostTable
from latency_models.workload import KINDS, Workload
from searcher.errors import SearcherError

Block = tuple[str, int]
"""("attn", KV groups kept) or ("mlp", neurons kept); size 0 is a removed block."""

FORMAT = 1


@dataclass
class WorkloadTable:
    """Latency of one workload: the fixed parts, each block size, and the correction."""

    workload: Workload
    fixed_ms: float  # embedding, final norm, LM head, and one call's overhead
    blocks: dict[str, dict[int, float]]  # kind -> size -> ms per block
    call_ms: float = 0.0  # overhead of one call of an empty graph (subtracted from blocks)
    scale: float = 1.0
    offset_ms: float = 0.0
    fit: list[dict[str, float]] = field(default_factory=list)  # raw vs measured, per model

    def block(self, kind: str, size: int) -> float:
        if size == 0:
            return 0.0
        try:
            return self.blocks[kind][size]
        except KeyError:
            have = ", ".join(str(s) for s in sorted(self.blocks.get(kind, {})))
            raise SearcherError(
                f"the latency table has no {kind} block of size {size} (it has: {have or 'none'}); "
                "profile the space you search: searcher profile --space NAME [--space-option ...]"
            ) from None

    def raw(self, blocks: Iterable[Block]) -> float:
        """Fixed parts plus the sum of the blocks' own latencies, before the correction."""
        return self.fixed_ms + sum(self.block(k, s) for k, s in blocks)

    def predict(self, blocks: Iterable[Block]) -> float:
        return self.scale * self.raw(blocks) + self.offset_ms

    def costs(self, fixed: Sequence[Block], genes: Sequence[Sequence[Block | None]]) -> CostTable:
        """The prediction as a CostTable over a space's genes (``None``: latency unchanged)."""
        base = self.predict(fixed)
        levels = [
            [0.0 if b is None else self.scale * self.block(*b) for b in gene] for gene in genes
        ]
        return CostTable.build("latency", base, levels)

    def fit_correction(
        self, raw: Sequence[float], measured: Sequence[float],
        anchor: tuple[float, float] | None = None,
    ) -> None:  # fmt: skip
        """Fit ``measured = scale * raw + offset`` to whole models; a ratio when the fit is
        degenerate.

        ``anchor`` is (raw, measured) of the model every other one was timed beside: its
        latency is known far better than theirs (their ratios to it are what was measured).
        With it, the fit goes through that point and only the models' shares of it are fitted:
        ``share = (raw + c) / (raw_anchor + c)``, one constant ``c`` (``anchor_offset``), so a
        candidate's predicted share of dense latency is its share of the table's raw sum with
        ``c`` added to both. ``c`` is a per-call cost the sum of separately timed blocks misses:
        each block graph spreads the call's fixed work over its blocks (a block timed in a
        stack of 240 blocks cost 0.015-0.02 ms less than in a stack of 30, for every size), so
        removing blocks looks like it saves that work. Without ``c`` (the ratio through the
        anchor) small candidates' decode shares came out 5-9% low on an AMD EPYC VM (79-87%
        of 100 validation candidates within 10%; 97-98% with ``c``); a slope and an offset
        fitted to the models alone, without the anchor, moved every share by an extrapolation
        from a few points that scatter by 5-15% each (79% of decode shares within 10% on an
        Intel Xeon VM, the ratio 97%). The models stay in ``fit`` as a check of the table.
        """
        r, m = np.asarray(raw, dtype=float), np.asarray(measured, dtype=float)
        self.fit = [{"raw_ms": round(a, 4), "measured_ms": round(b, 4)} for a, b in zip(r, m)]
        if anchor is not None:
            r0, m0 = anchor
            # shares of the anchor's own model where it is among the models: timed as one of
            # them (the anchor's median, timed first in every round, ran 5% slower than the
            # same graph timed as one of the models, on the AMD VM's decode)
            same = np.flatnonzero(np.isclose(r, r0, rtol=1e-9, atol=0.0))
            c = anchor_offset(r, m, r0, float(m[same[0]]) if len(same) else m0, self.fixed_ms)
            scale = m0 / (r0 + c)
            offset = scale * c
        else:
            scale, offset = float(np.sum(m) / np.sum(r)), 0.0
            if len(r) >= 3 and np.ptp(r) > 0.05 * r.mean():
                s, o = np.polyfit(r, m, 1, w=1.0 / m)  # least squares on relative errors
                if s > 0:
                    scale, offset = float(s), float(o)
        self.scale, self.offset_ms = float(scale), float(offset)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch": self.workload.batch,
            "seq_len": self.workload.seq_len,
            "fixed_ms": self.fixed_ms,
            "call_ms": self.call_ms,
            "blocks": {
                k: {str(s): v for s, v in sorted(d.items())} for k, d in self.blocks.items()
            },
            "correction": {"scale": self.scale, "offset_ms": self.offset_ms, "fit": self.fit},
        }

    @classmethod
    def from_dict(cls, kind: str, d: Any, where: str = "") -> WorkloadTable:
        """A workload's table from its JSON; raises ``_Bad`` naming the entry (under ``where``)
        that is missing, of the wrong type, or not a usable number."""
        d = _object(d, where)
        correction = _at(where, "correction")
        c = _object(_entry(d, "correction", where), correction)
        blocks: dict[str, dict[int, float]] = {}
        for k, sizes in _object(_entry(d, "blocks", where), _at(where, "blocks")).items():
            name = _at(where, f"blocks.{k}")
            blocks[k] = {
                _size(s, name): _ms(v, f"{name}.{s}") for s, v in _object(sizes, name).items()
            }
        fit = c.get("fit", [])
        if not isinstance(fit, list):
            raise _Bad(f"{correction}.fit", f"is {_type(fit)}, not a list")
        return cls(
            workload=Workload(
                kind,
                _count(_entry(d, "batch", where), _at(where, "batch")),
                _count(_entry(d, "seq_len", where), _at(where, "seq_len")),
            ),
            fixed_ms=_ms(_entry(d, "fixed_ms", where), _at(where, "fixed_ms")),
            blocks=blocks,
            call_ms=_ms(d.get("call_ms", 0.0), _at(where, "call_ms")),
            scale=_number(
                _entry(c, "scale", correction),
                f"{correction}.scale",
                lambda x: x > 0,
                "a finite number above 0",
            ),
            offset_ms=_number(
                _entry(c, "offset_ms", correction),
                f"{correction}.offset_ms",
                lambda x: True,
                "a finite number of ms",
            ),
            fit=list(fit),
        )


class _Bad(Exception):
    """An entry of a table's JSON that cannot be used: ``entry`` (a dotted path) ``problem``."""

    def __init__(self, entry: str, problem: str) -> None:
        super().__init__(f"{entry} {problem}")


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    return "null" if value is None else names.get(type(value), f"a {type(value).__name__}")


def _object(value: Any, entry: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise _Bad(entry or "the table", f"is {_type(value)}, not an object")
    return value


def _entry(d: dict[Any, Any], key: str, where: str) -> Any:
    if key not in d:
        raise _Bad(_at(where, key), "is missing")
    return d[key]


def _number(value: Any, entry: str, ok: Callable[[float], bool], want: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Bad(entry, f"is {_type(value)}, not {want}")
    x = float(value)
    if not (math.isfinite(x) and ok(x)):
        raise _Bad(entry, f"is {x!r}, not {want}")
    return x


def _ms(value: Any, entry: str) -> float:
    return _number(value, entry, lambda x: x >= 0, "a latency (a finite number of ms, 0 or more)")


def _count(value: Any, entry: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Bad(entry, f"is {value!r}, not a whole number of at least 1")
    return value


def _size(key: Any, entry: str) -> int:
    """A block size: a JSON object's keys are strings ("256"); a dict built in Python has ints."""
    if isinstance(key, int) and not isinstance(key, bool) and key > 0:
        return key
    if isinstance(key, str) and key.isdecimal() and int(key) > 0:
        return int(key)
    raise _Bad(entry, f"has the size {key!r}, not a whole number above 0")


def anchor_offset(
    raw: np.ndarray, measured: np.ndarray, raw_anchor: float, measured_anchor: float,
    fixed_ms: float,
) -> float:  # fmt: skip
    """The constant ``c`` that best fits the models' measured shares of the anchor by
    ``(raw + c) / (raw_anchor + c)``, in relative error; 0 with fewer than two models whose
    raw sums differ from the anchor's. ``c`` lies between ``-fixed_ms`` (the fixed parts
    counted twice) and ``raw_anchor`` (a fixed cost as large as the whole sum), searched on a
    grid then refined to float precision: the error is smooth in ``c`` and the bounds keep
    noise from making it unbounded."""
    shares = measured / measured_anchor
    useful = np.abs(raw - raw_anchor) > 0.02 * raw_anchor
    if int(useful.sum()) < 2:
        return 0.0
    r, s = raw[useful], shares[useful]

    def error(c: np.ndarray) -> np.ndarray:
        predicted = (r[None, :] + c[:, None]) / (raw_anchor + c[:, None])
        return np.mean((predicted / s[None, :] - 1.0) ** 2, axis=1)

    lo, hi = -0.99 * fixed_ms, raw_anchor
    # a grid, then finer grids around its best point: each round narrows the step 100-fold,
    # so that shares that need no constant get one of float noise, not of the grid's step
    for _ in range(8):
        grid = np.linspace(lo, hi, 201)
        best = int(np.argmin(error(grid)))
        step = grid[1] - grid[0]
        lo, hi = max(grid[0], grid[best] - step), min(grid[-1], grid[best] + step)
    return float(grid[best])


@dataclass
class LatencyTable:
    device: dict[str, Any]  # the backend's fingerprint when the table was built
    model: dict[str, Any]  # the architecture it was built for (shapes only)
    workloads: dict[str, WorkloadTable]  # "prefill" / "decode"
    info: dict[str, Any] = field(default_factory=dict)  # when, how long, what was profiled

    def workload(self, kind: str) -> WorkloadTable:
        if kind not in self.workloads:
            raise SearcherError(f"the latency table has no {kind} workload (it has: "
                                f"{', '.join(self.workloads)})")  # fmt: skip
        return self.workloads[kind]

    def check(
        self, device: Mapping[str, Any], model: Mapping[str, Any], batch: int, seq_len: int,
        allow_mismatch: bool = False, where: str = "the latency table",
    ) -> list[str]:  # fmt: skip
        """Refuse a table made for another model or workload; and for another device or
        software stack unless ``allow_mismatch`` (then the differences are returned)."""
        if dict(model) != self.model:
            diff = _differences(self.model, model)
            raise SearcherError(
                f"{where} was profiled for another model shape ({diff}): profile this model "
                "with searcher profile --model ..."
            )
        for wt in self.workloads.values():
            if (wt.workload.batch, wt.workload.seq_len) != (batch, seq_len):
                raise SearcherError(
                    f"{where} was profiled for batch {wt.workload.batch}, sequence "
                    f"{wt.workload.seq_len}, not {batch}x{seq_len}: profile again with "
                    f"--batch {batch} --seq {seq_len}"
                )
        diffs = _differences(self.device, device)
        if diffs and not allow_mismatch:
            raise SearcherError(
                f"{where} was profiled on another device or software stack ({diffs}): its "
                "numbers may not hold here. Profile this machine with searcher profile, or "
                "pass --allow-table-mismatch to use it anyway"
            )
        return [diffs] if diffs else []

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "device": self.device,
            "model": self.model,
            "workloads": {k: w.to_dict() for k, w in self.workloads.items()},
            "info": self.info,
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def from_dict(cls, d: Any, source: str = "the latency table") -> LatencyTable:
        """A table from its JSON, refused (naming ``source`` and the entry) when an entry is
        missing, of the wrong type, or not a usable number: a negative or non-finite block
        time would otherwise price candidates at nonsense latencies."""
        if isinstance(d, dict) and d.get("format") != FORMAT:
            raise SearcherError(
                f"{source} has format {d.get('format')!r}, not {FORMAT}: profile again with "
                "this searcher"
            )
        try:
            d = _object(d, "")
            workloads = _object(_entry(d, "workloads", ""), "workloads")
            return cls(
                device=dict(_object(_entry(d, "device", ""), "device")),
                model=dict(_object(_entry(d, "model", ""), "model")),
                workloads={
                    k: WorkloadTable.from_dict(k, w, f"workloads.{k}")
                    for k, w in workloads.items()
                    if k in KINDS
                },  # fmt: skip
                info=dict(_object(d.get("info", {}), "info")),
            )
        except _Bad as exc:
            raise SearcherError(
                f"{source} is unusable: {exc}; profile the device again with searcher profile"
            ) from None

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SearcherError(f"cannot read latency table {path}: {exc}") from None
        return cls.from_dict(d, f"latency table {path}")


def _differences(want: Mapping[str, Any], have: Mapping[str, Any]) -> str:
    keys = sorted(set(want) | set(have))
    return "; ".join(
        f"{k}: table {want.get(k)!r}, here {have.get(k)!r}"
        for k in keys
        if want.get(k) != have.get(k)
    )
