"""Budget parsing, validation and checking."""

from __future__ import annotations

import pytest

from searcher.budget import Budget
from searcher.errors import SearcherError


@pytest.mark.parametrize(
    ("text", "limits"),
    [
        ("flops=0.5", {"flops": 0.5}),
        ("params=0.25", {"params": 0.25}),
        ("sparsity=0.6", {"nonzero": 0.4}),
        ("flops=1", {"flops": 1.0}),
        ("flops=0.5,params=0.7", {"flops": 0.5, "params": 0.7}),
        ("  flops = 0.5 ,  params=0.7  ", {"flops": 0.5, "params": 0.7}),
        ("FLOPS=0.3,Sparsity=0.2", {"flops": 0.3, "nonzero": 0.8}),
        ("flops=0.5,params=0.6,sparsity=0.5", {"flops": 0.5, "params": 0.6, "nonzero": 0.5}),
        ("flops=5e-1", {"flops": 0.5}),
    ],
)
def test_parse_valid(text: str, limits: dict[str, float]) -> None:
    budget = Budget.parse(text)
    assert set(budget.limits) == set(limits)
    for metric, value in limits.items():
        assert budget.limits[metric] == pytest.approx(value, abs=1e-12)


def test_parse_normalises_text_and_slug() -> None:
    budget = Budget.parse(" flops=0.5 , params=0.7 ")
    assert budget.text == "flops=0.5,params=0.7"
    assert budget.slug() == "flops0.5-params0.7"


def test_sparsity_maps_to_nonzero_share() -> None:
    budget = Budget.parse("sparsity=0.7")
    assert list(budget.limits) == ["nonzero"]
    assert budget.limits["nonzero"] == pytest.approx(0.3)
    assert budget.satisfied({"nonzero": 0.3})
    assert budget.satisfied({"nonzero": 0.1})
    assert not budget.satisfied({"nonzero": 0.31})


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        ",",
        " , ,",
        "energy=0.5",
        "flop=0.5",
        "flops",
        "flops0.5",
        "=0.5",
        "flops=",
        "flops=abc",
        "flops=0.5x",
        "flops=0",
        "flops=-0.1",
        "flops=1.01",
        "params=2",
        "flops=nan",
        "flops=inf",
        "sparsity=0",
        "sparsity=1",
        "sparsity=1.0",
        "sparsity=1.5",
        "flops=0.5,flops=0.6",
        "flops=0.5,FLOPS=0.5",
        "sparsity=0.5,sparsity=0.4",
        "flops=0.5,bogus=0.1",
        "flops=0.5;params=0.5",
    ],
)
def test_parse_rejects_malformed(text: str) -> None:
    with pytest.raises(SearcherError):
        Budget.parse(text)


def test_violations_and_satisfied() -> None:
    budget = Budget.parse("flops=0.5,params=0.6")
    assert budget.violations({"flops": 0.5, "params": 0.6}) == []
    assert budget.satisfied({"flops": 0.1, "params": 0.2, "nonzero": 1.0})  # unbudgeted: ignored
    # Within the tolerance is still fine; just beyond it is not.
    assert budget.satisfied({"flops": 0.5 + 1e-12, "params": 0.6})
    one = budget.violations({"flops": 0.51, "params": 0.6})
    assert len(one) == 1 and "flops" in one[0]
    two = budget.violations({"flops": 0.9, "params": 0.61})
    assert len(two) == 2
    assert any("flops" in r for r in two) and any("params" in r for r in two)
    assert not budget.satisfied({"flops": 0.9, "params": 0.1})
    assert not budget.satisfied({"flops": 0.1, "params": 0.6001})
