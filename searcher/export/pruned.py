"""The physically pruned model on disk: safetensors plus a JSON record of every layer's shapes.

``save_pruned`` writes ``model.safetensors``, ``pruned_config.json`` (the base model's config,
and per layer its query / KV heads and MLP width, 0 for a removed block) and ``config.json``,
so that ``transformers.AutoModelForCausalLM.from_pretrained`` loads the directory without
searcher:

- when every layer has the same shapes and no block is removed, and the family's config can
  say those shapes, ``config.json`` is the family's ordinary config with the pruned sizes: an
  ordinary checkpoint, no remote code;
- otherwise ``config.json`` is the base model's config plus, under ``searcher_pruned``, what
  differs from a dense model built from it (``reshaping``: parameter shapes, module attributes
  that follow unit counts, per-module config views, removed blocks), with an ``auto_map`` to
  ``modeling_searcher_pruned.py``, copied next to it: transformers' own model of the family,
  built dense and reshaped before the weights load (load with ``trust_remote_code=True``).

``load_pruned`` loads the latter with searcher's own copy of that code (never the directory's),
checking ``config.json`` against ``pruned_config.json``, and rebuilds the former from
``pruned_config.json``: safetensors and JSON only, no pickle and no model code from the
directory; a file that does not fit is refused in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from searcher.errors import SearcherError
from searcher.export.modeling_searcher_pruned import (  # what differs from the dense model
    KEY,
    LayerConfig,
)
from searcher.families import family_for
from searcher.families.base import experts_of, is_removed, keep_experts, resize_to, units_of
from spaces.structure import Structure

FORMAT = "searcher-pruned/1"
CONFIG = "pruned_config.json"
WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
MODELING = "modeling_searcher_pruned.py"  # also this package's module of that name
MODE = 0o644


def layer_shapes(model: nn.Module) -> list[dict[str, int]]:
    """Per decoder layer: query heads, KV heads and MLP neurons (0: the block is removed); in
    a mixture-of-experts layer the MLP neurons are each routed expert's, and ``num_experts``
    counts the routed experts it keeps."""
    s = Structure.of(model)
    out = []
    for layer in s.layers:
        groups, neurons = (
            0
            if not block.slabs or s.family.is_dropped(layer.module, block)
            else units_of(layer.module, block)
            for block in (layer.attn, layer.mlp)
        )
        shape = {
            "num_heads": groups * s.group_size,
            "num_key_value_heads": groups,
            "intermediate_size": neurons,
        }
        if layer.mlp.experts is not None:
            shape["num_experts"] = experts_of(layer.module, layer.mlp) if neurons else 0
        out.append(shape)
    return out


def uniform(shapes: list[dict[str, int]]) -> bool:
    """Every layer alike and nothing removed: an ordinary Hugging Face checkpoint."""
    return all(s == shapes[0] for s in shapes) and all(v > 0 for v in shapes[0].values())


def save_pruned(model: nn.Module, out: Path, header: dict[str, Any]) -> dict[str, Any]:
    """Write the pruned model; returns what was written: the per-layer shapes, and whether
    transformers needs the directory's modeling file (``trust_remote_code=True``) or loads it as
    the family's ordinary checkpoint."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = Structure.of(model)
    shapes = layer_shapes(model)
    cfg = base_config(model)
    record = {
        "format": FORMAT,
        "family": s.family.name,
        "base_config": cfg,
        "head_dim": s.head_dim,
        "layers": shapes,
        "searcher": header,
    }
    write_weights(model, out / WEIGHTS)
    _write_json(out / CONFIG, record)
    hf_cfg = None
    if uniform(shapes):
        first = shapes[0]
        hf_cfg = s.family.config_for(
            cfg, s.shapes, first["num_key_value_heads"], first["intermediate_size"],
            experts=first.get("num_experts"),
        )  # fmt: skip
    remote = hf_cfg is None
    code = out / MODELING
    if remote:
        hf_cfg = remote_config(model, cfg)
        code.write_text(modeling_source(cfg["model_type"]), encoding="utf-8")
        code.chmod(MODE)
    else:
        code.unlink(missing_ok=True)  # from an earlier export to this directory
    _write_json(out / HF_CONFIG, hf_cfg)
    return {"layers": shapes, "remote_code": remote}


def base_config(model: nn.Module) -> dict[str, Any]:
    """The model's config as a dict, less what a pruned export added to it."""
    cfg = model.config.to_dict()
    for key in (KEY, "auto_map"):
        cfg.pop(key, None)
    return cfg


def remote_config(model: nn.Module, cfg: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` of a pruned model the family's config cannot describe: the base config,
    what differs from the dense model, and the ``auto_map`` to the copied modeling file."""
    from searcher.export import modeling_searcher_pruned as code

    module = MODELING.removesuffix(".py")
    return {
        **cfg,
        "architectures": [code.MODEL_CLASS],
        "auto_map": {
            "AutoConfig": f"{module}.{code.CONFIG_CLASS}",
            "AutoModelForCausalLM": f"{module}.{code.MODEL_CLASS}",
        },
        KEY: reshaping(model),
    }


def modeling_source(model_type: str) -> str:
    """The modeling file copied into an export: this package's module, and the classes for
    ``model_type`` made from it (the file's content depends on the model type alone)."""
    text = (Path(__file__).parent / MODELING).read_text(encoding="utf-8")
    return (
        f"{text.rstrip()}\n\n\n# the model type this checkpoint was pruned from\n"
        f"SearcherPrunedConfig, SearcherPrunedForCausalLM = classes_for({json.dumps(model_type)})\n"
    )


def dense_twin(model: nn.Module) -> nn.Module:
    """A dense model built from ``model``'s config as transformers builds it, on the meta device
    (no memory, no initialisation)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    cfg = base_config(model)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    with torch.device("meta"), no_init_weights():
        return AutoModelForCausalLM.from_config(config)


_SCALARS = (bool, int, float, str, type(None))


def _plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(isinstance(v, _SCALARS) for v in value)
    return isinstance(value, _SCALARS)


def reshaping(model: nn.Module) -> dict[str, dict[str, Any]]:
    """What differs between ``model`` and a dense model freshly built from its config, as plain
    data (``modeling_searcher_pruned.reshape`` applies it): removed blocks, parameter shapes,
    scalar attributes and config views of modules in decoder layers. Read from the two models
    alone, whatever the family."""
    from transformers import PretrainedConfig

    dense = dense_twin(model)
    twins = dict(dense.named_modules())
    layers = Structure.of(model).layers
    top = model.config.to_dict()
    spec: dict[str, dict[str, Any]] = {"removed": {}, "parameters": {}, "attributes": {},
                                       "configs": {}}  # fmt: skip
    for name, module in model.named_modules():
        twin = twins.get(name)
        if twin is None:
            raise SearcherError(f"the pruned model has a module {name!r} the dense one lacks")
        if is_removed(module):
            how = dict(module.removed_as())  # with a removed attention's index in the KV cache
            if how.get("attention") and how.get("layer") is None:
                raise SearcherError(f"the removed attention {name!r} has no KV-cache index")
            spec["removed"][name] = how
            continue
        if not isinstance(module, type(twin)):  # the family's class, or a subclass
            raise SearcherError(
                f"cannot describe {name!r}: a {type(module).__name__} where the dense model has "
                f"a {type(twin).__name__}"
            )
        params = dict(twin.named_parameters(recurse=False))
        for pname, p in module.named_parameters(recurse=False):
            if pname not in params:
                raise SearcherError(
                    f"the pruned model has a parameter {name}.{pname} the dense one lacks"
                )
            if tuple(p.shape) != tuple(params[pname].shape):
                spec["parameters"][f"{name}.{pname}"] = list(p.shape)
        if not any(f"{name}.".startswith(f"{ly.prefix}.") for ly in layers):
            continue  # pruning changes attributes in decoder layers only (the model's own
            # may differ after loading, e.g. a loss type set by from_pretrained)
        theirs = vars(twin)
        for attr, value in vars(module).items():
            if attr.startswith("_") or attr == "training":
                continue
            if isinstance(value, (PretrainedConfig, LayerConfig)):
                # the module's own view (or copy) of the config: the keys it says otherwise
                own = {k: v for k, v in value.to_dict().items() if top.get(k) != v}
                if value is not model.config and own:
                    spec["configs"][f"{name}.{attr}"] = own
            elif _plain(value) and (attr not in theirs or theirs[attr] != value):
                spec["attributes"].setdefault(name, {})[attr] = value
    return {k: v for k, v in spec.items() if v}


def write_weights(model: nn.Module, path: Path) -> None:
    """The state dict as safetensors, a tensor shared by several names (a tied LM head) stored
    once under the first name (the input embedding's, as transformers saves it)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        tensors[name] = t.detach().contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    path.chmod(MODE)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.chmod(path, MODE)


def load_pruned(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The pruned model saved by ``save_pruned`` (or ``searcher export --format pruned``).
    Reads JSON and safetensors only; a directory that does not fit is refused in one line."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    path = Path(path)
    try:
        record = json.loads((path / CONFIG).read_text(encoding="utf-8"))
        if record.get("format") != FORMAT:
            raise SearcherError(f"{path / CONFIG} is not a {FORMAT} record")
        base = dict(record["base_config"])
        shapes = _shapes(record["layers"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SearcherError(f"{path} is not a pruned searcher model: {_one_line(exc)}") from None
    model_type = base.pop("model_type", None)
    family_for(model_type)
    hf_cfg = _read_hf_config(path)
    if hf_cfg and hf_cfg.get("model_type") != model_type:
        raise SearcherError(
            f"{path}: {HF_CONFIG} is a {hf_cfg.get('model_type')!r} model, {CONFIG} a "
            f"{model_type!r} one"
        )
    if KEY in hf_cfg:
        return _load_reshaped(path, model_type, shapes, dtype)
    try:
        config = AutoConfig.for_model(model_type, **base)
    except (ValueError, KeyError, TypeError) as exc:
        raise SearcherError(
            f"{path}: cannot rebuild a {model_type!r} config: {_one_line(exc)}"
        ) from None
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
            elif units != layer.block(kind).units:
                resize_to(s.family, layer.module, layer.block(kind), units, s.shapes)
        moe = layer.mlp.experts
        count = shape.get("num_experts")
        if shape["intermediate_size"] and moe is not None and count not in (None, moe.count):
            keep_experts(s.family, layer.module, layer.mlp, count)
    model.tie_weights()  # before loading: a tied head is stored once, under one name
    try:
        missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise SearcherError(f"{path / WEIGHTS}: {_one_line(exc)}") from None
    if unexpected or missing:
        raise SearcherError(
            f"{path}: the weights do not fit the recorded shapes (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    model.tie_weights()
    return model.eval().requires_grad_(False)


SHAPE_KEYS = ("num_heads", "num_key_value_heads", "intermediate_size")
MOE_KEY = "num_experts"  # a mixture-of-experts layer's shapes have it too


def _shapes(layers: Any) -> list[dict[str, int]]:
    """``pruned_config.json``'s per-layer shapes, checked: a list of {key: count >= 0}."""
    if not isinstance(layers, list) or not layers:
        raise ValueError(f"'layers' is not a list of layer shapes: {layers!r:.80}")
    for i, shape in enumerate(layers):
        keys = sorted(shape) if isinstance(shape, dict) else None
        if keys not in (sorted(SHAPE_KEYS), sorted((*SHAPE_KEYS, MOE_KEY))):
            raise ValueError(f"layer {i}: not a dict of {', '.join(SHAPE_KEYS)}: {shape!r:.80}")
        for key, value in shape.items():
            if type(value) is not int or value < 0:
                raise ValueError(f"layer {i}: {key} is {value!r:.40}, not a count")
    return layers


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line, not too long for one."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _read_hf_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((path / HF_CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}  # written before config.json was (non-uniform shapes)
    except (OSError, ValueError) as exc:
        raise SearcherError(f"{path / HF_CONFIG}: {_one_line(exc)}") from None
    if not isinstance(cfg, dict):
        raise SearcherError(f"{path / HF_CONFIG}: not a JSON object")
    return cfg


def _load_reshaped(
    path: Path, model_type: str, shapes: list[dict[str, int]], dtype: torch.dtype
) -> nn.Module:
    """A directory with remote code, loaded by searcher's own copy of that code: the same
    classes ``from_pretrained(..., trust_remote_code=True)`` builds, none of the directory's
    code run, and only its safetensors read. The model built from ``config.json`` must have
    the layers ``pruned_config.json`` records."""
    from searcher.export import modeling_searcher_pruned as code

    try:
        config_class, model_class = code.classes_for(model_type)
        config = config_class.from_pretrained(path)
        model, info = model_class.from_pretrained(
            path, config=config, dtype=dtype, use_safetensors=True, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise SearcherError(f"{path}: cannot load the pruned model: {_one_line(exc)}") from None
    missing, unexpected = info.get("missing_keys") or (), info.get("unexpected_keys") or ()
    mismatched = [m[0] if isinstance(m, tuple) else m for m in info.get("mismatched_keys") or ()]
    if missing or unexpected or mismatched:
        raise SearcherError(
            f"{path}: the weights do not fit {HF_CONFIG} (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}, mismatched {sorted(mismatched)[:3]})"
        )
    got = layer_shapes(model)
    if len(got) != len(shapes):
        raise SearcherError(
            f"{path}: {HF_CONFIG} builds {len(got)} layers, {CONFIG} records {len(shapes)}"
        )
    for i, (built, recorded) in enumerate(zip(got, shapes)):
        if built != recorded:
            differ = ", ".join(
                f"{k} {built.get(k)} vs {recorded.get(k)}"
                for k in sorted({*built, *recorded}) if built.get(k) != recorded.get(k)
            )  # fmt: skip
            raise SearcherError(
                f"{path}: layer {i} as {HF_CONFIG} builds it differs from {CONFIG} ({differ})"
            )
    return model.eval().requires_grad_(False)
