"""Non-dominated points (all objectives minimised)."""

from __future__ import annotations

from collections.abc import Sequence


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates, in lexicographic order of the points.

    A point dominates another when it is no worse in every objective and better in one.
    Exact duplicates are all kept.
    """
    order = sorted(range(len(points)), key=lambda i: tuple(points[i]))
    front: list[int] = []
    for i in order:
        p = points[i]
        dominated = any(
            all(a <= b for a, b in zip(points[j], p)) and any(a < b for a, b in zip(points[j], p))
            for j in front
        )
        if not dominated:
            front.append(i)
    return front
