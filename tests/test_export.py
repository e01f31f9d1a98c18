"""Export: the model a user gets is the model that was scored, in every format and space."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from searcher.cli import main
from searcher.export import load_pruned
from tests.helpers import counted_flops, logits, save_tiny

TINY = ["--seq-len", "32", "--importance-windows", "2", "--validation-windows", "2",
        "--offspring", "4", "--stages", "1:2,2:1", "--threads", "1"]  # fmt: skip
BUDGETS = {"width": "flops=0.6", "depth": "flops=0.6", "sparsity": "sparsity=0.5"}


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module", params=sorted(BUDGETS))
def searched(request, tiny_dir: Path, tmp_path_factory) -> tuple[str, Path]:
    space = request.param
    out = tmp_path_factory.mktemp(f"run-{space}") / "r"
    code = main(["run", "--model", str(tiny_dir), "--space", space, "--budget", BUDGETS[space],
                 "--evals", "4", "--out", str(out), *TINY])  # fmt: skip
    assert code == 0
    return space, out


def test_pruned_model_is_the_scored_model(searched, tmp_path: Path, capsys) -> None:
    """Parameters, FLOPs and validation KL of the saved model equal the search's figures."""
    space, run = searched
    best = json.loads((run / "best.json").read_text())
    code, out, err = _run(["export", str(run), "--format", "pruned", "--out",
                           str(tmp_path / "m")], capsys)  # fmt: skip
    assert code == 0, err
    assert "validation KL" in out
    model = load_pruned(tmp_path / "m")
    assert not any(p.is_meta for p in model.parameters())
    params = {id(p): p for p in model.parameters()}.values()
    if space == "sparsity":  # dense shapes with zeros: the search counts nonzero weights
        prunable = [m.weight for n, m in model.named_modules() if n.endswith("_proj")]
        zeros = sum(int((w == 0).sum()) for w in prunable)
        assert sum(p.numel() for p in params) - zeros == best["costs"]["params"]
    else:
        assert sum(p.numel() for p in params) == best["costs"]["params"]
        ids = torch.zeros(1, 32, dtype=torch.long)
        assert counted_flops(model, ids) == best["costs"]["flops"]
    # the KL the export checked is the run's own validation figure
    text = out.split("validation KL ")[1]
    assert float(text.split()[0]) == pytest.approx(best["validation"]["kl"], rel=1e-4)
    # it generates with transformers' utilities
    gen = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 7)


def test_uniform_shapes_are_an_ordinary_hf_checkpoint(searched, tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    space, run = searched
    code, _, err = _run(["export", str(run), "--format", "pruned", "--out", str(tmp_path / "m")],
                        capsys)  # fmt: skip
    assert code == 0, err
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    plain = "auto_map" not in config  # else transformers loads it with the copied modeling file
    assert plain == (space == "sparsity")  # searched width/depth configs are not uniform
    assert (tmp_path / "m" / "modeling_searcher_pruned.py").is_file() != plain
    if plain:
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
        ids = torch.arange(20)[None]
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, load_pruned(tmp_path / "m")(ids).logits)


def test_onnx_export_is_checked_in_onnx_runtime(searched, tmp_path: Path, capsys) -> None:
    """One model.onnx, checked by the export (prefill, then cached decode, against torch);
    plain ONNX Runtime generates the pruned model's own greedy tokens with it, and it takes
    at most 1.3x the pruned model's safetensors."""
    import onnx

    from tests.ort_generate import greedy, torch_greedy

    _, run = searched
    code, out, err = _run(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "o")],
                          capsys)  # fmt: skip
    assert code == 0, err
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["model.onnx"]
    onnx.checker.check_model(str(tmp_path / "o" / "model.onnx"))
    diffs = [float(t.split()[0].rstrip(";")) for t in out.split("max |logit - torch| = ")[1:]]
    assert len(diffs) == 2 and max(diffs) < 1e-3
    pruned = _export_pruned(run, tmp_path)
    prompt = [5, 17, 42, 7, 99]
    assert greedy(tmp_path / "o" / "model.onnx", [prompt], 16) == [
        torch_greedy(load_pruned(pruned), prompt, 16)
    ]
    size = (tmp_path / "o" / "model.onnx").stat().st_size
    assert size <= 1.3 * (pruned / "model.safetensors").stat().st_size


def test_json_format_and_apply(searched, tiny_dir: Path, tmp_path: Path, capsys):
    space, run = searched
    code, _, err = _run(["export", str(run), "--format", "json", "--out",
                         str(tmp_path / "c.json")], capsys)  # fmt: skip
    assert code == 0, err
    cfg = json.loads((tmp_path / "c.json").read_text())
    best = json.loads((run / "best.json").read_text())
    assert cfg["format"] == "searcher-config/1" and cfg["genes"] == best["genes"]
    assert cfg["model"]["fingerprint"] == best["model"]["fingerprint"]
    # the canonical config is what eval and apply read
    code, out, err = _run(["eval", str(tmp_path / "c.json"), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["kl"] == pytest.approx(best["validation"]["kl"], rel=1e-4)
    code, _, err = _run(["apply", str(tmp_path / "c.json"), "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    assert load_pruned(tmp_path / "a") is not None


def test_pick_and_under(searched, tmp_path: Path, capsys) -> None:
    _, run = searched
    front = json.loads((run / "pareto.json").read_text())["front"]
    code, _, err = _run(["export", str(run), "--format", "json", "--pick", "0", "--out",
                         str(tmp_path / "p.json")], capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads((tmp_path / "p.json").read_text())["genes"] == front[0]["genes"]
    code, _, err = _run(["export", str(run), "--format", "json", "--pick", str(len(front)),
                         "--out", str(tmp_path / "x.json")], capsys)  # fmt: skip
    assert code == 2 and "entries" in err
    code, _, err = _run(["export", str(run), "--format", "json", "--under", "params=0.01",
                         "--out", str(tmp_path / "y.json")], capsys)  # fmt: skip
    assert code == 2 and "meets" in err


def test_a_config_for_another_model_is_refused(searched, tmp_path: Path, capsys) -> None:
    _, run = searched
    other = save_tiny(tmp_path / "other", seed=5)
    code, _, err = _run(["apply", str(run / "best.json"), "--model", str(other), "--out",
                         str(tmp_path / "a")], capsys)  # fmt: skip
    assert code == 2 and "was made for model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()


def _evopress_drop_config(path: Path) -> list[str]:
    """EvoPress's own reader (src/model_utils.py: drop_layers_from_config), verbatim."""
    drop_config = []
    with open(path, "r") as f:  # noqa: UP015 (verbatim)
        for line in f:
            drop_config.append(line.strip("\n"))
    return drop_config


def test_evopress_reads_the_searched_blocks(searched, tmp_path: Path, capsys) -> None:
    """A depth config, read the way EvoPress reads a layer-drop file, drops exactly the searched
    blocks; sparsity and width configs are refused in one line naming the right format."""
    space, run = searched
    out = tmp_path / "levels.txt"
    code, _, err = _run(["export", str(run), "--format", "evopress", "--out", str(out)], capsys)
    if space != "depth":
        other = "llmcompressor" if space == "sparsity" else "torch-pruning"
        assert code == 2 and f"--format {other}" in err and len(err.strip().splitlines()) == 1
        assert not out.exists()
        return
    assert code == 0, err
    best = json.loads((run / "best.json").read_text())
    drop_config = _evopress_drop_config(out)
    assert len(drop_config) == 3  # drop_layers asserts one entry per decoder layer
    for i, entry in enumerate(drop_config):
        assert entry in ("none", "attn", "mlp", "attn+mlp")  # what drop_layers acts on
        attn, mlp = (best["config"][f"model.layers.{i}.{b}"]["kept"] for b in ("self_attn", "mlp"))
        assert (entry in ("attn", "attn+mlp"), entry in ("mlp", "attn+mlp")) == (not attn, not mlp)
    assert any(e != "none" for e in drop_config)


def test_evopress_depth_files_only_for_models_evopress_names() -> None:
    from searcher.errors import SearcherError
    from searcher.export.recipes import evopress_text

    config = {"space": {"name": "depth"}, "model": {"config": {"model_type": "qwen2"}},
              "genes": [1, 0], "config": {"model.layers.0.self_attn": {"kept": True},
                                          "model.layers.0.mlp": {"kept": False}}}  # fmt: skip
    with pytest.raises(SearcherError, match="llama and mistral"):
        evopress_text(config)
    config["model"]["config"]["model_type"] = "mistral"
    assert evopress_text(config) == "mlp\n"


def test_llmcompressor_recipe_loads_in_llm_compressor(searched, tmp_path: Path, capsys) -> None:
    """Parsed by LLM Compressor's own recipe loader; its targets, matched by compressed-tensors
    against the model, give every layer a sparsity at which LLM Compressor's Wanda
    (int(in_features * sparsity) zeros a row) zeroes as many weights per row as the search
    (ceil(s * in_features))."""
    space, run = searched
    out = tmp_path / "recipe.yaml"
    code, _, err = _run(["export", str(run), "--format", "llmcompressor", "--out", str(out)],
                        capsys)  # fmt: skip
    if space != "sparsity":
        assert code == 2 and "sparsity space" in err and len(err.strip().splitlines()) == 1
        return
    assert code == 0, err
    from compressed_tensors.utils import match_named_modules
    from llmcompressor.recipe import Recipe
    from transformers import AutoModelForCausalLM

    recipe = Recipe.create_instance(str(out))
    best = json.loads((run / "best.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(best["model"]["source"])  # the tiny Llama
    got: dict[str, int] = {}
    for modifier in recipe.modifiers:
        assert type(modifier).__name__ == "WandaPruningModifier"
        for name, module in match_named_modules(model, modifier.targets):
            assert name not in got
            got[name] = int(module.weight.shape[1] * modifier.sparsity)  # wanda_sparsify.py
    want = {}
    for name, detail in best["config"].items():
        in_features = model.get_submodule(name).weight.shape[1]
        if detail["sparsity"] > 0:
            want[name] = math.ceil(detail["sparsity"] * in_features - 1e-9)
    assert got == want


def test_llmcompressor_oneshot_zeroes_what_the_search_did(searched, tiny_dir: Path, tmp_path: Path,
                                                          capsys):  # fmt: skip
    """LLM Compressor's own oneshot, applying the exported recipe to the dense model with the
    README's script, zeroes in every row of every layer as many weights as the search's masks
    (so the model meets the budget); calibrated like the search, it zeroes the same weights
    (near-ties aside), and its validation KL is the search's."""
    space, run = searched
    if space != "sparsity":
        pytest.skip("a sparsity-space run only (the other spaces are refused above)")
    out = tmp_path / "recipe.yaml"
    code, _, err = _run(["export", str(run), "--format", "llmcompressor", "--out", str(out)],
                        capsys)  # fmt: skip
    assert code == 0, err
    from searcher.export import faithful
    from searcher.run import session_of_config

    best = json.loads((run / "best.json").read_text())
    session, genes = session_of_config(str(run / "best.json"), best)
    searched_model = session.space.materialize(genes)  # the search's own masks
    want = {n: searched_model.get_submodule(n).weight == 0 for n in best["config"]}
    session.space.apply(session.space.dense())
    script = _readme_script("from llmcompressor import oneshot")
    for placeholder, path in (("results/<run-id>/best.json", run / "best.json"),
                              ("recipe.yaml", out), ("path/to/the/model", tiny_dir)):  # fmt: skip
        script = script.replace(f'"{placeholder}"', repr(str(path)))
    scope: dict = {}
    exec(compile(script, "README.md", "exec"), scope)  # our own README, not user input
    model = scope["model"].eval()
    zeros = total = moved = 0
    for name, mask in want.items():
        got = model.get_submodule(name).weight.detach() == 0
        assert torch.equal(got.sum(1), mask.sum(1)), name  # per row: the search's count
        zeros, total = zeros + int(got.sum()), total + got.numel()
        moved += int((got != mask).sum())
    assert zeros / total >= 0.5  # the budget, sparsity=0.5
    assert moved <= 1e-3 * total  # the same weights but where float32 and float64 scores tie
    check = faithful(session, genes, model)
    assert check["validation_kl"] == pytest.approx(best["validation"]["kl"], rel=1e-4)


def _export_pruned(run: Path, tmp_path: Path) -> Path:
    assert main(["export", str(run), "--format", "pruned", "--out", str(tmp_path / "m")]) == 0
    return tmp_path / "m"


def _readme_script(marker: str) -> str:
    """The README's ```python block containing ``marker`` (so the documented call is tested)."""
    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = [b.split("```")[0] for b in text.split("```python")[1:]]
    (block,) = [b for b in blocks if marker in b]
    lines = block.splitlines()
    indent = min(len(ln) - len(ln.lstrip()) for ln in lines if ln.strip())
    return "\n".join(ln[indent:] for ln in lines)


def _searched_units(dense: torch.nn.Module, best: dict) -> dict[str, torch.Tensor]:
    """Every weight of the tiny Llama restricted to the units ``best`` kept: MLP neurons (rows
    of gate/up, columns of down) and KV groups (a group's query heads' rows of q and columns of
    o, its KV head's rows of k and v), as the searched model has them."""
    cfg = dense.config
    hd, group = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    want = {}
    for i, layer in enumerate(dense.model.layers):
        p = f"model.layers.{i}"
        n = sorted(best["config"][f"{p}.mlp"]["kept_neurons"])
        groups = sorted(best["config"][f"{p}.self_attn"]["kept_kv_groups"])
        kv = [g * hd + j for g in groups for j in range(hd)]
        q = [(g * group + h) * hd + j for g in groups for h in range(group) for j in range(hd)]
        want[f"{p}.mlp.gate_proj"] = layer.mlp.gate_proj.weight[n]
        want[f"{p}.mlp.up_proj"] = layer.mlp.up_proj.weight[n]
        want[f"{p}.mlp.down_proj"] = layer.mlp.down_proj.weight[:, n]
        want[f"{p}.self_attn.q_proj"] = layer.self_attn.q_proj.weight[q]
        want[f"{p}.self_attn.k_proj"] = layer.self_attn.k_proj.weight[kv]
        want[f"{p}.self_attn.v_proj"] = layer.self_attn.v_proj.weight[kv]
        want[f"{p}.self_attn.o_proj"] = layer.self_attn.o_proj.weight[:, q]
    return want


def test_torch_pruning_runs_the_readme_script(searched, tiny_dir: Path, tmp_path: Path, capsys):
    """The README's script, as written, removes with Torch-Pruning exactly the searched model's
    channels: every kept row and column is the dense model's of a searched unit, and the
    validation KL is the run's."""
    space, run = searched
    out = tmp_path / "tp.json"
    code, text, err = _run(["export", str(run), "--format", "torch-pruning", "--out", str(out)],
                           capsys)  # fmt: skip
    if space != "width":
        assert code == 2 and "width configs" in err and len(err.strip().splitlines()) == 1
        return
    assert code == 0, err
    from transformers import AutoModelForCausalLM

    from searcher.export import faithful
    from searcher.run import session_of_config

    best = json.loads((run / "best.json").read_text())
    # the export's own check: the channels, removed by Torch-Pruning, give the scored model
    kl = float(text.split("validation KL ")[1].split()[0])
    assert kl == pytest.approx(best["validation"]["kl"], rel=1e-4)
    script = _readme_script("tp.prune_linear_out_channels").replace('"tp.json"', repr(str(out)))
    scope: dict = {}
    exec(compile(script, "README.md", "exec"), scope)  # our own README, not user input
    model = scope["model"]
    dense = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    for name, weight in _searched_units(dense, best).items():
        assert torch.equal(model.get_submodule(name).weight, weight), name
    params = {id(p): p for p in model.parameters()}.values()
    assert sum(p.numel() for p in params) == best["costs"]["params"]
    session, genes = session_of_config(str(run / "best.json"), best)
    check = faithful(session, genes, model)  # the search's KL for these genes, recomputed
    assert check["validation_kl"] == pytest.approx(best["validation"]["kl"], rel=1e-4)
    assert counted_flops(model, torch.zeros(1, 32, dtype=torch.long)) == best["costs"]["flops"]


@pytest.mark.parametrize("model_type", ["phi3", "opt", "falcon", "gpt_neox"])
def test_torch_pruning_readme_script_sets_what_the_family_needs(model_type: str, tmp_path: Path):
    """Families whose modules keep their own head counts (Phi-3: a per-layer config; OPT,
    Falcon: num_heads) or interleave heads (GPT-NeoX): the README's script with the exported
    channels and attributes gives the logits of the family's own slicing of the same units."""
    import spaces
    from searcher.export.torch_pruning_spec import spec
    from searcher.families.base import get_tensor, set_tensor
    from tests.test_families import build

    model = build(model_type)
    model.save_pretrained(tmp_path / "m")
    structure = spaces.Structure.of(model)
    kept, detail = {}, {}
    for layer in structure.layers:
        for block in (layer.attn, layer.mlp):
            units = list(range(block.units))
            name = layer.name(block.name)
            if block.kind == "attn":  # every other KV group, from the second
                kept[name] = units[1::2]
                detail[name] = {"kept_kv_groups": kept[name]}
            else:  # every third neuron
                kept[name] = units[::3]
                detail[name] = {"kept_neurons": kept[name]}
    config = {"space": {"name": "width"}, "model": {"source": str(tmp_path / "m")},
              "config": detail}  # fmt: skip
    doc = spec(config, structure, str(tmp_path / "m"), "float32")
    (tmp_path / "tp.json").write_text(json.dumps(doc))
    if model_type in ("phi3", "opt", "falcon"):
        assert doc["attributes"]  # these families need them
    script = _readme_script("tp.prune_linear_out_channels")
    script = script.replace('"tp.json"', repr(str(tmp_path / "tp.json")))
    scope: dict = {}
    exec(compile(script, "README.md", "exec"), scope)
    # the family's own slicing of the same units (what the width space applies)
    for layer in structure.layers:
        for block in (layer.attn, layer.mlp):
            units = kept[layer.name(block.name)]
            for slab in block.slabs:
                t = get_tensor(layer.module, slab.tensor).detach()
                t = t.index_select(slab.axis, slab.indices(units))
                set_tensor(layer.module, slab.tensor, t)
            structure.family.resized(layer.module, block, len(units), structure.shapes)
    ids = torch.arange(1, 17)[None]
    torch.testing.assert_close(logits(scope["model"], ids), logits(model, ids))
