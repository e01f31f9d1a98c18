"""Export: the model a user gets is the model that was scored, in every format and space."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from searcher.cli import main
from searcher.export import load_pruned
from tests.helpers import counted_flops, save_tiny

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
    has_hf = (tmp_path / "m" / "config.json").is_file()
    assert has_hf == (space == "sparsity")  # searched width/depth configs are not uniform
    if has_hf:
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
        ids = torch.arange(20)[None]
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, load_pruned(tmp_path / "m")(ids).logits)


def test_onnx_export_is_checked_in_onnx_runtime(searched, tmp_path: Path, capsys) -> None:
    import onnx

    _, run = searched
    code, out, err = _run(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "o")],
                          capsys)  # fmt: skip
    assert code == 0, err
    for kind in ("prefill", "decode"):
        onnx.checker.check_model(str(tmp_path / "o" / f"{kind}.onnx"))
        diff = float(out.split(f"{kind}.onnx: max |logit - torch| = ")[1].split()[0])
        assert diff < 1e-3


def test_json_and_evopress_formats_and_apply(searched, tiny_dir: Path, tmp_path: Path, capsys):
    space, run = searched
    code, _, err = _run(["export", str(run), "--format", "json", "--out",
                         str(tmp_path / "c.json")], capsys)  # fmt: skip
    assert code == 0, err
    cfg = json.loads((tmp_path / "c.json").read_text())
    best = json.loads((run / "best.json").read_text())
    assert cfg["format"] == "searcher-config/1" and cfg["genes"] == best["genes"]
    assert cfg["model"]["fingerprint"] == best["model"]["fingerprint"]
    code, _, err = _run(["export", str(run), "--format", "evopress", "--out",
                         str(tmp_path / "levels.txt")], capsys)  # fmt: skip
    assert code == 0, err
    lines = [ln for ln in (tmp_path / "levels.txt").read_text().splitlines()
             if not ln.startswith("#")]  # fmt: skip
    assert [ln.split(":")[0] for ln in lines] == list(best["config"])
    assert [int(ln.split(":")[1].split("#")[0]) for ln in lines] == best["genes"]
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


def test_llmcompressor_recipe_loads_in_llm_compressor(searched, tmp_path: Path, capsys) -> None:
    """Parsed by LLM Compressor's own recipe loader; its targets, matched by compressed-tensors
    against the model, give every layer exactly its searched sparsity."""
    space, run = searched
    out = tmp_path / "recipe.yaml"
    code, _, err = _run(["export", str(run), "--format", "llmcompressor", "--out", str(out)],
                        capsys)  # fmt: skip
    if space != "sparsity":
        assert code == 2 and "sparsity space" in err
        return
    assert code == 0, err
    from compressed_tensors.utils import match_named_modules
    from llmcompressor.recipe import Recipe

    recipe = Recipe.create_instance(str(out))
    best = json.loads((run / "best.json").read_text())
    model = load_pruned(_export_pruned(run, tmp_path))
    got: dict[str, float] = {}
    for modifier in recipe.modifiers:
        assert type(modifier).__name__ == "WandaPruningModifier"
        for name, _ in match_named_modules(model, modifier.targets):
            assert name not in got
            got[name] = modifier.sparsity
    want = {n: d["sparsity"] for n, d in best["config"].items() if d["sparsity"] > 0}
    assert got == pytest.approx(want)


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


def test_torch_pruning_runs_the_readme_script(searched, tiny_dir: Path, tmp_path: Path, capsys):
    """Torch-Pruning itself, driven by the README's script with the exported ratios, gives the
    search's parameter count, FLOPs and per-layer widths."""
    space, run = searched
    out = tmp_path / "tp.json"
    code, text, err = _run(["export", str(run), "--format", "torch-pruning", "--out", str(out)],
                           capsys)  # fmt: skip
    if space != "width":
        assert code == 2 and "width configs" in err and len(err.strip().splitlines()) == 1
        return
    assert code == 0, err
    best = json.loads((run / "best.json").read_text())
    # the export's own check: the channels, removed by Torch-Pruning, give the scored model
    kl = float(text.split("validation KL ")[1].split()[0])
    assert kl == pytest.approx(best["validation"]["kl"], rel=1e-4)
    script = _readme_script("tp.pruner.MetaPruner")
    script = script.replace('"tp.json"', repr(str(out)))
    script = script.replace('"path/to/the/searched/model"', repr(str(tiny_dir)))
    scope: dict = {}
    exec(compile(script, "README.md", "exec"), scope)  # our own README, not user input
    model = scope["model"]
    params = {id(p): p for p in model.parameters()}.values()
    assert sum(p.numel() for p in params) == best["costs"]["params"]
    assert counted_flops(model, torch.zeros(1, 32, dtype=torch.long)) == best["costs"]["flops"]
    for i, layer in enumerate(model.model.layers):
        attn = best["config"][f"model.layers.{i}.self_attn"]
        mlp = best["config"][f"model.layers.{i}.mlp"]
        assert layer.mlp.gate_proj.out_features == mlp["intermediate_size"]
        assert layer.self_attn.k_proj.out_features == attn["num_key_value_heads"] * 16
        assert layer.self_attn.q_proj.out_features == attn["num_heads"] * 16
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_torch_pruning_ratios_keep_exactly_the_searched_width() -> None:
    """Torch-Pruning keeps int(total * (1 - ratio)) channels: float rounding must not drop one."""
    from searcher.export.torch_pruning_spec import ratio_for

    for total in (7, 96, 128, 1536, 8960, 11008, 14336):
        for kept in range(1, total + 1, max(1, total // 97)):
            assert int(total * (1 - ratio_for(total, kept))) == kept
