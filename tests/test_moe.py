"""Mixture-of-experts families on tiny random models of each (Mixtral, Qwen2-MoE with a shared
expert and a dense layer, Qwen3-MoE, OLMoE): the experts space and depth, their exact costs
(parameters, active parameters, FLOPs), the routing after experts are removed, the baselines,
the command-line search and export, and the export loaded by plain transformers."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import spaces
from searcher.algorithms.allocations import ExpertFrequency
from searcher.budget import Budget
from searcher.cli import main
from searcher.errors import SearcherError
from searcher.export import load_pruned
from searcher.export.pruned import save_pruned
from searcher.run import problem_for
from tests.helpers import counted_flops, logits
from tests.test_export_hf import load_without_searcher
from tests.test_families import MOE, MOE_CONFIGS, SEQ, TINY, _mid, _save, _windows, build

TYPES = sorted(MOE_CONFIGS)
# the spaces that prune MoE models; a model mixing dense and MoE MLP layers: experts and depth
PRUNING = {
    "experts": {}, "depth": {}, "width": {"mlp_steps": 4}, "joint": {"mlp_steps": 4},
    "moe": {"mlp_steps": 4, "expert_steps": 3}, "sparsity": {"step": 0.25, "max_sparsity": 0.75},
}  # fmt: skip
MIXED_ONLY = ("experts", "depth", "sparsity")


def _space(model_type: str, space_name: str, model=None, windows=None) -> spaces.SearchSpace:
    model = build(model_type) if model is None else model
    windows = _windows() if windows is None else windows
    structure = spaces.Structure.of(model)
    return spaces.build(space_name, structure, SEQ, windows, options=PRUNING[space_name])


@pytest.fixture(scope="module", params=TYPES)
def model_type(request) -> str:
    return request.param


def _experts(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Experts")]


def _count(t: torch.Tensor, nonzero: bool) -> int:
    return int(t.count_nonzero()) if nonzero and t.dim() >= 2 else t.numel()


def _active(model: torch.nn.Module, nonzero: bool = False) -> int:
    """Parameters a token uses, counted from the model: all of them, less in each MoE layer
    the experts beyond the top k it runs (``nonzero``: matrices' nonzero weights only)."""
    total = sum(_count(p, nonzero) for p in {id(p): p for p in model.parameters()}.values())
    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            continue
        kept = experts.gate_up_proj.shape[0]
        per_expert = [_count(t[0], nonzero) for t in experts.parameters()]  # weights, biases
        router = getattr(layer.mlp, "gate", None) or layer.mlp.router
        total -= (kept - min(router.top_k, kept)) * sum(per_expert)
    return total


def _uniform(space: spaces.SearchSpace, level: int) -> tuple[int, ...]:
    return (level,) * len(space.genes)


@pytest.mark.parametrize("space_name", sorted(PRUNING))
def test_apply_costs_and_saved_model(model_type: str, space_name: str, tmp_path: Path) -> None:
    """A candidate applied in place, materialised, saved and reloaded gives the same logits;
    parameters, active parameters and FLOPs equal the model's tensors, the count above and
    torch's flop counter (eager experts: one counted matmul per routed token). A model that
    mixes dense and MoE MLP layers is refused in one line by the spaces with one width grid."""
    model = build(model_type)
    if model_type.endswith(":mixed") and space_name not in MIXED_ONLY:
        with pytest.raises(SearcherError, match="mix dense and mixture-of-experts MLP layers"):
            _space(model_type, space_name, model)
        return
    model.set_experts_implementation("eager")
    windows = _windows()
    ids = windows[:1]
    reference = logits(model, ids)
    space = _space(model_type, space_name, model, windows)
    tables = space.cost_tables()
    assert set(tables) >= {"flops", "params", "active_params"}
    # experts: 2 kept of 6 everywhere (top-k 2), a mix, 1 everywhere (top-k 1); others alike
    for c in (_uniform(space, 1), _mid(space), (0,) * len(space.genes)):
        space.apply(c)
        applied = logits(model, ids)
        pruned = space.materialize(c)
        pruned.set_experts_implementation("eager")
        torch.testing.assert_close(logits(pruned, ids), applied, atol=1e-5, rtol=1e-5)
        params = {id(p): p for p in pruned.parameters()}.values()
        sparse = space_name == "sparsity"  # dense shapes: the search counts nonzero weights
        assert sum(_count(p, sparse) for p in params) == tables["params"].cost(c), c
        assert _active(pruned, sparse) == tables["active_params"].cost(c), c
        assert counted_flops(pruned, ids) == tables["flops"].cost(c), c
        save_pruned(pruned, tmp_path / "m", {})
        again = load_pruned(tmp_path / "m")
        torch.testing.assert_close(logits(again, ids), applied, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(applied, reference, atol=1e-3)
    space.apply(space.dense())
    torch.testing.assert_close(logits(model, ids), reference, atol=1e-5, rtol=1e-5)


def test_pruning_experts_below_top_k_saves_active_compute(model_type: str) -> None:
    """Above top-k, removing experts saves parameters only (a token runs top-k experts
    whatever the count; the router loses a row); at fewer experts than top-k, compute too."""
    space = spaces.build("experts", spaces.Structure.of(build(model_type)), SEQ, _windows())
    tables = space.cost_tables()
    dense, two, one = space.dense(), _uniform(space, 1), _uniform(space, 0)
    assert tables["params"].cost(two) < tables["params"].cost(dense)
    layers = space.moe_layers
    row = sum(math.prod(layers[0].sizes[p][1:]) for p in layers[0].mlp.experts.router)
    router_rows = (6 - 2) * row * len(layers)  # each kept expert's router row (and bias)
    assert tables["active_params"].cost(dense) - tables["active_params"].cost(two) == router_rows
    assert tables["active_params"].cost(one) < tables["active_params"].cost(two)
    assert tables["flops"].cost(one) < tables["flops"].cost(two) < tables["flops"].cost(dense)


def test_sparsity_masks_each_expert_by_its_own_inputs(model_type: str) -> None:
    """Every row of every expert loses the same share of its weights, ranked by Wanda's score
    with the norms of that expert's own inputs (the tokens routed to it)."""
    model = build(model_type)
    space = _space(model_type, "sparsity", model)
    stacked = [gi for gi in range(len(space.genes)) if space._experts(gi)]
    assert stacked and all(".experts." in space.genes[gi].name for gi in stacked)
    level = space.sparsities.index(0.5)
    c = tuple(level if gi in stacked else len(g.values) - 1 for gi, g in enumerate(space.genes))
    stats = space._statistics(_windows(), 4)  # on the dense model, as the space's were
    space.apply(c)
    for gi in stacked:
        rows = space._rows(gi)
        assert torch.all((rows == 0).sum(1) == rows.shape[1] // 2)
        l2 = stats[space.genes[gi].name]
        assert l2.shape[0] == 6 and not torch.allclose(l2[0], l2[1])  # per expert
        dense = space._dense(gi)
        score = dense.abs().double() * l2.repeat_interleave(rows.shape[0] // 6, 0)
        inf = torch.tensor(float("inf"), dtype=score.dtype)
        kept_min = torch.where(rows != 0, score, inf).min(1).values
        zeroed_max = torch.where(rows == 0, score, -inf).max(1).values
        assert torch.all(kept_min >= zeroed_max)  # within each row, the lowest scores go


def test_width_ranks_each_experts_neurons_by_its_own_scores(model_type: str) -> None:
    """A level keeps every expert's own best neurons (not one neuron index for all), and the
    shared expert's best by its own scores."""
    if model_type.endswith(":mixed"):
        return  # refused above
    space = _space(model_type, "width")
    narrow = space.describe((0,) * len(space.genes))
    for gi, gene in enumerate(space.genes):
        if gene.kind != "mlp":
            continue
        kept = narrow[gene.name]["kept_neurons"]
        assert len(kept) == 6 and all(len(k) == space.mlp_sizes[0] for k in kept)
        assert len({tuple(k) for k in kept}) > 1  # experts keep different neurons
        order = space.neuron_order[gi // 2]
        assert kept == [sorted(o[: space.mlp_sizes[0]]) for o in order["experts"]]
        if model_type == "qwen2_moe":  # the shared expert: twice an expert's width
            assert narrow[gene.name]["shared_expert_intermediate_size"] == 2 * space.mlp_sizes[0]
    for unit_scores in space.priors()["unit_scores"]:
        assert unit_scores == sorted(unit_scores, reverse=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_every_width_level_runs_in_the_default_experts_kernel(model_type, dtype) -> None:
    """The width space's default grid (16 steps) of experts 32 neurons wide keeps multiples of
    8 neurons (not 2, 4, 6, ...: transformers' grouped_mm kernel refuses rows that are not
    whole multiples of 16 bytes), and every level runs through that kernel, in every family."""
    if model_type.endswith(":mixed"):
        return  # refused above
    model = build(model_type).to(dtype)
    assert model.config._experts_implementation == "grouped_mm"
    space = spaces.build("width", spaces.Structure.of(model), SEQ, _windows())
    assert space.mlp_sizes == [8, 16, 24, 32]
    ids = _windows()[:1]
    for level in range(len(space.mlp_sizes)):
        space.apply(tuple(level if g.kind == "mlp" else 0 for g in space.genes))
        assert torch.isfinite(logits(model, ids)).all()
        for layer in space.structure.moe_layers:
            experts = layer.module.get_submodule(layer.mlp.experts.module)
            assert experts.gate_up_proj[0].numel() == 2 * space.mlp_sizes[level] * 96


def test_a_shared_expert_of_no_whole_multiple_of_the_width_is_kept_whole(tmp_path: Path):
    """Qwen2-MoE with a shared expert 1.5 experts wide: width prunes the routed experts and
    keeps the shared expert whole; costs stay exact and the uniform export is the family's
    own checkpoint with the shared expert's width unchanged."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "qwen2_moe", **MOE, num_experts=6, moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)
    model.set_experts_implementation("eager")
    space = spaces.build(
        "width", spaces.Structure.of(model), SEQ, _windows(), options={"mlp_steps": 4}
    )
    c = (1,) * len(space.genes)
    pruned = space.materialize(c)
    pruned.set_experts_implementation("eager")
    ids = _windows()[:1]
    shared = pruned.model.layers[0].mlp.shared_expert
    assert shared.down_proj.weight.shape[1] == 48
    assert pruned.model.layers[0].mlp.experts.down_proj.shape[2] == space.mlp_sizes[1]
    tables = space.cost_tables()
    assert sum(p.numel() for p in pruned.parameters()) == tables["params"].cost(c)
    assert counted_flops(pruned, ids) == tables["flops"].cost(c)
    info = save_pruned(pruned, tmp_path / "m", {})
    assert info["remote_code"] is False
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["shared_expert_intermediate_size"] == 48
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(logits(reloaded, ids), logits(pruned, ids), atol=1e-5, rtol=1e-5)


def test_moe_space_levels_pair_experts_and_width(model_type: str) -> None:
    """One gene per MoE block over (experts, neurons) pairs, ordered by the share of the
    routed experts' weights kept; its costs are the product's, not a sum."""
    if model_type.endswith(":mixed"):
        return
    space = _space(model_type, "moe")
    tables = space.cost_tables()
    for gi, pairs in space.pairs.items():
        keep = space.genes[gi].keep
        assert list(keep) == sorted(keep) and keep[-1] == 1.0
        assert {c for c, _ in pairs} == {2, 4, 6} and len(pairs) == 3 * 4
        counts = [space.genes[gi].values[i][0] for i in range(len(pairs))]
        assert counts == [c for c, _ in pairs]
    gi = next(iter(space.pairs))
    level = space.genes[gi].values.index((2, space.mlp_sizes[0]))
    c = list(space.dense())
    c[gi] = level
    described = space.describe(tuple(c))[space.genes[gi].name]
    assert described["num_experts"] == 2 and len(described["kept_neurons"]) == 2
    assert set(described["kept_neurons"]) == {str(e) for e in described["kept_experts"]}
    assert tables["params"].cost(tuple(c)) < tables["params"].cost(space.dense())


def test_experts_space_refuses_a_dense_model() -> None:
    structure = spaces.Structure.of(build("llama"))
    with pytest.raises(SearcherError, match="needs a mixture-of-experts model"):
        spaces.build("experts", structure, SEQ, _windows())


def _routing(model: torch.nn.Module, gate: torch.nn.Module, block: torch.nn.Module, ids):
    """The router's input, its (logits, weights, indices) and the MoE block's output."""
    seen = {}

    def router(_m, args, out):
        seen["x"], seen["gate"] = args[0].detach(), tuple(o.detach() for o in out)

    def output(_m, _args, out):
        out = out[0] if isinstance(out, tuple) else out  # gpt-oss: (output, router scores)
        seen["out"] = out.detach().reshape(-1, out.shape[-1])

    handles = [gate.register_forward_hook(router), block.register_forward_hook(output)]
    try:
        logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_removing_an_expert_changes_nothing_for_tokens_never_routed_to_it(model_type: str):
    """Layer 0 loses its last-ranked expert. The router's softmax runs over the experts kept:
    top-k weights and indices are softmax(kept logits)'s top k, divided by their sum where
    the family renormalises. A token whose top k never included the removed expert keeps
    its experts; with renormalisation its weights and the block's output are the dense
    model's; without, its weights are divided by the kept experts' probability mass."""
    model = build(model_type)
    space = spaces.build("experts", spaces.Structure.of(model), SEQ, _windows())
    layer = space.moe_layers[0]
    moe = layer.mlp.experts
    gate, block = layer.module.get_submodule(moe.gate), layer.module.get_submodule("mlp")
    ids = _windows(8)
    dense = _routing(model, gate, block, ids)
    last = moe.count - 1  # the lowest-ranked expert: after the space's permutation, the last
    space.apply((len(space.genes[0].values) - 2, *space.dense()[1:]))
    pruned = _routing(model, gate, block, ids)
    torch.testing.assert_close(pruned["x"], dense["x"])  # layer 0's router sees the same input
    full_logits, weights, index = dense["gate"]
    kept_logits, new_weights, new_index = pruned["gate"]
    assert kept_logits.shape[-1] == last
    torch.testing.assert_close(kept_logits, full_logits[:, :last])
    # the documented normalisation, for every token
    probs = torch.softmax(kept_logits.float(), dim=-1)
    expect, expect_index = torch.topk(probs, moe.top_k, dim=-1)
    if moe.renormalised:
        expect = expect / expect.sum(-1, keepdim=True)
    assert torch.equal(new_index, expect_index)
    torch.testing.assert_close(new_weights.float(), expect, atol=1e-6, rtol=1e-5)
    # tokens never routed to the removed expert
    never = ~(index == last).any(-1)
    assert 0 < int(never.sum()) < len(never)  # some tokens of each kind
    assert torch.equal(new_index[never], index[never])
    mass = 1 - torch.softmax(full_logits.float(), -1)[:, last]
    if moe.renormalised:
        torch.testing.assert_close(new_weights[never], weights[never], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(pruned["out"][never], dense["out"][never], atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(
            new_weights[never].float(), weights[never].float() / mass[never, None],
            atol=1e-6, rtol=1e-5,
        )  # fmt: skip
    assert not torch.allclose(pruned["out"][~never], dense["out"][~never], atol=1e-4)


@pytest.mark.parametrize("order", ["contribution", "frequency"])
def test_levels_keep_the_best_experts_first(model_type: str, order: str) -> None:
    space = spaces.build(
        "experts", spaces.Structure.of(build(model_type)), SEQ, _windows(8),
        options={"order": order},
    )  # fmt: skip
    priors = space.priors()
    for ranked in priors[f"expert_{order}"]:
        assert ranked == sorted(ranked, reverse=True)
    for freq in priors["expert_frequency"]:  # shares of the tokens: top-k of them in all
        assert sum(freq) == pytest.approx(2.0)


def test_frequency_baseline_drops_the_least_routed_experts_model_wide(model_type: str) -> None:
    """One global threshold: every expert kept is routed at least as often as every expert
    dropped, in whichever layer; the next threshold (also keeping the most-routed dropped
    experts) breaks the budget."""
    space = spaces.build(
        "experts", spaces.Structure.of(build(model_type)), SEQ, _windows(8),
        options={"order": "frequency"},
    )  # fmt: skip
    problem = problem_for(space, Budget.parse("params=0.75"))
    chosen = ExpertFrequency(problem, 0, 4).allocate()
    assert problem.feasible(chosen)
    freq = space.priors()["expert_frequency"]
    kept = [f for gene, level in zip(freq, chosen) for f in gene[: level + 1]]
    dropped = [(f, g) for g, (gene, level) in enumerate(zip(freq, chosen))
               for f in gene[level + 1 :]]  # fmt: skip
    assert dropped and min(kept) >= max(f for f, _ in dropped)
    top = max(f for f, _ in dropped)  # the next threshold keeps every expert routed as often
    more = list(chosen)
    for f, g in dropped:
        more[g] += f == top
    assert not problem.feasible(tuple(more))


FULL = [t for t in TYPES if not t.endswith(":mixed")]
RUNS = [
    *((t, "experts", "params=0.8", "evo") for t in TYPES),
    *((t, "moe", "flops=0.6", "evo") for t in FULL),
    ("qwen2_moe", "width", "flops=0.7", "evo"),
    ("olmoe", "joint", "flops=0.6", "evo"),
    ("qwen2_moe:mixed", "depth", "flops=0.7", "evo"),
    ("qwen3_moe", "sparsity", "sparsity=0.4", "evo"),
    ("mixtral", "sparsity", "sparsity=0.4", "owl"),
    ("mixtral", "experts", "active_params=0.9", "evo"),
    ("olmoe", "experts", "params=0.7", "frequency"),
    ("qwen3_moe", "experts", "params=0.7", "uniform"),
]


@pytest.mark.parametrize(("model_type", "space_name", "budget", "algo"), RUNS)
def test_search_and_export(model_type, space_name, budget, algo, tmp_path: Path, capsys) -> None:
    """``searcher run`` on a saved MoE model, then ``export --format pruned`` (which checks
    that the saved model's validation KL is the search's): the loaded export has exactly the
    parameters and active parameters the search claimed, and the summary shows both."""
    model_dir = _save(model_type, tmp_path / "model")
    options = [f"--space-option={k}={v}" for k, v in PRUNING[space_name].items()]
    code = main(["run", "--model", str(model_dir), "--space", space_name, "--budget", budget,
                 "--algo", algo, "--out", str(tmp_path / "run"), *options, *TINY])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    shown = [line.split()[1] for line in out.splitlines() if "of dense (" in line]
    assert {"params", "active_params"} <= set(shown), out
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    code = main(["export", str(tmp_path / "run"), "--format", "pruned", "--out",
                 str(tmp_path / "m")])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    kl = float(out.split("validation KL ")[1].split()[0])
    assert kl == pytest.approx(best["validation"]["kl"], rel=1e-4)
    loaded = load_pruned(tmp_path / "m")
    sparse = space_name == "sparsity"  # zeros in dense shapes: nonzero weights counted
    assert sum(_count(p, sparse) for p in loaded.parameters()) == best["costs"]["params"]
    assert _active(loaded, sparse) == best["costs"]["active_params"]
    if space_name in ("experts", "moe"):
        counts = [len(v["kept_experts"]) for v in best["config"].values() if "kept_experts" in v]
        assert counts and sum(counts) <= 6 * len(counts)


def test_onnx_and_latency_say_moe_is_not_supported(model_type: str, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from searcher.export.onnx import export_onnx

    model = build(model_type)
    space = spaces.build("experts", spaces.Structure.of(model), SEQ, _windows())
    session = SimpleNamespace(space=space, windows=SimpleNamespace(validation=_windows()[:1]))
    with pytest.raises(SearcherError, match="ONNX export do not support mixture-of-experts"):
        export_onnx(space.materialize(space.dense()), session, tmp_path / "onnx")


CASES = [(t, kind) for t in TYPES for kind in ("experts", "experts-uniform", "depth")] + [
    (t, kind) for t in FULL for kind in ("width", "moe", "moe-uniform", "sparsity")
]


def _candidate(space: spaces.SearchSpace, kind: str) -> tuple[int, ...]:
    if kind == "experts-uniform":
        return _uniform(space, 2)  # 3 experts in every layer: the family's own config
    if kind == "moe-uniform":  # 4 experts of 6, 2 neurons of 4 steps, 1 KV group of 2
        return tuple(
            g.values.index((4, space.mlp_sizes[1])) if gi in space.pairs else 0
            for gi, g in enumerate(space.genes)
        )  # fmt: skip
    if kind == "sparsity":
        return _mid(space)
    if kind in ("experts", "width", "moe"):  # gene i at level i: layers differ
        return tuple(min(i, len(g.values) - 1) for i, g in enumerate(space.genes))
    genes = list(space.dense())
    genes[0] = genes[3] = 0  # layer 0's attention and layer 1's MLP removed
    return tuple(genes)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """Every case saved with ``save_pruned`` and loaded by one isolated subprocess (plain
    transformers, searcher not importable: the loader of tests/test_export_hf.py)."""
    root = tmp_path_factory.mktemp("moe-exports")
    ids = _windows()[:1]
    cases = {}
    for model_type, kind in CASES:
        model = build(model_type)
        space = _space(model_type, kind.split("-")[0], model)
        pruned = copy.deepcopy(space.materialize(_candidate(space, kind)))
        out = root / f"{model_type}-{kind}"
        info = save_pruned(pruned, out, {})
        cases[(model_type, kind)] = {"dir": str(out), "info": info, "logits": logits(pruned, ids)}
    result = load_without_searcher(root, [c["dir"] for c in cases.values()], ids)
    return {"cases": cases, "result": result}


@pytest.mark.parametrize(("model_type", "kind"), CASES, ids=[f"{t}-{k}" for t, k in CASES])
def test_export_loads_and_generates_without_searcher(exported, model_type, kind) -> None:
    """Per-layer expert counts and removed blocks load with the copied modeling file
    (``trust_remote_code=True``); the same count in every layer is the family's ordinary
    checkpoint (its config's expert count and top-k). Either gives the scored model's logits,
    and cached greedy decoding equals a full recompute."""
    case = exported["cases"][(model_type, kind)]
    assert exported["result"]["searcher_importable"] is False
    got = exported["result"]["models"][case["dir"]]
    # a model mixing dense and MoE layers has per-layer widths: recorded as such; OLMoE's
    # config sizes its q/k norms from hidden_size, so fewer heads need the modeling file too
    remote = (
        not kind.endswith(("-uniform", "sparsity"))
        or model_type.endswith(":mixed")
        or (model_type, kind) == ("olmoe", "moe-uniform")
    )
    assert case["info"]["remote_code"] is remote
    diff = (torch.tensor(got["logits"]) - case["logits"]).abs().max()
    assert diff < 1e-4
    counts = [s["num_experts"] for s in case["info"]["layers"] if "num_experts" in s]
    if kind.startswith("experts"):  # recorded per MoE layer (the mixed model's layer 1 is dense)
        uniform = kind == "experts-uniform"
        assert counts == ([3] * len(counts) if uniform else list(range(1, len(counts) + 1)))
    if kind == "moe-uniform":
        assert counts == [4] * len(counts)
    if remote:
        assert got["cached"] == got["recomputed"]
        assert got["cached_vs_recomputed_logits"] < 1e-4
    else:  # the family's own config, with the pruned counts
        config = json.loads((Path(case["dir"]) / "config.json").read_text())
        assert config.get("num_experts", config.get("num_local_experts")) == counts[0]
        assert config["num_experts_per_tok"] == 2


def test_uniform_baseline_keeps_the_same_count_in_every_layer(model_type: str) -> None:
    space = spaces.build("experts", spaces.Structure.of(build(model_type)), SEQ, _windows())
    problem = problem_for(space, Budget.parse("params=0.8"))
    chosen = problem.uniform()
    assert len(set(chosen)) == 1 and problem.feasible(chosen)
    assert np.all(np.asarray(chosen) < len(space.genes[0].values) - 1)
