"""Odd shapes (issue 34): hidden size 96, 6 query heads over 2 KV heads, MLPs of 160 neurons on
the width space's default 1/16 grid, MoE layers of 6 experts (top 2), in float32 and bfloat16.

transformers runs MoE experts with its grouped_mm kernel, which refuses rows that are not
whole multiples of 16 bytes: a 1/16 grid of 160 neurons would keep experts 150 wide. The
width space keeps expert widths on multiples of 8 neurons instead, so every level runs. Each
model is searched (``searcher.run.run``, as ``searcher run`` calls it), exported in the ``pruned``
format (``export_run``, as ``searcher export`` calls it, which checks the saved model's KL
against the search's) and loaded in plain transformers by a process where searcher cannot be
imported: its logits are those of the model the search scored.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import spaces
from searcher.errors import SearcherError
from searcher.export import export_run
from searcher.families.moe import EXPERT_WIDTH_MULTIPLE
from searcher.run import read_config, run, session_of_config
from searcher.spec import RunSpec
from spaces.width import mlp_levels
from tests.helpers import logits, tiny_tokenizer
from tests.test_export_hf import load_without_searcher

VOCAB = 320
ODD = dict(
    vocab_size=VOCAB, hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=128, intermediate_size=160,
)  # fmt: skip
MOE = dict(num_experts_per_tok=2, output_router_logits=False)
CONFIGS = {
    "llama": dict(ODD, tie_word_embeddings=True),
    "mixtral": dict(ODD, **MOE, num_local_experts=6),
    "olmoe": dict(ODD, **MOE, num_experts=6, eos_token_id=1),
}
DTYPES = ("float32", "bfloat16")
CASES = [(t, d) for t in CONFIGS for d in DTYPES]
SETTINGS = dict(
    space="width", budget="params=0.8", seq_len=24, importance_windows=2,
    validation_windows=2, offspring=4, stages="1:2,2:1", threads=1, evals=4,
)  # fmt: skip


def _model(model_type: str, dtype: torch.dtype = torch.float32, **extra) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**CONFIGS[model_type], **extra})
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights than the default init, so pruning visibly hurts
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
    return model.to(dtype).eval().requires_grad_(False)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


def test_expert_widths_are_aligned_and_dense_widths_are_not_changed() -> None:
    """The default grid of 160 neurons: tenths of it for a dense MLP; for experts, each width
    rounded to a multiple of 8 (16 bytes in bfloat16), the dense width kept."""
    assert mlp_levels(160, 16) == list(range(10, 161, 10))
    moe = mlp_levels(160, 16, 1, EXPERT_WIDTH_MULTIPLE)
    assert EXPERT_WIDTH_MULTIPLE == 8
    assert moe == [8, 16, 32, 40, 48, 64, 72, 80, 88, 96, 112, 120, 128, 144, 152, 160]
    assert mlp_levels(32, 16, 1, 8) == [8, 16, 24, 32]  # repeats dropped
    assert mlp_levels(103, 4, 1, 8) == [24, 48, 80, 103]  # the dense width as it is
    assert mlp_levels(103, 16, 16, 8) == [103]
    assert mlp_levels(6, 4, 1, 8) == [6]  # no multiple under the dense width


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPES)
@pytest.mark.parametrize("model_type", ["mixtral", "olmoe"])
def test_every_moe_width_level_runs(model_type: str, dtype: torch.dtype) -> None:
    """Every MLP level of the width space's default grid, in every layer at once, runs through
    transformers' default experts kernel (grouped_mm), and narrower levels change the logits."""
    model = _model(model_type, dtype)
    assert model.config._experts_implementation == "grouped_mm"
    windows = _ids()
    space = spaces.build("width", spaces.Structure.of(model), 16, windows)
    assert len(space.mlp_sizes) == 16 and all(w % 8 == 0 for w in space.mlp_sizes)
    attn = len(space.group_counts) - 1
    dense = logits(model, windows[:1])
    for level in range(len(space.mlp_sizes)):
        space.apply(tuple(level if g.kind == "mlp" else attn for g in space.genes))
        out = logits(model, windows[:1])
        assert torch.isfinite(out).all()
        experts = model.model.layers[0].mlp.experts
        assert experts.down_proj.shape[-1] == space.mlp_sizes[level]
        if level < len(space.mlp_sizes) - 1:
            assert not torch.allclose(out, dense)
    torch.testing.assert_close(out, dense, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("width", "dtype", "advice"),
    [(100, torch.bfloat16, "--dtype float32"), (102, torch.float32, "no dtype fixes that")],
)
def test_experts_the_kernel_cannot_run_are_refused_in_one_line(width, dtype, advice) -> None:
    """A model whose own experts grouped_mm cannot run (rows of 200 bytes in bfloat16, 408 in
    float32) is refused before anything runs it, in one line that says what to do; the same
    width where it runs (100 neurons in float32) is accepted."""
    model = _model("mixtral", dtype, intermediate_size=width)
    with pytest.raises(SearcherError, match=advice) as info:
        spaces.Structure.of(model)
    assert "\n" not in str(info.value) and f"{width} neurons wide" in str(info.value)
    if width == 100:
        spaces.Structure.of(_model("mixtral", torch.float32, intermediate_size=width))


def _search_and_export(root: Path, model_type: str, dtype: str, ids: torch.Tensor) -> dict:
    """One case searched and exported, and the logits of the model its search scored."""
    name = f"{model_type}-{dtype}"
    model_dir = root / "models" / model_type
    if not model_dir.is_dir():
        _model(model_type).save_pretrained(model_dir)
        tiny_tokenizer(VOCAB).save_pretrained(model_dir)
    spec = RunSpec(model=str(model_dir), dtype=dtype, out=str(root / "runs" / name), **SETTINGS)
    result = run(spec)
    exported = export_run(result.out, "pruned", root / "exports" / name)
    # the model the search scored: the run's session rebuilt, the best config applied
    best = str(Path(result.out) / "best.json")
    session, genes = session_of_config(best, read_config(best, None))
    session.space.apply(genes)
    model = session.loaded.model
    scored = {"grouped_mm": logits(model, ids)}  # transformers' default experts kernel
    if model_type != "llama":
        # in a fresh process transformers runs the export's remote-code class with eager
        # experts (it finds no @use_experts_implementation in that file's source)
        model.set_experts_implementation("eager")
        scored["eager"] = logits(model, ids)
        model.set_experts_implementation("grouped_mm")
    return {
        "best": result.best,
        "export": exported,
        "dir": str(root / "exports" / name),
        "scored": scored,
        "widths": [session.space.mlp_sizes[genes[i]] for i in range(1, len(genes), 2)],
    }


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> dict:
    """Every case searched, exported and its scored model's logits taken (or why it failed:
    each case fails alone); the exports all loaded by one subprocess without searcher."""
    root = tmp_path_factory.mktemp("odd-shapes")
    ids = _ids()
    cases = {}
    for model_type, dtype in CASES:
        try:
            cases[(model_type, dtype)] = _search_and_export(root, model_type, dtype, ids)
        except Exception as exc:  # reported by the case's own test
            cases[(model_type, dtype)] = {"error": f"{type(exc).__name__}: {exc}"}
    dirs = [c["dir"] for c in cases.values() if "dir" in c]
    loaded = load_without_searcher(root, dirs, ids) if dirs else {}
    return {"cases": cases, "loaded": loaded}


@pytest.mark.parametrize(("model_type", "dtype"), CASES, ids=[f"{t}-{d}" for t, d in CASES])
def test_search_export_and_plain_transformers_logits(searched, model_type, dtype) -> None:
    case = searched["cases"][(model_type, dtype)]
    if "error" in case:
        pytest.fail(f"search or export failed: {case['error']}")
    best = case["best"]
    assert best["fractions"]["params"] <= 0.8
    widths = [v["intermediate_size"] for v in best["config"].values() if "intermediate_size" in v]
    assert widths == case["widths"] and min(widths) < 160  # some MLP was thinned
    if model_type != "llama":  # experts kept on multiples of 8 neurons
        assert all(w % 8 == 0 for w in widths)
    # the export's own check: the saved model's validation KL is the search's
    assert case["export"]["validation_kl"] == pytest.approx(
        case["export"]["search_validation_kl"], rel=1e-4, abs=1e-6
    )
    assert case["export"]["parameters"] == best["costs"]["params"]
    saved = json.loads((Path(case["dir"]) / "config.json").read_text())
    assert saved["dtype"] == dtype
    assert searched["loaded"]["searcher_importable"] is False
    got = torch.tensor(searched["loaded"]["models"][case["dir"]]["logits"])
    # exactly the scored model's logits, computed with one of transformers' experts kernels
    # (bfloat16 roundings differ between the two, float32 ones barely)
    diffs = {k: float((got - ref).abs().max()) for k, ref in case["scored"].items()}
    assert any(torch.equal(got, ref) for ref in case["scored"].values()), diffs
