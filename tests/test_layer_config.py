"""Per-layer config copies follow the model's attention implementation.

Phi-3's attention finds where keys start in ``qkv_proj`` from its config's head count, so each
pruned layer's attention holds its own view of the config (``LayerConfig``): its head counts,
everything else (``_attn_implementation`` above all) the model config's. A pruned Phi-3 whose
layers keep different head counts, switched with ``set_attn_implementation("eager")`` after
it was built or loaded, runs eager attention in every layer: in searcher's own pruned model,
as ``load_pruned`` loads its export, and as plain transformers loads that export with
``trust_remote_code=True`` in a process where searcher cannot be imported.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import spaces
from searcher.export import load_pruned
from searcher.export.modeling_searcher_pruned import LayerConfig, reshape
from searcher.export.pruned import KEY, reshaping, save_pruned
from tests.test_families import CONFIGS, SEQ, _windows

# heads 6 in 3 KV groups of 2: width levels 1, 2, 3 groups
HEADS, KV = 6, 3

# runs in an isolated subprocess: argv[1] is a JSON file of arguments, argv[2] the output
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
from transformers.models.phi3 import modeling_phi3

ran = []
eager = modeling_phi3.eager_attention_forward


def counted(module, *a, **kw):
    ran.append(module.layer_idx)
    return eager(module, *a, **kw)


modeling_phi3.eager_attention_forward = counted
ids = torch.tensor(args["ids"])
model = AutoModelForCausalLM.from_pretrained(
    args["dir"], trust_remote_code=True, attn_implementation="sdpa"
).eval()
out = {"searcher_importable": importable, "class": type(model).__name__}
with torch.no_grad():
    out["sdpa"] = model(input_ids=ids, use_cache=False).logits.tolist()
    out["sdpa_ran"] = sorted(ran)
    ran.clear()
    model.set_attn_implementation("eager")
    got = model(input_ids=ids, use_cache=False, output_attentions=True)
out["eager"] = got.logits.tolist()
out["eager_ran"] = sorted(ran)
out["attentions"] = [None if a is None else list(a.shape) for a in got.attentions]
json.dump(out, open(sys.argv[2], "w"))
"""


def _phi3(attn_implementation: str = "sdpa") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = CONFIGS["phi3"]()
    config.num_attention_heads, config.num_key_value_heads = HEADS, KV
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model.eval().requires_grad_(False)


def _pruned() -> torch.nn.Module:
    """Layer i's attention keeps i + 1 KV groups (layer 2 all three, as the dense model), its
    MLP the dense width: head counts differ from layer to layer."""
    model = _phi3()
    space = spaces.build(
        "width", spaces.Structure.of(model), SEQ, _windows(), options={"mlp_steps": 4}
    )
    genes = list(space.dense())
    attn = [i for i, g in enumerate(space.genes) if g.kind == "attn"]
    for level, gi in enumerate(attn):
        genes[gi] = level
    return space.materialize(tuple(genes))


def _heads(model: torch.nn.Module) -> list[int]:
    return [layer.self_attn.config.num_attention_heads for layer in model.model.layers]


class Counting:
    """Counts, per layer index, the calls to Phi-3's eager attention (patched in its module)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from transformers.models.phi3 import modeling_phi3

        self.ran: list[int] = []
        eager = modeling_phi3.eager_attention_forward

        def counted(module, *args, **kwargs):
            self.ran.append(module.layer_idx)
            return eager(module, *args, **kwargs)

        monkeypatch.setattr(modeling_phi3, "eager_attention_forward", counted)

    def run(self, model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> tuple:
        """The model's output on ``ids`` and the layers that ran eager attention."""
        self.ran.clear()
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=False, **kwargs)
        return out, sorted(self.ran)


def _switched_runs_eager_everywhere(model: torch.nn.Module, counting: Counting) -> None:
    """Before: no layer runs eager (SDPA); after ``set_attn_implementation("eager")``: every
    layer does, attention weights come back for each, and the logits stay the same."""
    ids = _windows()[:2]
    layers = list(range(len(model.model.layers)))
    assert model.config._attn_implementation == "sdpa"
    before, ran = counting.run(model, ids)
    assert ran == []
    model.set_attn_implementation("eager")
    after, ran = counting.run(model, ids, output_attentions=True)
    assert ran == layers
    assert all(a is not None for a in after.attentions)
    torch.testing.assert_close(after.logits, before.logits, atol=1e-5, rtol=1e-5)
    # and back: every layer follows again
    model.set_attn_implementation("sdpa")
    again, ran = counting.run(model, ids)
    assert ran == []
    torch.testing.assert_close(again.logits, before.logits, atol=1e-5, rtol=1e-5)


def test_the_pruned_model_in_memory_follows_set_attn_implementation(monkeypatch) -> None:
    model = _pruned()
    assert _heads(model) == [2, 4, 6]  # the test's premise: head counts differ per layer
    _switched_runs_eager_everywhere(model, Counting(monkeypatch))


def test_a_deep_copy_and_a_pickle_follow_their_own_config(monkeypatch) -> None:
    """Ray workers get pickles, ``materialize`` returns deep copies: each copy's layers follow
    that copy's config, not the original's."""
    counting = Counting(monkeypatch)
    original = _pruned()
    for twin in (copy.deepcopy(original), pickle.loads(pickle.dumps(original))):
        assert _heads(twin) == [2, 4, 6]
        for layer in twin.model.layers:
            cfg = layer.self_attn.config
            assert cfg is twin.config or cfg.shared is twin.config
        _switched_runs_eager_everywhere(twin, counting)
        twin.set_attn_implementation("eager")
        _, ran = counting.run(original, _windows()[:1])
        assert ran == []  # the original still runs SDPA


def test_a_layer_config_reads_the_shared_config_but_its_own_keys() -> None:
    model = _phi3()
    shared = model.config
    own = LayerConfig(shared, num_attention_heads=2)
    assert own.num_attention_heads == 2 and shared.num_attention_heads == HEADS
    assert own.hidden_size == shared.hidden_size
    assert own._attn_implementation == "sdpa"
    shared._attn_implementation = "eager"
    assert own._attn_implementation == "eager"
    own.num_key_value_heads = 1  # set on the layer's view: the layer's own, not the model's
    assert own.num_key_value_heads == 1 and shared.num_key_value_heads == KV
    assert own.to_dict() == {**shared.to_dict(), "num_attention_heads": 2, "num_key_value_heads": 1}
    assert own.own() == {"num_attention_heads": 2, "num_key_value_heads": 1}
    with pytest.raises(AttributeError):
        own.no_such_key  # noqa: B018
    again = LayerConfig(own, head_dim=4)  # a view of a view: one level, the model's config
    assert again.shared is shared and again.own()["num_attention_heads"] == 2


def test_reshape_gives_layers_views_of_the_model_config() -> None:
    """What an export records (``configs``: each layer's own keys) and what ``reshape`` builds
    from it: views of the model's config, not copies."""
    pruned = _pruned()
    spec = reshaping(pruned)
    assert spec["configs"] == {
        "model.layers.0.self_attn.config": {"num_attention_heads": 2},
        "model.layers.1.self_attn.config": {"num_attention_heads": 4},
    }
    dense = _phi3()
    reshape(dense, spec)
    views = [layer.self_attn.config for layer in dense.model.layers]
    assert [v.shared is dense.config for v in views[:2]] == [True, True]
    assert views[2] is dense.config
    assert _heads(dense) == [2, 4, 6]


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    out = tmp_path_factory.mktemp("phi3") / "m"
    pruned = _pruned()
    info = save_pruned(pruned, out, {})
    assert info["remote_code"] is True
    with torch.no_grad():
        want = pruned(input_ids=_windows()[:2], use_cache=False).logits
    return out, want


def test_load_pruned_follows_set_attn_implementation(export, monkeypatch) -> None:
    out, want = export
    model = load_pruned(out)
    assert _heads(model) == [2, 4, 6]
    model.set_attn_implementation("sdpa")  # loaded as the config says; start from SDPA
    _switched_runs_eager_everywhere(model, Counting(monkeypatch))
    with torch.no_grad():
        got = model(input_ids=_windows()[:2], use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert reshaping(model) == config[KEY]


def test_plain_transformers_follows_set_attn_implementation(export, tmp_path) -> None:
    """The exported modeling file, loaded by transformers alone: every layer runs eager after
    the switch, with the same logits as before it and as the pruned model's."""
    out, want = export
    ids = _windows()[:2]
    args = {
        "site": sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")}),
        "ids": ids.tolist(),
        "dir": str(out),
    }
    (tmp_path / "args.json").write_text(json.dumps(args))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", LOADER, str(tmp_path / "args.json"),
         str(tmp_path / "out.json")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["searcher_importable"] is False
    assert got["class"] == "SearcherPrunedForCausalLM"
    assert got["sdpa_ran"] == []
    assert got["eager_ran"] == [0, 1, 2]
    assert all(a is not None for a in got["attentions"])
    sdpa, eager = torch.tensor(got["sdpa"]), torch.tensor(got["eager"])
    torch.testing.assert_close(sdpa, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)
