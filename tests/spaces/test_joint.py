"""Joint space: every block keeps a width level or is removed; its width levels are the width
space's, its level 0 the depth space's removal, and costs are exact for any mix."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import spaces
from tests.helpers import candidates, counted_flops, logits, random_windows, tiny_model

SEQ = 32
KINDS = ["llama", "qwen2"]


@pytest.fixture(scope="module", params=KINDS)
def built(request):
    model = tiny_model(request.param)
    windows = random_windows(model, 4, SEQ)
    reference = logits(model, windows)
    twins = {name: copy.deepcopy(model) for name in ("width", "depth")}
    return SimpleNamespace(
        model=model,
        windows=windows,
        reference=reference,
        space=spaces.build("joint", spaces.Structure.of(model), SEQ, windows),
        **{n: spaces.build(n, spaces.Structure.of(m), SEQ, windows) for n, m in twins.items()},
    )


def test_levels_are_removal_then_the_width_levels(built) -> None:
    space, width = built.space, built.width
    assert space.n_levels == tuple(n + 1 for n in width.n_levels)
    for joint, narrow in zip(space.genes, width.genes, strict=True):
        assert (joint.name, joint.kind) == (narrow.name, narrow.kind)
        assert joint.keep == (0.0, *narrow.keep) and joint.values[1:] == narrow.values
    assert space.fingerprint() == width.fingerprint()  # the same ranked units


def test_costs_match_flop_counter_and_parameter_count(built) -> None:
    space = built.space
    tables = space.cost_tables()
    for c in candidates(space, seed=3, n=6):
        pruned = space.materialize(c)
        assert counted_flops(pruned, built.windows[:1]) == tables["flops"].cost(c), c
        assert sum(p.numel() for p in pruned.parameters()) == tables["params"].cost(c), c
        kept = sum(level > 0 for level in c) / len(c)
        assert tables["blocks"].cost(c) == pytest.approx(kept * tables["blocks"].dense())
    # removing a block costs what the depth space says, narrowing it what the width space says
    depth, width = built.depth.cost_tables(), built.width.cost_tables()
    drop = tuple(0 if i % 3 == 0 else 1 for i in range(len(space.genes)))
    as_joint = tuple(0 if d == 0 else n - 1 for d, n in zip(drop, space.n_levels))
    assert tables["flops"].cost(as_joint) == depth["flops"].cost(drop)
    narrow = tuple(0 for _ in space.genes)
    assert tables["flops"].cost(tuple(1 for _ in space.genes)) == width["flops"].cost(narrow)


def test_a_mix_is_the_width_spaces_narrowing_plus_removal(built) -> None:
    """Removing some blocks and narrowing others in one candidate gives exactly the model the
    width space's narrowing gives once the same blocks are removed (``Structure.drop``, as
    the depth space removes them)."""
    space, width = built.space, built.width
    s = width.structure
    mix = tuple(0 if i in (0, 3) else 1 + i % (n - 1) for i, n in enumerate(space.n_levels))
    space.apply(mix)
    got = logits(built.model, built.windows)
    width.apply(tuple(level - 1 if level else n - 2 for level, n in zip(mix, space.n_levels)))
    narrowed = logits(s.model, built.windows)
    removed = [(s.layers[i // 2], space.genes[i].kind) for i, lv in enumerate(mix) if lv == 0]
    for layer, kind in removed:
        s.drop(layer, kind)
    try:
        torch.testing.assert_close(got, logits(s.model, built.windows))
        assert not torch.allclose(got, narrowed, atol=1e-4)  # the removal mattered
    finally:
        for layer, kind in removed:
            s.restore(layer, kind)
        width.apply(width.dense())
    space.apply(space.dense())
    torch.testing.assert_close(logits(built.model, built.windows), built.reference)


def test_removed_then_restored_block_keeps_its_width(built) -> None:
    """A block removed and brought back at a width level runs at that level, whatever it was
    before it went."""
    space = built.space
    c = list(space.dense())
    c[1] = 2  # layer 0's MLP at its second-narrowest width
    space.apply(c)
    narrow = logits(built.model, built.windows)
    c[1] = 0
    space.apply(c)
    c[1] = 2
    space.apply(c)
    torch.testing.assert_close(logits(built.model, built.windows), narrow)
    space.apply(space.dense())
    torch.testing.assert_close(logits(built.model, built.windows), built.reference)


def test_describe_says_removed_or_the_width_shape(built) -> None:
    space = built.space
    c = list(space.dense())
    c[0], c[1] = 0, 1
    out = space.describe(c)
    attn, mlp = space.genes[0].name, space.genes[1].name
    assert out[attn] == {"kept": False, "keep": 0.0}
    assert out[mlp]["kept"] is True
    assert out[mlp]["intermediate_size"] == built.width.mlp_sizes[0]
    assert len(out[mlp]["kept_neurons"]) == built.width.mlp_sizes[0]
