"""Cost models: analytic FLOPs and parameter counts now, device latency later.

Every cost model here is additive over a space's genes (a constant plus one term per gene
and level), which is what lets search algorithms repair and fill candidates cheaply.
"""

from latency_models.table import CostTable

__all__ = ["CostTable"]
