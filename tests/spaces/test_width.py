"""Width space: exact cost accounting, reversibility, apply == materialize, whole KV groups."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import spaces
from tests.helpers import candidates, counted_flops, logits, random_windows, tiny_model

SEQ = 32
KINDS = ["llama", "qwen2"]


def linear(layer, name: str) -> torch.nn.Linear:
    """A Llama-layout projection of a layer (these tiny models are Llama and Qwen2)."""
    attn = name in ("q_proj", "k_proj", "v_proj", "o_proj")
    return layer.module.get_submodule(("self_attn." if attn else "mlp.") + name)


def mean_abs_inputs(model, modules: dict[str, torch.nn.Module], windows, batch_size=4):
    sums: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}

    def hook(name):
        def record(_m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.abs().sum(0)
            count[name] = count.get(name, 0) + x.shape[0]

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    with torch.inference_mode():
        for i in range(0, len(windows), batch_size):
            model(input_ids=windows[i : i + batch_size], use_cache=False)
    for h in handles:
        h.remove()
    return {n: sums[n] / count[n] for n in sums}


@pytest.fixture(scope="module", params=KINDS)
def built(request):
    model = tiny_model(request.param)
    windows = random_windows(model, 4, SEQ)
    reference = logits(model, windows)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    structure = spaces.Structure.of(model)
    modules = {}
    for layer in structure.layers:
        modules[f"{layer.index}.down"] = layer.module.mlp.down_proj
    stats = mean_abs_inputs(model, modules, windows)
    space = spaces.build("width", structure, SEQ, windows)
    return SimpleNamespace(
        kind=request.param,
        model=model,
        structure=structure,
        windows=windows,
        reference=reference,
        original=original,
        down_stats=stats,
        space=space,
    )


def test_genes_and_levels(built) -> None:
    s, space = built.structure, built.space
    assert len(space.genes) == 2 * len(s.layers)
    assert [g.kind for g in space.genes] == ["attn", "mlp"] * len(s.layers)
    attn, mlp = space.genes[0], space.genes[1]
    assert attn.values == tuple(g * s.group_size for g in range(1, s.kv_heads + 1))
    assert attn.keep[-1] == 1.0 and mlp.keep[-1] == 1.0
    assert mlp.values[-1] == s.intermediate
    assert list(mlp.values) == sorted(set(mlp.values))
    assert list(attn.keep) == sorted(attn.keep) and list(mlp.keep) == sorted(mlp.keep)


def test_costs_match_flop_counter_and_parameter_count(built) -> None:
    space = built.space
    tables = space.cost_tables()
    ids = built.windows[:1]
    seen = set()
    for c in candidates(space, seed=1, n=4):
        pruned = space.materialize(c)
        assert counted_flops(pruned, ids) == tables["flops"].cost(c), c
        assert sum(p.numel() for p in pruned.parameters()) == tables["params"].cost(c), c
        seen.add(tables["flops"].cost(c))
    assert len(seen) >= 4  # candidates really differ in cost
    dense_params = sum(v.numel() for k, v in built.model.named_parameters())
    assert tables["params"].dense() == dense_params


def test_materialized_weights_are_compact(built) -> None:
    space = built.space
    c = candidates(space, seed=2)[2]
    pruned = space.materialize(c)
    for layer in spaces.Structure.of(pruned).layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            w = linear(layer, name).weight
            assert w.is_contiguous()
            assert w.untyped_storage().nbytes() == w.numel() * w.element_size(), name


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
    # materialize() leaves the resident model dense too
    space.materialize((0,) * len(space.genes))
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
    space.apply(space.dense())


def block_index(blocks: torch.Tensor, pool: torch.Tensor) -> list[int]:
    """For each block of ``blocks`` (first dim), the index of the identical block of ``pool``."""
    out = []
    for b in blocks:
        hits = [j for j in range(len(pool)) if torch.equal(pool[j], b)]
        assert len(hits) == 1, "pruned weights must be whole, unchanged blocks of the original"
        out.append(hits[0])
    return out


def test_describe_matches_shapes_and_whole_kv_groups(built) -> None:
    s, space, orig = built.structure, built.space, built.original
    span = s.group_size * s.head_dim
    for c in candidates(space, seed=5)[1:]:
        desc = space.describe(c)
        assert set(desc) == {g.name for g in space.genes}
        pruned = space.materialize(c)
        for layer in spaces.Structure.of(pruned).layers:
            i, pre = layer.index, layer.prefix
            a = desc[f"{pre}.self_attn"]
            groups = a["num_key_value_heads"]
            assert groups == space.group_counts[c[2 * i]]
            assert a["num_heads"] == groups * s.group_size
            assert a["keep"] == pytest.approx(groups / s.kv_heads)
            assert len(a["kept_kv_groups"]) == groups
            q, k, v, o = (linear(layer, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
            assert q.out_features == a["num_heads"] * s.head_dim == o.in_features
            assert k.out_features == groups * s.head_dim == v.out_features
            assert o.out_features == s.hidden
            # Whole KV groups, with their query heads and o_proj columns, in one order.
            key = f"{pre}.self_attn"
            ok = orig[f"{key}.k_proj.weight"].reshape(s.kv_heads, s.head_dim, -1)
            order = block_index(k.weight.reshape(groups, s.head_dim, -1), ok)
            assert sorted(order) == a["kept_kv_groups"]
            ov = orig[f"{key}.v_proj.weight"].reshape(s.kv_heads, s.head_dim, -1)
            assert torch.equal(v.weight.reshape(groups, s.head_dim, -1), ov[order])
            oq = orig[f"{key}.q_proj.weight"].reshape(s.kv_heads, span, -1)
            assert torch.equal(q.weight.reshape(groups, span, -1), oq[order])
            oo = orig[f"{key}.o_proj.weight"].reshape(s.hidden, s.kv_heads, span)
            assert torch.equal(o.weight.reshape(s.hidden, groups, span), oo[:, order])
            if built.kind == "qwen2":
                assert q.bias is not None and k.bias is not None and v.bias is not None
                for name, rows in (("q_proj", span), ("k_proj", s.head_dim)):
                    ob = orig[f"{key}.{name}.bias"].reshape(s.kv_heads, rows)
                    got = linear(layer, name).bias.reshape(groups, rows)
                    assert torch.equal(got, ob[order])
            # MLP: whole neurons, gate/up rows and down columns in one order.
            m = desc[f"{pre}.mlp"]
            width = m["intermediate_size"]
            assert width == space.mlp_sizes[c[2 * i + 1]]
            assert m["keep"] == pytest.approx(width / s.intermediate)
            gate, up, down = (linear(layer, n) for n in ("gate_proj", "up_proj", "down_proj"))
            assert gate.out_features == up.out_features == down.in_features == width
            order = block_index(gate.weight, orig[f"{pre}.mlp.gate_proj.weight"])
            assert sorted(order) == m["kept_neurons"]
            assert torch.equal(up.weight, orig[f"{pre}.mlp.up_proj.weight"][order])
            assert torch.equal(down.weight, orig[f"{pre}.mlp.down_proj.weight"][:, order])
    space.apply(space.dense())


def test_levels_keep_nested_sets_of_the_most_important_neurons(built) -> None:
    s, space = built.structure, built.space
    for i in range(len(s.layers)):
        kept_groups, kept_neurons = [], []
        for level in range(len(space.genes[2 * i].values)):
            c = list(space.dense())
            c[2 * i] = level
            kept_groups.append(set(space.describe(c)[space.genes[2 * i].name]["kept_kv_groups"]))
        for level in range(len(space.genes[2 * i + 1].values)):
            c = list(space.dense())
            c[2 * i + 1] = level
            desc = space.describe(c)[space.genes[2 * i + 1].name]
            kept_neurons.append(set(desc["kept_neurons"]))
        for small, big in zip(kept_groups, kept_groups[1:]):
            assert small < big
        for small, big in zip(kept_neurons, kept_neurons[1:]):
            assert small < big
        # Neuron score: mean |input of down_proj| times the norm of its down_proj column.
        down = built.original[f"model.layers.{i}.mlp.down_proj.weight"].double()
        score = built.down_stats[f"{i}.down"] * down.norm(dim=0)
        for kept in kept_neurons:
            dropped = set(range(s.intermediate)) - kept
            if dropped:
                assert min(score[list(kept)]) >= max(score[list(dropped)]) - 1e-9


def test_priors_list_unit_scores_in_the_order_levels_keep_them(built) -> None:
    space = built.space
    priors = space.priors()
    for gi, gene in enumerate(space.genes):
        scores, units = priors["unit_scores"][gi], priors["units"][gi]
        assert scores == sorted(scores, reverse=True)
        layer = gi // 2
        if gene.kind == "mlp":
            assert len(scores) == built.structure.intermediate
            assert units == list(space.mlp_sizes)
            # the neuron score: mean |input of down_proj| times its weight column's norm
            down = built.original[f"model.layers.{layer}.mlp.down_proj.weight"]
            want = built.down_stats[f"{layer}.down"] * down.double().norm(dim=0)
            assert scores == pytest.approx(sorted(want.tolist(), reverse=True), rel=1e-6)
        else:
            assert len(scores) == built.structure.kv_heads
            assert units == list(space.group_counts)
