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


def evaluate(path: str, **kwargs):
    """Score a config, a run's best config, or a pruned or healed model directory against the
    dense model (see ``searcher.evaluate.evaluate``)."""
    from searcher.evaluate import evaluate as _evaluate

    return _evaluate(path, **kwargs)


def heal(source: str, out: str, settings=None, **kwargs):
    """Distil a config's pruned model from the dense model and write it (see
    ``searcher.heal.heal``; ``settings`` a ``searcher.heal.HealSettings``)."""
    from searcher.heal import HealSettings
    from searcher.heal import heal as _heal

    return _heal(source, out, settings or HealSettings(), **kwargs)


def load_pruned(path: str, **kwargs):
    """Load a pruned model written by ``searcher export --format pruned`` or ``searcher apply``
    (see ``searcher.export.pruned``)."""
    from searcher.export import load_pruned as _load

    return _load(path, **kwargs)


__all__ = ["RunSpec", "SearcherError", "evaluate", "evaluate_config", "heal", "load_pruned", "run"]
