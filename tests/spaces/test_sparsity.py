"""Sparsity space: exact cost accounting, Wanda masks, reversibility, apply == materialize."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import spaces
from spaces.sparsity import _cuts, _kept, _row_ranks
from tests.helpers import candidates, counted_flops, logits, random_windows, tiny_model

SEQ = 32
KINDS = ["llama", "qwen2"]
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear(layer, name: str) -> torch.nn.Linear:
    """A Llama-layout projection of a layer (these tiny models are Llama and Qwen2)."""
    return layer.module.get_submodule(("self_attn." if name in PROJ[:4] else "mlp.") + name)


def linear_name(layer, name: str) -> str:
    return layer.name(("self_attn." if name in PROJ[:4] else "mlp.") + name)


def input_norms(model, modules: dict[str, torch.nn.Module], windows, batch_size=4):
    """L2 norm over all calibration tokens of each input feature of each module."""
    sq: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sq[name] = sq.get(name, 0) + x.square().sum(0)

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            model(input_ids=windows[i : i + batch_size], use_cache=False)
    for h in handles:
        h.remove()
    return {n: v.sqrt() for n, v in sq.items()}


@pytest.fixture(scope="module", params=KINDS)
def built(request):
    model = tiny_model(request.param)
    windows = random_windows(model, 4, SEQ)
    reference = logits(model, windows)
    structure = spaces.Structure.of(model)
    modules = {linear_name(layer, p): linear(layer, p) for layer in structure.layers for p in PROJ}
    norms = input_norms(model, modules, windows)
    dense = {n: m.weight.detach().clone() for n, m in modules.items()}
    space = spaces.build("sparsity", structure, SEQ, windows)
    return SimpleNamespace(
        kind=request.param,
        model=model,
        structure=structure,
        windows=windows,
        reference=reference,
        norms=norms,
        dense=dense,
        space=space,
    )


def zeros_expected(sparsity: float, in_features: int) -> int:
    return math.ceil(sparsity * in_features - 1e-9)


def test_genes_and_grid(built) -> None:
    space, s = built.space, built.structure
    assert len(space.genes) == len(PROJ) * len(s.layers)
    assert space.genes[0].values == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0])
    assert space.genes[0].keep == pytest.approx([1 - x for x in space.genes[0].values])
    assert all(w.count_nonzero() == w.numel() for w in built.dense.values())  # no dense zeros


def test_costs_match_flop_counter_and_counted_nonzeros(built) -> None:
    space = built.space
    tables = space.cost_tables()
    prunable = {f"{g.name}.weight" for g in space.genes}
    for c in candidates(space, seed=1, n=4):
        pruned = space.materialize(c)
        assert counted_flops(pruned, built.windows[:1]) == tables["flops"].cost(c), c
        named = dict(pruned.named_parameters())
        assert prunable <= set(named)
        nonzero = sum(int(named[n].count_nonzero()) for n in prunable)
        assert nonzero == tables["nonzero"].cost(c), c
        rest = sum(p.numel() for n, p in named.items() if n not in prunable)
        assert rest + nonzero == tables["params"].cost(c), c
    dense_nonzero = sum(w.numel() for w in built.dense.values())
    assert tables["nonzero"].dense() == dense_nonzero
    assert tables["params"].dense() == sum(p.numel() for p in built.model.parameters())
    # FLOPs do not depend on the candidate: unstructured zeros are not faster.
    assert tables["flops"].minimum() == tables["flops"].dense()


def test_rows_have_exactly_the_level_s_zeros_at_the_lowest_scores(built) -> None:
    space, s = built.space, built.structure
    checked = set()
    for c in candidates(space, seed=2, n=3)[1:]:
        space.apply(c)
        for gi, gene in enumerate(space.genes):
            layer = s.layers[gi // len(PROJ)]
            weight = linear(layer, PROJ[gi % len(PROJ)]).weight.detach()
            assert gene.name == linear_name(layer, PROJ[gi % len(PROJ)])
            sparsity = gene.values[c[gi]]
            rows, cols = weight.shape
            k = zeros_expected(sparsity, cols)
            zero = weight == 0
            assert torch.equal(zero.sum(1), torch.full((rows,), k)), (gene.name, sparsity)
            # Non-zero entries keep their dense values.
            dense = built.dense[gene.name]
            assert torch.equal(weight[~zero], dense[~zero])
            # The zeros are the k lowest of |W| * ||X|| in every row.
            if 0 < k < cols:
                score = dense.abs().double() * built.norms[gene.name][None, :]
                assert (
                    score.masked_fill(~zero, -1).amax(1) <= score.masked_fill(zero, 1e30).amin(1)
                ).all()
            checked.add((weight.shape[1], k))
    assert len(checked) > 5
    space.apply(space.dense())


def test_dense_restores_the_original_weights_and_logits(built) -> None:
    space, s = built.space, built.structure
    for c in candidates(space, seed=3)[1:]:
        space.apply(c)
        changed = not torch.allclose(logits(built.model, built.windows), built.reference, atol=1e-3)
        assert changed or c == space.dense()
    space.apply(space.dense())
    for layer in s.layers:
        for p in PROJ:
            assert torch.equal(linear(layer, p).weight, built.dense[linear_name(layer, p)])
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
        for gi, gene in enumerate(space.genes):
            w = pruned.get_submodule(gene.name).weight
            k = zeros_expected(gene.values[c[gi]], w.shape[1])
            assert int((w == 0).sum()) == k * w.shape[0]
    space.apply(space.dense())


def test_apply_is_absolute_not_relative(built) -> None:
    space = built.space
    _, _, a, b, c = candidates(space, seed=5, n=3)
    space.apply(a)
    space.apply(b)
    space.apply(c)
    via = logits(built.model, built.windows)
    space.apply(space.dense())
    space.apply(c)
    direct = logits(built.model, built.windows)
    space.apply(space.dense())
    assert torch.equal(via, direct)


def test_describe(built) -> None:
    space = built.space
    c = candidates(space, seed=6)[2]
    desc = space.describe(c)
    assert [desc[g.name]["sparsity"] for g in space.genes] == [
        g.values[lv] for g, lv in zip(space.genes, c)
    ]


def test_grid_never_exceeds_max_sparsity_and_bad_options_are_user_errors() -> None:
    from searcher.errors import SearcherError

    model = tiny_model("llama")
    structure = spaces.Structure.of(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    space = spaces.build("sparsity", structure, 16, ids, options={"step": 0.25})
    assert space.sparsities == (0.75, 0.5, 0.25, 0.0)
    for bad in ({"step": 0}, {"step": 0.3, "max_sparsity": 0.2}, {"max_sparsity": 1.0}):
        with pytest.raises(SearcherError):
            spaces.build("sparsity", structure, 16, ids, options=bad)


def test_owl_outlier_ratios_pool_each_decoder_layer(built) -> None:
    """OWL's layerwise outlier distribution: the share of a layer's Wanda scores (all seven
    projections together) above 5 times their mean, recomputed here from the raw weights."""
    ratios = built.space.priors()["outlier_ratio"]
    assert len(ratios) == len(built.space.genes)
    for layer in built.structure.layers:
        names = [linear_name(layer, p) for p in PROJ]
        scores = torch.cat([
            (built.dense[n].abs().double() * built.norms[n][None, :].double()).flatten()
            for n in names
        ])  # fmt: skip
        want = float((scores > 5 * scores.mean()).double().mean())
        got = [ratios[i] for i, g in enumerate(built.space.genes) if g.name in names]
        assert got == pytest.approx([want] * len(PROJ), rel=1e-6)


@pytest.mark.parametrize("target", [0.5, 0.6, 0.7])
def test_uniform_allocation_sits_exactly_at_the_budgeted_level(built, target: float) -> None:
    """``sparsity=s`` admits level s in every layer (zero counts round up, e.g. 0.7 x 48)."""
    from searcher.budget import Budget
    from searcher.problem import Problem

    space = built.space
    keep = tuple(tuple(g.keep) for g in space.genes)
    levels = tuple(len(g.values) for g in space.genes)
    problem = Problem(levels, space.cost_tables(), Budget.parse(f"sparsity={target}"), keep)
    uniform = problem.uniform()
    assert [space.genes[i].values[lv] for i, lv in enumerate(uniform)] == pytest.approx(
        [target] * len(uniform)
    )
    fraction = problem.costs["nonzero"].cost(uniform) / problem.costs["nonzero"].dense()
    assert 1 - target - 0.02 < fraction <= 1 - target


def test_masks_are_the_ranked_masks_and_the_space_keeps_nothing_per_weight(built) -> None:
    """Masks are computed from the dense weights at each apply, against a cut per row and
    level: byte for byte the masks of ranking each row (stable: ties by column) and zeroing
    the lowest ranks, which were kept per weight before (half a byte each)."""
    space = built.space
    levels = len(space.sparsities)
    weights = sum(r * c for r, c in space._shapes)
    held = 0
    for gi, (rows, cols) in enumerate(space._shapes):
        assert space._cuts[gi].shape == (levels, rows) and space._norms[gi].shape == (cols,)
        held += space._cuts[gi].numel() + cols
        held += sum(len(split) + len(short) for split, short in space._ties[gi].values())
    assert not any(
        isinstance(v, torch.Tensor) and v.numel() >= weights for v in vars(space).values()
    )
    assert held < weights / 4
    for c in candidates(space, seed=7, n=3)[1:]:
        space.apply(c)
        for gi, gene in enumerate(space.genes):
            score = built.dense[gene.name].abs().double() * built.norms[gene.name][None, :]
            k = space._zeroed(gi, c[gi])
            kept = space._rows(gi) != 0
            assert torch.equal(kept, _row_ranks(score) >= k), (gene.name, k)
    space.apply(space.dense())


@pytest.mark.parametrize("experts", [0, 3])
def test_cut_masks_equal_ranked_masks_with_ties_and_any_block(experts: int) -> None:
    """Ties (equal weights, equal or zero input norms) are zeroed from the earlier column, as
    the stable ranking does, at every count of zeros and whatever rows a block of scores
    spans; stacked experts' rows use their own expert's norms."""
    g = torch.Generator().manual_seed(0)
    rows, cols = 12, 11
    for coarse in (False, True):
        w = torch.randn(rows, cols, generator=g)
        if coarse:  # few distinct values: many ties within a row
            w = torch.randint(-2, 3, (rows, cols), generator=g).float()
        w = w.to(torch.bfloat16)
        l2 = torch.rand(experts or 1, cols, generator=g, dtype=torch.float64)
        l2[:, 1:4] = 0.0
        l2[:, 5:8] = 1.0
        norms = l2.repeat_interleave(rows // experts, 0) if experts else l2
        score = w.abs().double() * norms
        order = torch.argsort(score, dim=1, stable=True)
        rank = _row_ranks(score)
        zeroed = list(range(cols + 1))
        cuts, ties = _cuts(score, order, zeroed)
        assert cuts.shape == (cols + 1, rows) and ties  # the cut splits ties somewhere
        for k in zeroed[1:]:
            for block in (1, 25, 1 << 20):  # one row, rows not dividing the weight, all
                got = _kept(w, l2 if experts else l2[0], cuts[k], ties.get(k), block)
                assert torch.equal(got, rank >= k), (coarse, k, block)
                assert int((~got).sum()) == k * rows
