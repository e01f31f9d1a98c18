"""A device's latency table: what each kind of block costs at each size, plus the fixed parts,
with a linear correction fitted to end-to-end measurements. Saved as JSON with the device's
fingerprint, and refused on another device unless the user says otherwise.

The prediction for a model is ``scale * (fixed + sum of its blocks) + offset``: still additive
over blocks, so it plugs into a search space as one more ``CostTable``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
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

    def fit_correction(self, raw: Sequence[float], measured: Sequence[float]) -> None:
        """Least-squares ``measured = scale * raw + offset``; a ratio when the fit is degenerate."""
        r, m = np.asarray(raw, dtype=float), np.asarray(measured, dtype=float)
        self.fit = [{"raw_ms": round(a, 4), "measured_ms": round(b, 4)} for a, b in zip(r, m)]
        scale, offset = float(np.sum(m) / np.sum(r)), 0.0
        if len(r) >= 3 and np.ptp(r) > 0.05 * r.mean():
            s, o = np.polyfit(r, m, 1)
            if s > 0:
                scale, offset = float(s), float(o)
        self.scale, self.offset_ms = scale, offset

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
    def from_dict(cls, kind: str, d: Mapping[str, Any]) -> WorkloadTable:
        c = d["correction"]
        return cls(
            workload=Workload(kind, int(d["batch"]), int(d["seq_len"])),
            fixed_ms=float(d["fixed_ms"]),
            blocks={
                k: {int(s): float(v) for s, v in sizes.items()} for k, sizes in d["blocks"].items()
            },  # fmt: skip
            call_ms=float(d.get("call_ms", 0.0)),
            scale=float(c["scale"]),
            offset_ms=float(c["offset_ms"]),
            fit=list(c.get("fit", [])),
        )


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
    def load(cls, path: str | Path) -> LatencyTable:
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SearcherError(f"cannot read latency table {path}: {exc}") from None
        try:
            if d.get("format") != FORMAT:
                raise SearcherError(
                    f"latency table {path} has format {d.get('format')!r}, not {FORMAT}: "
                    "profile again with this searcher"
                )
            return cls(
                device=dict(d["device"]),
                model=dict(d["model"]),
                workloads={
                    k: WorkloadTable.from_dict(k, w)
                    for k, w in d["workloads"].items()
                    if k in KINDS
                },  # fmt: skip
                info=dict(d.get("info", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SearcherError(f"{path} is not a searcher latency table ({exc!r})") from None


def _differences(want: Mapping[str, Any], have: Mapping[str, Any]) -> str:
    keys = sorted(set(want) | set(have))
    return "; ".join(
        f"{k}: table {want.get(k)!r}, here {have.get(k)!r}"
        for k in keys
        if want.get(k) != have.get(k)
    )
