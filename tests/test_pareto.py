"""pareto_front against the brute-force definition of non-domination."""

from __future__ import annotations

import numpy as np
import pytest

from searcher.pareto import pareto_front


def dominates(a, b) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def brute_force(points) -> set[int]:
    return {
        i
        for i, p in enumerate(points)
        if not any(dominates(q, p) for j, q in enumerate(points) if j != i)
    }


def check(points) -> list[int]:
    front = pareto_front(points)
    assert len(front) == len(set(front))
    assert set(front) == brute_force(points)
    # Returned in lexicographic order of the points.
    keys = [tuple(points[i]) for i in front]
    assert keys == sorted(keys)
    return front


def test_empty_and_single() -> None:
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 2.0)]) == [0]


def test_hand_cases() -> None:
    assert set(check([(1, 5), (2, 2), (5, 1), (3, 3), (6, 6)])) == {0, 1, 2}
    # One point dominating all others.
    assert check([(3, 3), (0, 0), (1, 5), (0, 1)]) == [1]
    # Equal in one objective, better in the other: the worse one is dominated.
    assert check([(1, 2), (1, 1)]) == [1]
    # Exact duplicates are all kept.
    assert set(check([(1, 1), (2, 0), (1, 1), (3, 3)])) == {0, 1, 2}
    # Duplicates that are dominated are all dropped.
    assert check([(2, 2), (2, 2), (1, 1)]) == [2]
    # A chain of trade-offs: all kept, in lexicographic order.
    assert check([(3, 0), (0, 3), (1, 2), (2, 1)]) == [1, 2, 3, 0]
    # 3-D: a point worse in 2 objectives but better in the third survives.
    assert set(check([(1, 1, 5), (2, 2, 1), (2, 2, 2), (1, 1, 6)])) == {0, 1}


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("seed", range(25))
def test_random_with_ties(dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 60))
    # Small integer grids make ties and exact duplicates common.
    points = [tuple(float(x) for x in rng.integers(0, 6, size=dim)) for _ in range(n)]
    check(points)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("seed", range(10))
def test_random_continuous(dim: int, seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    points = rng.random((200, dim)).tolist()
    check(points)


def test_accepts_numpy_rows() -> None:
    pts = np.array([[1.0, 4.0], [2.0, 2.0], [3.0, 3.0], [4.0, 1.0]])
    assert set(pareto_front(pts)) == {0, 1, 3}
