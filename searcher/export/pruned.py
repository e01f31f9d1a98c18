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
from searcher.families import family_for
from searcher.families.base import resize_to, units_of
from spaces.structure import Structure

FORMAT = "searcher-pruned/1"
CONFIG = "pruned_config.json"
WEIGHTS = "model.safetensors"


def layer_shapes(model: nn.Module) -> list[dict[str, int]]:
    """Per decoder layer: query heads, KV heads and MLP neurons (0: the block is removed)."""
    s = Structure.of(model)
    out = []
    for layer in s.layers:
        groups, neurons = (
            0
            if not block.slabs or s.family.is_dropped(layer.module, block)
            else units_of(layer.module, block)
            for block in (layer.attn, layer.mlp)
        )
        out.append(
            {
                "num_heads": groups * s.group_size,
                "num_key_value_heads": groups,
                "intermediate_size": neurons,
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
    s = Structure.of(model)
    shapes = layer_shapes(model)
    cfg = model.config.to_dict()
    record = {
        "format": FORMAT,
        "family": s.family.name,
        "base_config": cfg,
        "head_dim": s.head_dim,
        "layers": shapes,
        "searcher": header,
    }
    save_model(model, str(out / WEIGHTS))  # shared (tied) tensors stored once
    (out / CONFIG).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    hf_cfg = None
    if uniform(shapes):
        first = shapes[0]
        hf_cfg = s.family.config_for(
            cfg, s.shapes, first["num_key_value_heads"], first["intermediate_size"]
        )
    if hf_cfg is not None:
        (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n", encoding="utf-8")
    return {"layers": shapes, "huggingface_checkpoint": hf_cfg is not None}


def load_pruned(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The pruned model saved by ``save_pruned`` (or ``searcher export --format pruned``)."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    path = Path(path)
    try:
        record = json.loads((path / CONFIG).read_text(encoding="utf-8"))
        if record.get("format") != FORMAT:
            raise SearcherError(f"{path / CONFIG} is not a {FORMAT} record")
        base = dict(record["base_config"])
        shapes = record["layers"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SearcherError(f"{path} is not a pruned searcher model: {exc}") from None
    model_type = base.pop("model_type", None)
    family_for(model_type)
    try:
        config = AutoConfig.for_model(model_type, **base)
    except (ValueError, KeyError) as exc:
        raise SearcherError(f"{path}: cannot rebuild a {model_type!r} config: {exc}") from None
    # built on the CPU (buffers such as rotary tables and embedding scales computed as the
    # model computes them) but not initialised: the weights come from the file
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    s = Structure.of(model)
    if len(shapes) != len(s.layers):
        raise SearcherError(
            f"{path}: {len(shapes)} layers recorded, the config has {len(s.layers)}"
        )
    for layer, shape in zip(s.layers, shapes):
        for kind, units in (
            ("attn", shape["num_key_value_heads"]), ("mlp", shape["intermediate_size"])
        ):  # fmt: skip
            if units == 0:
                s.drop(layer, kind)
            elif units != s.units(kind):
                resize_to(s.family, layer.module, layer.block(kind), units, s.shapes)
    model.tie_weights()  # before loading: a tied head is stored once, under one name
    missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False)
    if unexpected or missing:
        raise SearcherError(
            f"{path}: the weights do not fit the recorded shapes (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    model.tie_weights()
    return model.eval().requires_grad_(False)
