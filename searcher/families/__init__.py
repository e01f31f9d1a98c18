"""Model families: one module each in this folder, found here by their ``model_types``.

Adding a family is one module defining a ``Family`` subclass (see ``base.py`` for what it
declares, ``llama.py`` for an example) and its entry in ``tests/test_families.py``.
Nothing outside the family modules knows a family's layout.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from searcher.errors import SearcherError
from searcher.families.base import BlockLayout, Dropped, Family, Shapes, Slab


def _discover() -> dict[str, Family]:
    found: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for value in vars(module).values():
            ours = getattr(value, "__module__", None) == module.__name__
            if ours and isinstance(value, type) and issubclass(value, Family):
                found[value.name] = value()
    return found


FAMILIES: dict[str, Family] = _discover()
MODEL_TYPES: dict[str, Family] = {t: f for f in FAMILIES.values() for t in f.model_types}


def supported() -> str:
    """The model types searcher supports, for messages and --help."""
    return ", ".join(sorted(MODEL_TYPES))


def family_for(model_type: str | None, architecture: str = "") -> Family:
    """The family of a model type, or a one-line error naming the supported ones."""
    family = MODEL_TYPES.get(model_type or "")
    if family is None:
        what = f"model type {model_type!r}" + (f" ({architecture})" if architecture else "")
        raise SearcherError(
            f"unsupported {what}: searcher handles decoder LMs of these types: {supported()}"
        )
    return family


def family_of(model: Any) -> Family:
    cfg = getattr(model, "config", None)
    family = family_for(getattr(cfg, "model_type", None), type(model).__name__)
    family.check(model)
    return family


__all__ = [
    "FAMILIES", "MODEL_TYPES", "BlockLayout", "Dropped", "Family", "Shapes", "Slab",
    "family_for", "family_of", "supported",
]  # fmt: skip
