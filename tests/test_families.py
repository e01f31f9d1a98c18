"""Every model family through every space: apply, exact costs, saved and reloaded models, and
latency tables; and one real search and export per family module.

Adding a family means adding its tiny config to ``CONFIGS`` (a test below fails until every
registered model type has one). The configs exercise grouped-query attention with groups of
3 query heads, a head size other than hidden / heads, biases, tied and untied heads, and
three layers, wherever the family allows them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import spaces
from latency_models.backends import Timing
from searcher.cli import main
from searcher.export import load_pruned
from searcher.export.pruned import save_pruned
from searcher.families import FAMILIES, MODEL_TYPES
from searcher.latency import LatencySettings, latency_costs, profile_space
from tests.helpers import counted_flops, logits, tiny_tokenizer

VOCAB = 320
SEQ = 16
GQA = dict(
    vocab_size=VOCAB, hidden_size=96, intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
)  # fmt: skip


def _config(model_type: str, **extra) -> Callable[[], object]:
    def make():
        from transformers import AutoConfig

        return AutoConfig.for_model(model_type, **extra)

    return make


CONFIGS: dict[str, Callable[[], object]] = {
    "llama": _config("llama", **GQA, tie_word_embeddings=True),
    "mistral": _config("mistral", **GQA, tie_word_embeddings=False),
    "qwen2": _config("qwen2", **GQA, tie_word_embeddings=True),  # q/k/v biases
    "qwen3": _config("qwen3", **GQA, tie_word_embeddings=False),  # per-head q/k norms
    "granite": _config(
        "granite",
        **GQA,
        tie_word_embeddings=True,
        embedding_multiplier=2.0,
        attention_multiplier=0.2,
        residual_multiplier=0.5,
        logits_scaling=4.0,
    ),  # fmt: skip
    "olmo2": _config("olmo2", **GQA, tie_word_embeddings=False),  # q/k norms over all heads
    "gemma": _config("gemma", **GQA, hidden_activation="gelu_pytorch_tanh"),
    "gemma2": _config("gemma2", **GQA, sliding_window=32, query_pre_attn_scalar=8),
    "gemma3_text": _config("gemma3_text", **GQA, sliding_window=8, query_pre_attn_scalar=8),
    "phi3": _config("phi3", **GQA, tie_word_embeddings=False, pad_token_id=0),  # fused
    "gpt2": _config(
        "gpt2", vocab_size=VOCAB, n_embd=64, n_head=4, n_layer=3, n_inner=96, n_positions=128
    ),  # fmt: skip
    "gpt_neox": _config(
        "gpt_neox",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        rotary_pct=0.5,
        max_position_embeddings=128,
        use_parallel_residual=True,
        tie_word_embeddings=False,
    ),  # fmt: skip
    "opt": _config(
        "opt",
        vocab_size=VOCAB,
        hidden_size=64,
        ffn_dim=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=128,
        pad_token_id=1,
        tie_word_embeddings=True,
    ),  # fmt: skip
    "falcon": _config(
        "falcon",
        vocab_size=VOCAB,
        hidden_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_kv_heads=2,
        new_decoder_architecture=True,
        ffn_hidden_size=128,
        alibi=False,
        bias=True,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    ),  # fmt: skip
    # a variant of a layout the family handles differently: "model type:variant"
    "falcon:multi_query": _config(
        "falcon",
        vocab_size=VOCAB,
        hidden_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        multi_query=True,
        new_decoder_architecture=False,
        parallel_attn=True,
        alibi=False,
        max_position_embeddings=128,
    ),  # fmt: skip
    "gpt_neox:sequential": _config(
        "gpt_neox",
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        rotary_pct=0.25,
        max_position_embeddings=128,
        use_parallel_residual=False,
        tie_word_embeddings=True,
    ),  # fmt: skip
}
# mixture-of-experts families (tests/test_moe.py): 6 experts, top 2; Qwen2-MoE with a shared
# expert twice an expert's width, and (":mixed") with a dense MLP in layer 1
MOE = dict(GQA, head_dim=16, num_experts_per_tok=2)
MOE_CONFIGS: dict[str, Callable[[], object]] = {
    "mixtral": _config("mixtral", **{**MOE, "intermediate_size": 32}, num_local_experts=6),
    "qwen2_moe": _config(
        "qwen2_moe",
        **MOE,
        num_experts=6,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        tie_word_embeddings=True,
    ),
    "qwen2_moe:mixed": _config(
        "qwen2_moe",
        **MOE,
        num_experts=6,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        mlp_only_layers=[1],
    ),  # fmt: skip
    "qwen3_moe": _config(
        "qwen3_moe", **MOE, num_experts=6, moe_intermediate_size=32, norm_topk_prob=True
    ),  # fmt: skip
    "olmoe": _config("olmoe", **{**MOE, "intermediate_size": 32}, num_experts=6, eos_token_id=1),
    # attention sinks, biases; transposed, interleaved experts with biases; a router bias
    "gpt_oss": _config(
        "gpt_oss", **{**MOE, "intermediate_size": 32}, num_local_experts=6, sliding_window=8
    ),
}
# one model type per family module: the whole command-line search and export
SEARCHED = {"llama", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox", "opt", "falcon"}
OPTIONS = {"width": {"mlp_steps": 4}, "depth": {}, "sparsity": {"step": 0.25, "max_sparsity": 0.75},
           "joint": {"mlp_steps": 4}}  # fmt: skip
BUDGETS = {"width": "flops=0.7", "depth": "flops=0.7", "sparsity": "sparsity=0.4",
           "joint": "flops=0.5"}  # fmt: skip


def build(model_type: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = {**CONFIGS, **MOE_CONFIGS}[model_type]()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # larger weights than the default init, so pruning visibly hurts
        for p in model.parameters():
            if p.dim() >= 2:  # matrices, and MoE experts' stacked matrices
                p.normal_(0, 0.15)
    return model.eval().requires_grad_(False)


def test_every_registered_model_type_is_tested() -> None:
    assert {name.split(":")[0] for name in [*CONFIGS, *MOE_CONFIGS]} == set(MODEL_TYPES)
    searched = [*SEARCHED, *(t.split(":")[0] for t in MOE_CONFIGS)]
    assert {MODEL_TYPES[t.split(":")[0]].name for t in searched} == set(FAMILIES)


def _windows(n: int = 4) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))


def _mid(space: spaces.SearchSpace) -> tuple[int, ...]:
    rng = np.random.default_rng(1)
    return tuple(int(rng.integers(0, k)) for k in space.n_levels)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model_type(request) -> str:
    return request.param


@pytest.mark.parametrize("space_name", sorted(OPTIONS))
def test_apply_costs_and_saved_model(model_type: str, space_name: str, tmp_path: Path) -> None:
    """A candidate applied in place, materialised, and saved then reloaded gives the same
    logits; FLOPs and parameters equal torch's flop counter and the model's tensors."""
    model = build(model_type)
    windows = _windows()
    ids = windows[:1]
    reference = logits(model, ids)
    structure = spaces.Structure.of(model)
    space = spaces.build(space_name, structure, SEQ, windows, options=OPTIONS[space_name])
    if space_name == "depth":  # the default start's prior, read through every family's layout
        ratios = space.priors()["residual_ratio"]
        assert len(ratios) == len(space.genes) and all(0 < r < float("inf") for r in ratios)
    tables = space.cost_tables()
    smallest = (0,) * len(space.genes)
    for c in (_mid(space), smallest):
        space.apply(c)
        applied = logits(model, ids)
        pruned = space.materialize(c)
        torch.testing.assert_close(logits(pruned, ids), applied, atol=1e-5, rtol=1e-5)
        params = {id(p): p for p in pruned.parameters()}.values()
        if space_name == "sparsity":  # dense shapes: the search counts the nonzero weights
            zeros = sum(int((p == 0).sum()) for p in params if p.dim() == 2)
            assert sum(p.numel() for p in params) - zeros == tables["params"].cost(c)
        else:
            assert sum(p.numel() for p in params) == tables["params"].cost(c), c
        assert counted_flops(pruned, ids) == tables["flops"].cost(c), c
        save_pruned(pruned, tmp_path / "m", {})
        again = load_pruned(tmp_path / "m")
        torch.testing.assert_close(logits(again, ids), applied, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(applied, reference, atol=1e-3)
    space.apply(space.dense())
    torch.testing.assert_close(logits(model, ids), reference, atol=1e-5, rtol=1e-5)


LATENCY = [("torch-cpu", name) for name in sorted(OPTIONS)] + [("ort-cpu", "width")]


@pytest.mark.parametrize(("device", "space_name"), LATENCY)
def test_latency_table(model_type: str, device: str, space_name: str) -> None:
    """The family's lean block is timed for every size the space can take, and the table
    prices candidates (the smallest no slower than dense)."""
    model = build(model_type)
    space = spaces.build(
        space_name, spaces.Structure.of(model), SEQ, _windows(), options=OPTIONS[space_name]
    )
    quick = Timing(warmup=0, repeats=1, min_seconds=0.0, max_repeats=1)
    # ONNX Runtime's thread pool is one per process: the size other tests use (every core)
    settings = LatencySettings(
        device=device, seq_len=SEQ, threads=1 if device == "torch-cpu" else None
    )
    table = profile_space(space, settings, corrections=2, block_timing=quick, model_timing=quick)
    for kind in ("prefill", "decode"):
        costs = latency_costs(table, space, kind)
        dense, smallest = costs.dense(), costs.cost((0,) * len(space.genes))
        assert math.isfinite(dense) and dense > 0
        assert smallest <= dense
    assert table.model["layers"] == len(space.structure.layers)


def _save(model_type: str, path: Path) -> Path:
    build(model_type).save_pretrained(path)
    tiny_tokenizer(VOCAB).save_pretrained(path)
    return path


TINY = ["--seq-len", "24", "--importance-windows", "2", "--validation-windows", "2",
        "--offspring", "4", "--stages", "1:2,2:1", "--threads", "1", "--evals", "4"]  # fmt: skip


@pytest.mark.parametrize("space_name", sorted(OPTIONS))
@pytest.mark.parametrize("searched_type", sorted(SEARCHED))
def test_search_and_export(searched_type: str, space_name: str, tmp_path: Path, capsys) -> None:
    """``searcher run`` on a saved model of the family, then ``searcher export --format
    pruned``: the export checks that the saved model's validation KL is the search's."""
    model_dir = _save(searched_type, tmp_path / "model")
    options = [f"--space-option={k}={v}" for k, v in OPTIONS[space_name].items()]
    code = main(["run", "--model", str(model_dir), "--space", space_name, "--budget",
                 BUDGETS[space_name], "--out", str(tmp_path / "run"), *options, *TINY])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    code = main(["export", str(tmp_path / "run"), "--format", "pruned", "--out",
                 str(tmp_path / "m")])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    kl = float(out.split("validation KL ")[1].split()[0])
    assert kl == pytest.approx(best["validation"]["kl"], rel=1e-4)
    saved = json.loads((tmp_path / "m" / "pruned_config.json").read_text())
    assert saved["family"] == MODEL_TYPES[searched_type.split(":")[0]].name
    if space_name != "width":
        return  # search and pruned export are checked above; the ONNX graph of every family x
        # space: test_onnx_model_generates_torchs_tokens
    # through the CLI once per family: the export checks prefill and cached decode in ONNX
    # Runtime against torch's logits
    code = main(["export", str(tmp_path / "run"), "--format", "onnx", "--out",
                 str(tmp_path / "onnx")])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err  # Gemma 3's window of 8 tokens too: the graph applies windows
    assert (tmp_path / "onnx" / "model.onnx").is_file()


PROMPTS = [[5, 17, 42, 7, 99], [3, 250, 64]]
STEPS = 16
DEPTH = (0, 1, 1, 0, 1, 1)  # layer 0 without attention, layer 1 without MLP
# joint: layer 0 without attention and its MLP at a quarter, layer 1 with one KV group and
# without MLP, layer 2 with every KV group and three quarters of its MLP
JOINT = (0, 1, 1, 0, 99, 3)


def _removing(space: spaces.SearchSpace) -> tuple[int, ...]:
    """A candidate that removes layer 0's attention (depth: DEPTH; joint: JOINT)."""
    chosen = DEPTH if space.name == "depth" else JOINT
    return tuple(min(level, n - 1) for level, n in zip(chosen, space.n_levels, strict=True))


@pytest.mark.parametrize("space_name", sorted(OPTIONS))
def test_onnx_model_generates_torchs_tokens(model_type: str, space_name: str, tmp_path: Path):
    """The pruned model's ``model.onnx``, written and checked as ``searcher export --format
    onnx`` does, run by plain ONNX Runtime: greedy tokens after a prompt equal Hugging Face's
    ``generate``, a left-padded batch of two prompts gives each one's tokens alone, and the
    files take at most 1.3x the pruned model's safetensors."""
    from types import SimpleNamespace

    import onnx

    from searcher.export.onnx import export_onnx
    from tests.ort_generate import greedy, ort_session, torch_greedy

    model = build(model_type)
    windows = _windows()
    space = spaces.build(
        space_name, spaces.Structure.of(model), SEQ, windows, options=OPTIONS[space_name]
    )
    removing = space_name in ("depth", "joint")
    pruned = space.materialize(_removing(space) if removing else _mid(space))
    session = SimpleNamespace(space=space, windows=SimpleNamespace(validation=windows[:1]))
    res = export_onnx(pruned, session, tmp_path / "onnx")
    assert res["files"] == ["model.onnx"] and res["decode_steps"] == SEQ // 2
    path = tmp_path / "onnx" / "model.onnx"
    tied = pruned.get_input_embeddings().weight is pruned.get_output_embeddings().weight
    tables = [t for t in onnx.load(str(path)).graph.initializer if t.dims[:1] == [VOCAB]]
    assert len(tables) == (1 if tied else 2)  # a tied embedding and head stored once
    sess = ort_session(path)
    names = {i.name for i in sess.get_inputs()}
    assert ("past_key_values.0.key" in names) == (not removing)  # no attention: no cache
    alone = [greedy(sess, [p], STEPS)[0] for p in PROMPTS]
    assert alone[0] == torch_greedy(pruned, PROMPTS[0], STEPS)
    assert greedy(sess, PROMPTS, STEPS) == alone
    save_pruned(pruned, tmp_path / "pruned", {})
    assert res["bytes"] <= 1.3 * (tmp_path / "pruned" / "model.safetensors").stat().st_size


def test_onnx_weights_beside_the_graph_past_2gb(tmp_path: Path) -> None:
    """Weights go to model.onnx.data beside the graph where they pass 2 GB (forced here): plain
    ONNX Runtime loads the pair and generates the same tokens."""
    from types import SimpleNamespace

    import onnx

    from searcher.export.onnx import export_onnx
    from tests.ort_generate import greedy, torch_greedy

    model, windows = build("llama"), _windows()
    space = spaces.build(
        "width", spaces.Structure.of(model), SEQ, windows, options={"mlp_steps": 4}
    )
    session = SimpleNamespace(space=space, windows=SimpleNamespace(validation=windows[:1]))
    pruned = space.materialize(_mid(space))
    res = export_onnx(pruned, session, tmp_path / "o", external=True)
    assert res["files"] == ["model.onnx", "model.onnx.data"]
    assert (tmp_path / "o" / "model.onnx").stat().st_size < 100_000  # the graph alone
    onnx.checker.check_model(str(tmp_path / "o" / "model.onnx"))
    assert greedy(tmp_path / "o" / "model.onnx", PROMPTS[:1], STEPS) == [
        torch_greedy(pruned, PROMPTS[0], STEPS)
    ]
