"""A decoder whose layers differ in shape, as transformers' own model of its family.

searcher copies this file next to the weights of a pruned model whose layers cannot be said
by the family's ordinary config (per-layer heads or MLP widths, removed blocks), and names it
in ``config.json``'s ``auto_map``, so that
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads the model with
torch and transformers alone. It imports nothing else.

The model is the family's own (``classes_for`` subclasses the config and causal-LM classes
transformers maps the recorded ``model_type`` to): it is built dense from the config, then,
before the weights load, changed as ``config.searcher_pruned`` says, all plain data recorded by
comparing the pruned model with a dense one built from the same config:

- ``removed``: module name -> ``{"attention": bool, "features": int | None,
  "layer": int | None}`` (``layer``: a removed attention's index in the KV cache; ``"pair":
  true`` for an MLP that returns two values), a block replaced by ``RemovedBlock``, which
  adds nothing to the residual stream;
- ``parameters``: parameter name -> its shape, for each parameter whose shape changed (each is
  replaced by an empty parameter of that shape, which the weights then fill);
- ``attributes``: module name -> ``{attribute: value}``, module attributes that follow the
  pruned sizes (head counts, split sizes, in/out features);
- ``configs``: ``module.attribute`` -> ``{key: value}``, a module's own copy of the config
  with those keys changed (for modules that read their head counts from the config).

Attention and MLP computations are transformers' own; only shapes change. searcher's own
stand-in for a removed block (``Dropped`` in its families' base module) is ``RemovedBlock``:
this file is the one source of how a removed block computes (transformers is imported only by
``classes_for``, so that searcher's families import this module with torch alone).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

KEY = "searcher_pruned"
CONFIG_CLASS = "SearcherPrunedConfig"
MODEL_CLASS = "SearcherPrunedForCausalLM"
CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "layer_past")


class RemovedBlock(nn.Module):
    """A removed block: its output is zeros, ``features`` wide (the input's width when None).
    A removed attention returns (output, attention weights) as attention modules do, and
    still records its tokens in the KV cache: one key and one value of size 1 per token, so
    that the cache's length (which transformers reads from the first layer) stays the number
    of tokens seen, whichever layers lost their attention."""

    def __init__(
        self, attention: bool, features: int | None = None, layer: int | None = None,
        pair: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.attention = attention
        self.features = features
        self.layer = layer  # a removed attention's index in the KV cache
        self.pair = pair  # an MLP whose callers unpack (output, router scores): gpt-oss's

    def removed_as(self) -> dict[str, Any]:
        """What stands in, as plain data (``reshape`` builds it again from this)."""
        how = {"attention": self.attention, "features": self.features, "layer": self.layer}
        return {**how, "pair": True} if self.pair else how

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        width = hidden_states.shape[-1] if self.features is None else self.features
        zeros = hidden_states.new_zeros(*hidden_states.shape[:-1], width)
        if not self.attention:
            return (zeros, None) if self.pair else zeros
        record_tokens(kwargs, hidden_states, self.layer)
        return zeros, None


def record_tokens(kwargs: dict[str, Any], hidden_states: torch.Tensor, layer: int | None) -> None:
    """Add a removed attention's tokens to the KV cache among ``kwargs``, if there is one."""
    if layer is None:
        return
    for name in CACHE_ARGUMENTS:
        cache = kwargs.get(name)
        if cache is not None:
            cache = getattr(cache, "self_attention_cache", cache)  # an encoder-decoder cache
            batch, tokens = hidden_states.shape[:2]
            kv = hidden_states.new_zeros(batch, 1, tokens, 1)
            cache.update(kv, kv, layer)
            return


def reshape(model: nn.Module, spec: dict[str, Any]) -> None:
    """Change a freshly built dense model into the pruned one ``spec`` describes."""
    for name, how in spec.get("removed", {}).items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, RemovedBlock(**how))
    for name, shape in spec.get("parameters", {}).items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        old = getattr(module, attr)
        new = torch.empty(shape, dtype=old.dtype, device=old.device)
        setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    for name, values in spec.get("attributes", {}).items():
        module = model.get_submodule(name)
        for attr, value in values.items():
            if isinstance(getattr(module, attr, None), tuple):
                value = tuple(value)  # JSON has lists only
            setattr(module, attr, value)
    for name, values in spec.get("configs", {}).items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        config = copy.copy(getattr(module, attr))
        for key, value in values.items():
            setattr(config, key, value)
        setattr(module, attr, config)


def classes_for(model_type: str) -> tuple[type, type]:
    """The config and causal-LM classes of a pruned model of ``model_type``: subclasses of the
    ones transformers maps that model type to."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    base_config = CONFIG_MAPPING[model_type]
    base_model = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])

    class SearcherPrunedConfig(base_config):
        """The family's config; ``searcher_pruned`` holds what differs per layer."""

    class SearcherPrunedForCausalLM(base_model):
        """The family's causal LM, built dense and then reshaped as the config says."""

        config_class = SearcherPrunedConfig

        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(config, *args, **kwargs)
            reshape(self, getattr(config, KEY, None) or {})

    for cls, name in (
        (SearcherPrunedConfig, CONFIG_CLASS),
        (SearcherPrunedForCausalLM, MODEL_CLASS),
    ):
        cls.__name__ = cls.__qualname__ = name
    return SearcherPrunedConfig, SearcherPrunedForCausalLM
