"""The physically pruned model on disk: safetensors plus a JSON record of every layer's shapes.

``save_pruned`` writes ``model.safetensors`` and ``pruned_config.json`` (the base model's
config, and per layer its query / KV heads and MLP width, 0 for a removed block).
``load_pruned`` rebuilds the model from those two files only: no pickle and no model code
from the directory. When every layer has the same shapes and no block is removed, the
directory is also an ordinary Hugging Face checkpoint (``config.json`` with the pruned sizes),
which ``AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from searcher.errors import SearcherError
from spaces.depth import DroppedAttention, DroppedMLP

FORMAT = "searcher-pruned/1"
CONFIG = "pruned_config.json"
WEIGHTS = "model.safetensors"


def layer_shapes(model: nn.Module) -> list[dict[str, int]]:
    """Per decoder layer: query heads, KV heads and MLP neurons (0: the block is removed)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    out = []
    for block in model.model.layers:
        a, m = block.self_attn, block.mlp
        has_attn = hasattr(a, "q_proj")
        has_mlp = hasattr(m, "gate_proj")
        out.append(
            {
                "num_heads": a.q_proj.out_features // head_dim if has_attn else 0,
                "num_key_value_heads": a.k_proj.out_features // head_dim if has_attn else 0,
                "intermediate_size": m.gate_proj.out_features if has_mlp else 0,
            }
        )
    return out


def uniform(shapes: list[dict[str, int]]) -> bool:
    """Every layer alike and nothing removed: an ordinary Hugging Face checkpoint."""
    return all(s == shapes[0] for s in shapes) and all(v > 0 for v in shapes[0].values())


def save_pruned(model: nn.Module, out: Path, header: dict[str, Any]) -> dict[str, Any]:
    """Write the pruned model; returns what was written (shapes, whether HF-loadable)."""
    from safetensors.torch import save_model

    out.mkdir(parents=True, exist_ok=True)
    shapes = layer_shapes(model)
    cfg = model.config.to_dict()
    head_dim = getattr(model.config, "head_dim", None) or (
        model.config.hidden_size // model.config.num_attention_heads
    )
    record = {
        "format": FORMAT,
        "base_config": cfg,
        "head_dim": head_dim,
        "layers": shapes,
        "searcher": header,
    }
    save_model(model, str(out / WEIGHTS))  # shared (tied) tensors stored once
    (out / CONFIG).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    hf = uniform(shapes)
    if hf:
        hf_cfg = dict(cfg)
        hf_cfg.update(
            num_attention_heads=shapes[0]["num_heads"],
            num_key_value_heads=shapes[0]["num_key_value_heads"],
            intermediate_size=shapes[0]["intermediate_size"],
            head_dim=head_dim,
        )
        (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n", encoding="utf-8")
    return {"layers": shapes, "huggingface_checkpoint": hf}


def load_pruned(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The pruned model saved by ``save_pruned`` (or ``searcher export --format pruned``)."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    try:
        record = json.loads((path / CONFIG).read_text(encoding="utf-8"))
        if record.get("format") != FORMAT:
            raise SearcherError(f"{path / CONFIG} is not a {FORMAT} record")
        base = dict(record["base_config"])
        shapes = record["layers"]
        head_dim = int(record["head_dim"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SearcherError(f"{path} is not a pruned searcher model: {exc}") from None
    model_type = base.pop("model_type", None)
    try:
        config = AutoConfig.for_model(model_type, **base)
    except (ValueError, KeyError) as exc:
        raise SearcherError(f"{path}: cannot rebuild a {model_type!r} config: {exc}") from None
    config.head_dim = head_dim
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for block, s in zip(model.model.layers, shapes, strict=True):
        _shape_layer(block, s, head_dim, config.hidden_size, dtype)
    model.to_empty(device="cpu")
    model.tie_weights()  # before loading: a tied head is stored once, under one name
    missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False)
    # buffers (rotary frequencies) are not in the file: recompute them
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    missing = sorted(m for m in missing if "rotary" not in m)
    if unexpected or missing:
        raise SearcherError(
            f"{path}: the weights do not fit the recorded shapes (missing {missing[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    model.tie_weights()
    return model.eval().requires_grad_(False)


def _shape_layer(block: nn.Module, s: dict[str, int], head_dim: int, hidden: int, dtype) -> None:
    def linear(rows: int, cols: int, bias: bool) -> nn.Linear:
        return nn.Linear(cols, rows, bias=bias, dtype=dtype)

    a, m = block.self_attn, block.mlp
    if s["num_heads"] == 0:
        block.self_attn = DroppedAttention()
    else:
        q, kv = s["num_heads"] * head_dim, s["num_key_value_heads"] * head_dim
        a.q_proj = linear(q, hidden, a.q_proj.bias is not None)
        a.k_proj = linear(kv, hidden, a.k_proj.bias is not None)
        a.v_proj = linear(kv, hidden, a.v_proj.bias is not None)
        a.o_proj = linear(hidden, q, a.o_proj.bias is not None)
    if s["intermediate_size"] == 0:
        block.mlp = DroppedMLP()
    else:
        w = s["intermediate_size"]
        m.gate_proj = linear(w, hidden, m.gate_proj.bias is not None)
        m.up_proj = linear(w, hidden, m.up_proj.bias is not None)
        m.down_proj = linear(hidden, w, m.down_proj.bias is not None)
