"""Search algorithms. Adding one is a module here and an entry in ``ALGORITHMS``."""

from __future__ import annotations

from searcher.algorithms.allocations import FLAP, OWL, SEEDS, Additive, ExpertFrequency
from searcher.algorithms.base import Algorithm, Request, Result
from searcher.algorithms.baselines import RandomSearch, Uniform
from searcher.algorithms.evolution import Evolution
from searcher.algorithms.pymoo_search import PymooGA, PymooNSGA2
from searcher.algorithms.samplers import GPSearch, NSGA2Search, TPESearch
from searcher.algorithms.stages import parse_stages

ALGORITHMS: dict[str, type[Algorithm]] = {
    "evo": Evolution,
    "random": RandomSearch,
    "uniform": Uniform,
    "tpe": TPESearch,
    "gp": GPSearch,
    "nsga2": NSGA2Search,
    "pymoo-ga": PymooGA,
    "pymoo-nsga2": PymooNSGA2,
    "owl": OWL,
    "flap": FLAP,
    "frequency": ExpertFrequency,
    "additive": Additive,
}

__all__ = ["ALGORITHMS", "SEEDS", "Algorithm", "Request", "Result", "parse_stages"]
