"""Pruned exports load in a process without searcher: plain transformers,
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``, for every family in
``tests/test_families.py`` and every space; their logits are the pruned model's (so their KL
is the search's). Exports with remote code (per-layer shapes, removed blocks) ``generate`` with
the KV cache the tokens of a full recompute, also where layer 0's attention was removed; the
others are the family's own checkpoints.

All exports are written once (a module fixture) and loaded by one subprocess, started with
``python -I -S`` and only site-packages on its path: no ``.pth`` file runs, so searcher's
editable install is not importable there (the subprocess checks that first).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import spaces
from searcher.errors import SearcherError
from searcher.export import load_pruned
from searcher.export.pruned import (
    CONFIG,
    HF_CONFIG,
    KEY,
    MODELING,
    WEIGHTS,
    layer_shapes,
    reshaping,
    save_pruned,
    uniform,
)
from tests.helpers import logits
from tests.test_families import CONFIGS, OPTIONS, SEQ, _mid, _windows, build

SPACES = ("depth", "joint", "sparsity", "width")
CASES = [(t, s) for t in sorted(CONFIGS) for s in SPACES]
PROMPT, NEW = 5, 8  # prompt tokens, greedily generated tokens

# runs in the isolated subprocess: argv[1] is a JSON file of arguments, argv[2] the output
LOADER = r"""
import json, sys
args = json.load(open(sys.argv[1]))
sys.path[:0] = args["site"]  # site-packages without their .pth files
try:
    import searcher
except ImportError:
    importable = False
else:
    importable = True
import torch
from transformers import AutoModelForCausalLM

ids = torch.tensor(args["ids"])
prompt = ids[:, : args["prompt"]]
mask = torch.ones_like(prompt)  # explicit: no padding to guess from the token ids
kw = dict(max_new_tokens=args["new"], min_new_tokens=args["new"], do_sample=False)
torch.set_num_threads(1)  # tiny models: threads cost more than they give
out = {"searcher_importable": importable, "models": {}}
for d in args["dirs"]:
    model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()
    got = out["models"][d] = {"class": type(model).__name__, "module": type(model).__module__}
    with torch.no_grad():
        got["logits"] = model(input_ids=ids, use_cache=False).logits.tolist()
        if "auto_map" not in model.config.to_dict():
            continue  # the family's own checkpoint: transformers' own generate
        cached = model.generate(
            prompt, attention_mask=mask, use_cache=True, output_logits=True,
            return_dict_in_generate=True, **kw,
        )  # fmt: skip
        seq = cached.sequences
        steps = torch.stack(cached.logits, 1)
        again = model(input_ids=seq[:, :-1], use_cache=False).logits[:, prompt.shape[1] - 1 :]
        recomputed = model.generate(prompt, attention_mask=mask, use_cache=False, **kw)
    got["cached"] = seq.tolist()
    got["recomputed"] = recomputed.tolist()
    got["cached_vs_recomputed_logits"] = float((steps - again).abs().max())
json.dump(out, open(sys.argv[2], "w"))
"""


def _candidate(space: spaces.SearchSpace) -> tuple[int, ...]:
    """depth: layer 0's attention and layer 1's MLP removed; width: layer i at level i (layer
    0 the most pruned), so layers differ; joint: the same levels, so layer 0's blocks are
    removed and the others narrowed; sparsity: a random mix (shapes stay dense)."""
    if space.name == "sparsity":
        return _mid(space)
    genes = list(space.dense())
    if space.name == "depth":
        attn = [i for i, g in enumerate(space.genes) if g.kind == "attn"]
        mlp = [i for i, g in enumerate(space.genes) if g.kind == "mlp"]
        genes[attn[0]] = genes[mlp[1]] = 0
        return tuple(genes)
    per_layer = {"attn": 0, "mlp": 0}
    for i, g in enumerate(space.genes):
        genes[i] = min(len(g.values) - 1, per_layer[g.kind])
        per_layer[g.kind] += 1
    return tuple(genes)


def _name(model_type: str, space_name: str) -> str:
    return f"{model_type.replace(':', '-')}-{space_name}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """Every case saved with ``save_pruned`` (with the pruned model's logits, and those of
    searcher's own ``load_pruned``), then all loaded by one isolated subprocess."""
    root = tmp_path_factory.mktemp("hf-exports")
    ids = _windows()[:1]
    cases = {}
    models = {t: build(t) for t in CONFIGS}
    for model_type, space_name in CASES:
        model = copy.deepcopy(models[model_type])  # spaces permute and mask weights in place
        structure = spaces.Structure.of(model)
        space = spaces.build(space_name, structure, SEQ, _windows(), options=OPTIONS[space_name])
        pruned = space.materialize(_candidate(space))
        out = root / "exports" / _name(model_type, space_name)
        info = save_pruned(pruned, out, {})
        again = load_pruned(out)
        cases[(model_type, space_name)] = {
            "dir": str(out),
            "info": info,
            "logits": logits(pruned, ids),
            "load_pruned": logits(again, ids),
            "shapes_again": layer_shapes(again),
            # what a re-export of the loaded model would record (None: an ordinary checkpoint)
            "reshaping_again": json.loads(json.dumps(reshaping(again)))
            if info["remote_code"]
            else None,
        }
    result = load_without_searcher(root, [c["dir"] for c in cases.values()], ids)
    return {"cases": cases, "result": result}


def load_without_searcher(root: Path, dirs: list[str], ids: torch.Tensor) -> dict:
    """``LOADER`` run on ``dirs`` by one subprocess (``python -I -S``, only site-packages on
    its path), offline, with ``root`` as its working directory and HF_HOME: what it found."""
    args = {
        "site": sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")}),
        "ids": ids.tolist(),
        "prompt": PROMPT,
        "new": NEW,
        "dirs": dirs,
    }
    (root / "args.json").write_text(json.dumps(args))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    env.update(HF_HOME=str(root / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", LOADER, str(root / "args.json"), str(root / "out.json")],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((root / "out.json").read_text())


@pytest.mark.parametrize(("model_type", "space_name"), CASES, ids=[_name(*c) for c in CASES])
def test_export_loads_and_generates_without_searcher(exported, model_type, space_name) -> None:
    case = exported["cases"][(model_type, space_name)]
    assert exported["result"]["searcher_importable"] is False
    got = exported["result"]["models"][case["dir"]]
    remote = space_name != "sparsity"  # width and depth candidates here are not uniform
    assert case["info"]["remote_code"] is remote
    assert (got["class"] == "SearcherPrunedForCausalLM") is remote
    # the copied modeling file (transformers imports it as a dynamic module), or the family's
    # own classes
    assert got["module"].startswith("transformers_modules." if remote else "transformers.models.")
    # the same logits as the pruned model the search scored: the same KL
    diff = (torch.tensor(got["logits"]) - case["logits"]).abs().max()
    assert diff < 1e-4
    # the KV cache: cached greedy decoding is a full recompute's
    if remote:
        assert got["cached"] == got["recomputed"]
        assert len(got["cached"][0]) == PROMPT + NEW
        assert got["cached_vs_recomputed_logits"] < 1e-4
    # searcher's own loader (searcher's copy of the modeling file) gives the same model
    torch.testing.assert_close(case["load_pruned"], case["logits"], atol=1e-4, rtol=1e-4)
    assert case["shapes_again"] == case["info"]["layers"]
    if remote:
        config = json.loads((Path(case["dir"]) / "config.json").read_text())
        assert case["reshaping_again"] == config[KEY]


def test_files_are_0644_and_uniform_exports_have_no_remote_code(exported) -> None:
    for (_, space_name), case in exported["cases"].items():
        out = Path(case["dir"])
        files = sorted(p.name for p in out.iterdir())
        for p in out.iterdir():
            assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
        config = json.loads((out / "config.json").read_text())
        if space_name == "sparsity":  # dense shapes: the family's ordinary checkpoint
            assert uniform(case["info"]["layers"])
            assert files == ["config.json", "model.safetensors", "pruned_config.json"]
            assert "auto_map" not in config and KEY not in config
        else:
            assert files == sorted(
                ["config.json", MODELING, "model.safetensors", "pruned_config.json"]
            )
            assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_searcher")
            code = (out / MODELING).read_text()
            assert "searcher." not in code.replace("searcher_pruned", "")
            imports = {ln.split()[1].split(".")[0] for ln in code.splitlines()
                       if ln.startswith(("import ", "from "))}  # fmt: skip
            assert imports <= {"__future__", "copy", "typing", "torch", "transformers"}


def test_depth_export_records_removed_blocks(exported) -> None:
    """Layer 0's attention and layer 1's MLP are recorded as removed; the attention with its
    KV-cache index."""
    for (model_type, space_name), case in exported["cases"].items():
        if space_name != "depth":
            continue
        spec = json.loads((Path(case["dir"]) / "config.json").read_text())[KEY]
        attention = [h for h in spec["removed"].values() if h["attention"]]
        assert [h["layer"] for h in attention] == [0], model_type
        assert len(spec["removed"]) > len(attention), model_type  # the MLP (OPT: two modules)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_a_dense_model_differs_in_nothing(model_type: str) -> None:
    """The recorded differences come from pruning alone: none for a dense model."""
    assert reshaping(build(model_type)) == {}


def _save(tmp_path: Path, model_type: str = "llama", space_name: str = "depth") -> tuple:
    """One candidate of ``_candidate`` saved to ``tmp_path / "m"``: the directory and the
    pruned model's logits."""
    model = build(model_type)
    space = spaces.build(
        space_name, spaces.Structure.of(model), SEQ, _windows(), options=OPTIONS[space_name]
    )
    pruned = space.materialize(_candidate(space))
    out = tmp_path / "m"
    save_pruned(pruned, out, {})
    return out, logits(pruned, _windows()[:1])


def test_load_pruned_never_runs_the_directorys_code(tmp_path: Path) -> None:
    """searcher loads a remote-code export with its own copy of the modeling file: the
    directory's is never imported (here it would write a marker file and raise)."""
    out, want = _save(tmp_path)
    marker = tmp_path / "imported"
    (out / MODELING).write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nraise RuntimeError('directory code ran')\n"
    )
    model = load_pruned(out)
    assert not marker.exists()
    torch.testing.assert_close(logits(model, _windows()[:1]), want, atol=1e-4, rtol=1e-4)


def test_load_pruned_reads_safetensors_only(tmp_path: Path) -> None:
    """Weights as a pickle (``pytorch_model.bin``) instead of safetensors: refused, not read."""
    out, _ = _save(tmp_path)
    model = load_pruned(out)
    (out / WEIGHTS).unlink()
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    with pytest.raises(SearcherError) as err:
        load_pruned(out)
    assert "\n" not in str(err.value)


def _edit(name: str, change):
    def edit(out: Path) -> None:
        path = out / name
        data = json.loads(path.read_text())
        data = change(data) or data
        path.write_text(json.dumps(data))

    return edit


def _first_removed(cfg: dict) -> dict:
    return next(iter(cfg[KEY]["removed"].values()))


def _set(mapping: dict, key: str, value) -> None:
    mapping[key] = value


CORRUPT = {
    "removed block with an unknown key": _edit(
        HF_CONFIG, lambda c: _set(_first_removed(c), "bogus", 1)
    ),
    "removed block not an object": _edit(
        HF_CONFIG, lambda c: _set(c[KEY]["removed"], next(iter(c[KEY]["removed"])), [1])
    ),
    "parameter shape a string": _edit(
        HF_CONFIG, lambda c: _set(c[KEY], "parameters", {"model.norm.weight": "wide"})
    ),
    "parameter of no module": _edit(
        HF_CONFIG, lambda c: _set(c[KEY], "parameters", {"model.nothing.weight": [3]})
    ),
    "reshaping a list": _edit(HF_CONFIG, lambda c: _set(c, KEY, [1, 2])),
    "config.json a list": _edit(HF_CONFIG, lambda c: [c]),
    "config.json of another model type": _edit(
        HF_CONFIG, lambda c: _set(c, "model_type", "mistral")
    ),
    "config.json with fewer layers": _edit(
        HF_CONFIG, lambda c: _set(c, "num_hidden_layers", c["num_hidden_layers"] - 1)
    ),
    "config.json with another layer shape": _edit(
        HF_CONFIG, lambda c: _set(c[KEY]["removed"], "model.layers.1.self_attn", _first_removed(c))
    ),
    "pruned_config.json a list": _edit(CONFIG, lambda r: [r]),
    "pruned_config.json with a shape a string": _edit(
        CONFIG, lambda r: _set(r["layers"][0], "intermediate_size", "wide")
    ),
    "pruned_config.json with fewer layers": _edit(
        CONFIG, lambda r: _set(r, "layers", r["layers"][:-1])
    ),
    "pruned_config.json with another layer shape": _edit(
        CONFIG, lambda r: _set(r["layers"][2], "intermediate_size", 1)
    ),
}


@pytest.fixture(scope="module")
def depth_export(tmp_path_factory) -> Path:
    out, _ = _save(tmp_path_factory.mktemp("depth"))
    return out


@pytest.mark.parametrize("what", sorted(CORRUPT))
def test_a_corrupt_export_is_refused_in_one_line(depth_export, tmp_path, what) -> None:
    """A remote-code export whose JSON was damaged, or whose config.json and
    pruned_config.json disagree: a SearcherError of one line, no traceback from inside
    transformers. (No CLI command reads a pruned directory: ``load_pruned`` is the way in.)"""
    out = tmp_path / "m"
    shutil.copytree(depth_export, out)
    CORRUPT[what](out)
    with pytest.raises(SearcherError) as err:
        load_pruned(out)
    message = str(err.value)
    assert "\n" not in message and len(message) < 600, message
    assert str(out) in message
