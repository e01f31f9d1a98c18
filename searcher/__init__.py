"""searcher: hardware-aware search for per-layer compression allocations."""

from searcher.errors import SearcherError
from searcher.spec import RunSpec


def run(spec: RunSpec, **kwargs):
    """Run a search (see ``searcher.run.run``)."""
    from searcher.run import run as _run

    return _run(spec, **kwargs)


def evaluate_config(path: str, **kwargs):
    """Score a saved config (see ``searcher.run.evaluate_config``)."""
    from searcher.run import evaluate_config as _evaluate

    return _evaluate(path, **kwargs)


__all__ = ["RunSpec", "SearcherError", "evaluate_config", "run"]
