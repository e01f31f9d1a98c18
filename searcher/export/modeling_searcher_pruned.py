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
- ``configs``: ``module.attribute`` -> ``{key: value}``, a module's own values for those
  config keys (for modules that read their head counts from the config): the module gets a
  ``LayerConfig``, which reads every other key from the model's config, so that what changes
  there after loading (``set_attn_implementation``) reaches every layer.

Attention and MLP computations are transformers' own; only shapes change. searcher's own
stand-in for a removed block (``Dropped`` in its families' base module) is ``RemovedBlock``:
this file is the one source of how a removed block computes (transformers is imported only by
``classes_for``, so that searcher's families import this module with torch alone).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

KEY = "searcher_pruned"
CONFIG_CLASS = "SearcherPrunedConfig"
MODEL_CLASS = "SearcherPrunedForCausalLM"
CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "layer_past")


class LayerConfig:
    """One layer's view of the model's config: its own values for the few keys that differ in
    that layer (its head counts), every other attribute read from the shared config when asked.

    A copy of the config would keep what the model's config said when it was made: switched
    later with ``set_attn_implementation`` (which sets the model config's
    ``_attn_implementation`` and no module's), the copy's layer would go on with the old
    attention. A view follows. Setting an attribute on the view sets the layer's own value.
    Plain data and a reference, so deep copies and pickles of the model keep every view on
    that model's (copied) config; ``to_dict`` is the shared config's with the layer's values.
    """

    def __init__(self, shared: Any, **own: Any) -> None:
        if isinstance(shared, LayerConfig):  # a view of a view: one view of the same config
            own = {**shared.own(), **own}
            shared = shared.shared
        object.__setattr__(self, "_shared", shared)
        for key, value in own.items():
            setattr(self, key, value)

    @property
    def shared(self) -> Any:
        """The config this view reads what it does not hold from."""
        return vars(self)["_shared"]

    def own(self) -> dict[str, Any]:
        """The layer's own values, by their config keys."""
        return {k: v for k, v in vars(self).items() if k != "_shared"}

    def to_dict(self) -> dict[str, Any]:
        return {**self.shared.to_dict(), **self.own()}

    def _key(self, name: str) -> str:
        """A config key under its own name (a config's ``attribute_map`` gives aliases)."""
        return getattr(self.shared, "attribute_map", {}).get(name, name)

    def __getattr__(self, name: str) -> Any:
        # called only for what neither the view nor its class holds
        state = vars(self)
        if "_shared" not in state or (name.startswith("__") and name.endswith("__")):
            # while unpickling (no state yet), or copy / pickle asking for a protocol of the
            # view itself: never the shared config's
            raise AttributeError(name)
        key = self._key(name)
        return state[key] if key in state else getattr(state["_shared"], key)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, self._key(name), value)

    def __repr__(self) -> str:
        return f"LayerConfig({type(self.shared).__name__}, own={self.own()!r})"


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
        setattr(module, attr, LayerConfig(getattr(module, attr), **values))


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

        @classmethod
        def _can_set_experts_implementation(cls) -> bool:
            # transformers decides whether a class may pick its experts kernel by looking for
            # a decorator in the class's source file; this file has none, but the experts are
            # the family's own: without this, a pruned MoE model would run eager experts, not
            # the grouped kernel it was scored with
            return base_model._can_set_experts_implementation()

        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(config, *args, **kwargs)
            reshape(self, getattr(config, KEY, None) or {})

    for cls, name in (
        (SearcherPrunedConfig, CONFIG_CLASS),
        (SearcherPrunedForCausalLM, MODEL_CLASS),
    ):
        cls.__name__ = cls.__qualname__ = name
    return SearcherPrunedConfig, SearcherPrunedForCausalLM
