"""Depth space: exact cost accounting, reversibility, apply == materialize, dropped blocks."""

from __future__ import annotations

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
    structure = spaces.Structure.of(model)
    space = spaces.build("depth", structure, SEQ, windows)
    return SimpleNamespace(
        model=model, structure=structure, windows=windows, reference=reference, space=space
    )


def test_genes(built) -> None:
    s, space = built.structure, built.space
    assert space.n_levels == (2,) * (2 * len(s.layers))
    assert [g.name for g in space.genes[:2]] == ["model.layers.0.self_attn", "model.layers.0.mlp"]


def test_costs_match_flop_counter_and_parameter_count(built) -> None:
    space = built.space
    tables = space.cost_tables()
    for c in candidates(space, seed=1, n=4):
        pruned = space.materialize(c)
        assert counted_flops(pruned, built.windows[:1]) == tables["flops"].cost(c), c
        assert sum(p.numel() for p in pruned.parameters()) == tables["params"].cost(c), c
    assert tables["params"].dense() == sum(p.numel() for p in built.model.parameters())


def test_dropping_everything_costs_only_the_fixed_part(built) -> None:
    s, space = built.structure, built.space
    tables = space.cost_tables()
    none = (0,) * len(space.genes)
    assert tables["flops"].cost(none) == 2 * SEQ * s.hidden * s.vocab  # the LM head alone
    assert tables["params"].cost(none) == s.fixed_params()
    assert tables["flops"].minimum() == tables["flops"].cost(none)


def test_dropping_everything_leaves_embeddings_to_the_head(built) -> None:
    space, model = built.space, built.model
    space.apply((0,) * len(space.genes))
    got = logits(model, built.windows)
    with torch.inference_mode():
        h = model.model.norm(model.model.embed_tokens(built.windows))
        expect = model.lm_head(h).float()
    space.apply(space.dense())
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)


def test_dropped_blocks_leave_the_residual_unchanged(built) -> None:
    space, s = built.space, built.structure
    captured = {}

    def hook(_module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        y = output[0] if isinstance(output, tuple) else output
        captured["in"], captured["out"] = x.clone(), y.clone()

    layer = s.layers[1]
    handle = layer.module.register_forward_hook(hook, with_kwargs=True)
    try:
        c = list(space.dense())
        c[2], c[3] = 0, 0  # layer 1: attention and MLP both dropped
        space.apply(c)
        logits(built.model, built.windows)
        assert torch.equal(captured["in"], captured["out"])
        # Attention dropped, MLP kept: the layer adds exactly the MLP of its input.
        c[3] = 1
        space.apply(c)
        logits(built.model, built.windows)
        with torch.inference_mode():
            mlp = layer.module.mlp(layer.module.post_attention_layernorm(captured["in"]))
        torch.testing.assert_close(captured["out"], captured["in"] + mlp, atol=1e-6, rtol=1e-6)
        # Dense: the layer does change the residual.
        space.apply(space.dense())
        logits(built.model, built.windows)
        assert not torch.allclose(captured["in"], captured["out"], atol=1e-3)
    finally:
        handle.remove()
        space.apply(space.dense())


def test_dense_restores_the_original_logits(built) -> None:
    space = built.space
    for c in candidates(space, seed=3)[1:]:
        space.apply(c)
        changed = not torch.allclose(logits(built.model, built.windows), built.reference, atol=1e-3)
        assert changed or c == space.dense()
    space.apply(space.dense())
    torch.testing.assert_close(
        logits(built.model, built.windows), built.reference, atol=1e-5, rtol=1e-5
    )


def test_apply_matches_materialize(built) -> None:
    space = built.space
    for c in candidates(space, seed=4)[1:]:
        space.apply(c)
        resident = logits(built.model, built.windows)
        pruned = space.materialize(c)
        torch.testing.assert_close(logits(pruned, built.windows), resident, atol=1e-5, rtol=1e-5)
        if c != space.dense():  # dropped blocks' weights are not carried along
            assert len(list(pruned.parameters())) < len(list(built.model.parameters()))
    space.apply(space.dense())


def test_describe(built) -> None:
    space = built.space
    for c in candidates(space, seed=5):
        desc = space.describe(c)
        assert [desc[g.name]["kept"] for g in space.genes] == [bool(x) for x in c]


def test_blocks_metric_counts_kept_blocks(built) -> None:
    table = built.space.cost_tables()["blocks"]
    n = len(built.space.genes)
    assert table.dense() == n and table.minimum() == 0
    half = tuple(i % 2 for i in range(n))
    assert table.cost(half) == n // 2


def test_residual_ratio_prior_measures_what_each_block_adds(built) -> None:
    """Per gene, the block output's norm over the residual stream's; a block whose output
    projection is zeroed adds nothing, and no windows means no prior."""
    s, space = built.structure, built.space
    ratios = space.priors()["residual_ratio"]
    assert len(ratios) == len(space.genes) and all(r > 0 for r in ratios)
    mlp = s.layers[1].module.get_submodule(s.layers[1].mlp.name)
    down = mlp.down_proj.weight
    saved = down.detach().clone()
    with torch.no_grad():
        down.zero_()
    try:
        zeroed = spaces.build("depth", s, SEQ, built.windows).priors()["residual_ratio"]
    finally:
        with torch.no_grad():
            down.copy_(saved)
    assert zeroed[3] == 0.0 and zeroed[:3] == pytest.approx(ratios[:3])
    assert spaces.build("depth", s, SEQ, None).priors() == {}
