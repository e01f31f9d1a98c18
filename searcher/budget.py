"""Budgets: ``flops=0.5,params=0.6`` parsed, checked and explained."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from searcher.errors import SearcherError

# Budget key -> (cost metric it limits, whether the value is kept (True) or removed (False)).
# ``sparsity=R`` asks that at least R of the prunable weights be zero, i.e. that the kept
# ("nonzero") share of them be at most 1 - R.
KEYS: dict[str, tuple[str, bool]] = {
    "flops": ("flops", True),
    "params": ("params", True),
    "sparsity": ("nonzero", False),
}


@dataclass(frozen=True)
class Budget:
    """Upper limits on cost metrics, each a fraction of the dense model's cost."""

    text: str
    limits: Mapping[str, float]  # cost metric -> max fraction of dense

    @classmethod
    def parse(cls, text: str) -> Budget:
        limits: dict[str, float] = {}
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise SearcherError("empty --budget: give one or more of flops=R, params=R, sparsity=R")
        for part in parts:
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not sep or key not in KEYS:
                raise SearcherError(
                    f"bad budget term {part!r}: expected KEY=R with KEY one of "
                    f"{', '.join(KEYS)} and R a fraction of the dense model, e.g. flops=0.5"
                )
            try:
                fraction = float(value)
            except ValueError:
                raise SearcherError(
                    f"bad budget value in {part!r}: {value!r} is not a number"
                ) from None
            if not 0.0 < fraction <= 1.0 or (key == "sparsity" and fraction >= 1.0):
                raise SearcherError(
                    f"bad budget value in {part!r}: it must lie in (0, 1]"
                    + (" and be below 1 for sparsity" if key == "sparsity" else "")
                )
            metric, kept = KEYS[key]
            if metric in limits:
                raise SearcherError(f"budget names {key!r} twice: give each key once")
            limits[metric] = fraction if kept else 1.0 - fraction
        return cls(text=",".join(parts), limits=limits)

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
