"""Budgets: ``flops=0.5,params=0.6`` or ``latency_ms=120`` parsed, checked and explained."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from searcher.errors import SearcherError

# Budget key -> (cost metric it limits, whether the value is kept (True) or removed (False)).
# ``sparsity=R`` asks that at least R of the prunable weights be zero, i.e. that the kept
# ("nonzero") share of them be at most 1 - R.
KEYS: dict[str, tuple[str, bool]] = {
    "flops": ("flops", True),
    "params": ("params", True),
    # mixture of experts: parameters a token uses (the routed experts it skips left out)
    "active_params": ("active_params", True),
    "sparsity": ("nonzero", False),
    "latency": ("latency", True),
    "blocks": ("blocks", True),  # depth: the share of attention and MLP blocks kept
}
# Budget key -> cost metric it limits in absolute units (resolved against the dense model).
ABSOLUTE: dict[str, tuple[str, str]] = {"latency_ms": ("latency", "ms")}


@dataclass(frozen=True)
class Budget:
    """Upper limits on cost metrics, each a fraction of the dense model's cost."""

    text: str
    limits: Mapping[str, float]  # cost metric -> max fraction of dense
    absolute: Mapping[str, float] = field(default_factory=dict)  # metric -> max, its own unit

    @classmethod
    def parse(cls, text: str) -> Budget:
        limits: dict[str, float] = {}
        absolute: dict[str, float] = {}
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise SearcherError(
                "empty --budget: give one or more of flops=R, params=R, sparsity=R, latency=R, "
                "blocks=R, latency_ms=X"
            )
        for part in parts:
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not sep or (key not in KEYS and key not in ABSOLUTE):
                raise SearcherError(
                    f"bad budget term {part!r}: expected KEY=R with KEY one of "
                    f"{', '.join(KEYS)} and R a fraction of the dense model (e.g. flops=0.5), "
                    "or latency_ms=X in milliseconds"
                )
            try:
                fraction = float(value)
            except ValueError:
                raise SearcherError(
                    f"bad budget value in {part!r}: {value!r} is not a number"
                ) from None
            if key in ABSOLUTE:
                metric, unit = ABSOLUTE[key]
                if not fraction > 0 or fraction == float("inf"):
                    raise SearcherError(f"bad budget value in {part!r}: it must be above 0 {unit}")
                if metric in limits or metric in absolute:
                    raise SearcherError(f"budget limits {metric} twice: give one of its keys")
                absolute[metric] = fraction
                continue
            if not 0.0 < fraction <= 1.0 or (key == "sparsity" and fraction >= 1.0):
                raise SearcherError(
                    f"bad budget value in {part!r}: it must lie in (0, 1]"
                    + (" and be below 1 for sparsity" if key == "sparsity" else "")
                )
            metric, kept = KEYS[key]
            if metric in limits or metric in absolute:
                raise SearcherError(f"budget names {key!r} twice: give each key once")
            limits[metric] = fraction if kept else 1.0 - fraction
        return cls(text=",".join(parts), limits=limits, absolute=absolute)

    @staticmethod
    def sweep(text: str) -> list[str]:
        """A budget text per value of a swept key: ``flops=0.4,0.5,0.6`` (a bare value after
        a term is another value of its key) gives ``flops=0.4``, ``flops=0.5``,
        ``flops=0.6``; other terms stay in each. One text when nothing is swept."""
        terms: list[list[str]] = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            if "=" in part or not terms:
                terms.append([part])
                continue
            key = terms[-1][0].partition("=")[0]
            terms[-1].append(f"{key}={part}")
        swept = [t for t in terms if len(t) > 1]
        if len(swept) > 1:
            raise SearcherError(
                f"--budget {text}: sweep one key at a time (several values are given for "
                f"{' and '.join(t[0].partition('=')[0] for t in swept)})"
            )
        if not swept:
            return [text]
        values = swept[0]
        if len(set(values)) < len(values):
            raise SearcherError(f"--budget {text}: a swept value is given twice")
        return [",".join(v if t is values else t[0] for t in terms) for v in values]

    @property
    def metrics(self) -> set[str]:
        """Every cost metric the budget limits, as a fraction or in absolute units."""
        return set(self.limits) | set(self.absolute)

    def resolved(self, dense: Mapping[str, float]) -> Budget:
        """Absolute limits turned into fractions of the dense model's cost (``dense``)."""
        if not self.absolute:
            return self
        limits = dict(self.limits)
        for metric, value in self.absolute.items():
            limits[metric] = value / dense[metric]
        return Budget(self.text, limits)

    def violations(self, fractions: Mapping[str, float], tol: float = 1e-9) -> list[str]:
        """Human-readable reasons why costs (fractions of dense) break the budget."""
        out = []
        for metric, limit in self.limits.items():
            value = fractions[metric]
            if value > limit + tol:
                out.append(f"{metric} {value:.4f} of dense exceeds the limit {limit:.4f}")
        return out

    def satisfied(self, fractions: Mapping[str, float]) -> bool:
        return not self.violations(fractions)

    def slug(self) -> str:
        return self.text.replace("=", "").replace(",", "-")
