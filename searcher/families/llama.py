"""The Llama layout: ``model.layers[i].self_attn.{q,k,v,o}_proj`` and a gated
``mlp.{gate,up,down}_proj``. Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms,
which no unit owns a part of), Granite (multipliers only the lean graph needs) and OLMo2 (q/k
norms over all heads together: each KV group owns its heads' part of them; no pre-norms).

The lean latency block's readers of this layout (``lean_layers``, ``attention_weights``,
``gated_mlp``) are shared with Gemma, which keeps Llama's module names."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from latency_models.graph import (
    AttentionWeights,
    DecoderWeights,
    MLPWeights,
    Rotary,
    Style,
    rotary_of,
)
from latency_models.lean_parts import activation, group_size, head_dim, live, sliding_window
from searcher.families.base import BlockLayout, Family, Shapes, Slab, get_tensor, linear_block


class Llama(Family):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo2")

    def block(self, kind: str, shapes: Shapes, layer: nn.Module) -> BlockLayout:
        s = shapes
        if kind == "mlp":
            one = ((0, 1),)
            outs = [("gate_proj", one), ("up_proj", one)]
            return linear_block("mlp", "mlp", s.intermediate, outs, ("down_proj", one), layer)
        q, kv = ((0, s.group_size * s.head_dim),), ((0, s.head_dim),)
        norms: tuple[Slab, ...] = ()
        for norm, segs in (("q_norm", q), ("k_norm", kv)):
            path = f"self_attn.{norm}.weight"
            # OLMo2's norms span every head (heads * head_dim); Qwen3's one head (head_dim)
            if _has(layer, path) and get_tensor(layer, path).shape[0] != s.head_dim:
                norms += (Slab(path, 0, segs),)
        outs = [("q_proj", q), ("k_proj", kv), ("v_proj", kv)]
        return linear_block("attn", "self_attn", s.kv_heads, outs, ("o_proj", q), layer, norms)

    def lean(self, model: nn.Module) -> DecoderWeights:
        read = {"granite": _granite, "olmo2": _olmo2}.get(model.config.model_type, _llama)
        return read(model)


def _has(layer: nn.Module, path: str) -> bool:
    try:
        get_tensor(layer, path)
    except AttributeError:
        return False
    return True


# --- the lean latency block ----------------------------------------------------------------
# A dropped block (a module without parameters in place of self_attn / mlp) is left out
# (None); a pruned one is read at the shapes of its weights.

AttentionReader = Callable[[int, nn.Module], AttentionWeights]
"""(layer index, decoder layer) -> that layer's live attention block."""
MLPReader = Callable[[int, nn.Module], MLPWeights]


def lean_layers(
    model: nn.Module, style: Style, attention: AttentionReader, mlp: MLPReader,
    rotary: Rotary | None = None,
) -> DecoderWeights:  # fmt: skip
    """The lean weights of a model with Llama's modules (``model.model.layers[i].self_attn``
    with q_proj, ``.mlp`` with gate_proj, ``model.model.norm``, ``model.model.rotary_emb``):
    ``attention`` and ``mlp`` read each layer's live blocks; ``rotary`` defaults to the
    model's one table."""
    cfg, base = model.config, model.model
    layers = []
    for i, block in enumerate(base.layers):
        attn = attention(i, block) if live(block.self_attn, "q_proj") else None
        ffn = mlp(i, block) if live(block.mlp, "gate_proj") else None
        layers.append((attn, ffn))
    if rotary is None:
        rotary = rotary_of(model, base.rotary_emb, head_dim(cfg))
    return DecoderWeights(
        layers, float(cfg.rms_norm_eps), rotary, cfg.hidden_size,
        embed=model.get_input_embeddings().weight, final_norm=base.norm.weight,
        head=model.get_output_embeddings().weight, style=style,
    )  # fmt: skip


def attention_weights(
    model: nn.Module, block: nn.Module, norm: torch.Tensor | None, **extra
) -> AttentionWeights:
    """A layer's ``self_attn`` with q_proj / k_proj / v_proj / o_proj (nn.Linear) as
    ``AttentionWeights``, with pre-norm ``norm``; ``extra`` sets the other fields."""
    cfg, a = model.config, block.self_attn
    return AttentionWeights(
        norm=norm, q=a.q_proj.weight, k=a.k_proj.weight, v=a.v_proj.weight, o=a.o_proj.weight,
        head_dim=head_dim(cfg), group_size=group_size(cfg), q_bias=a.q_proj.bias,
        k_bias=a.k_proj.bias, v_bias=a.v_proj.bias, o_bias=a.o_proj.bias, **extra,
    )  # fmt: skip


def gated_mlp(block: nn.Module, norm: torch.Tensor | None, **extra) -> MLPWeights:
    """A layer's ``mlp`` with gate_proj / up_proj / down_proj (nn.Linear) as ``MLPWeights``."""
    m = block.mlp
    return MLPWeights(
        norm, m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight,
        gate_bias=m.gate_proj.bias, up_bias=m.up_proj.bias, down_bias=m.down_proj.bias, **extra,
    )  # fmt: skip


def _weight(module: nn.Module | None) -> torch.Tensor | None:
    return None if module is None else module.weight


def _llama(model: nn.Module) -> DecoderWeights:
    """Llama, Mistral, Qwen2 (q/k/v biases) and Qwen3 (per-head q/k norms): the graph's
    default style, with the config's activation."""
    act = activation(getattr(model.config, "hidden_act", "silu"), "Llama")
    return _pre_normed(model, Style(act=act))


def _granite(model: nn.Module) -> DecoderWeights:
    """Granite: Llama's blocks with a score scale (attention_multiplier), scaled embeddings,
    residual adds and logits (divided by logits_scaling)."""
    cfg = model.config
    style = Style(
        family="Granite", act=activation(cfg.hidden_act, "Granite"),
        score_scale=float(cfg.attention_multiplier), embed_scale=float(cfg.embedding_multiplier),
        residual_scale=float(cfg.residual_multiplier), logits_divisor=float(cfg.logits_scaling),
    )  # fmt: skip
    return _pre_normed(model, style)


def _pre_normed(model: nn.Module, style: Style) -> DecoderWeights:
    """Llama's blocks as they are: input_layernorm before the attention (per-head q/k norms
    where it has them), post_attention_layernorm before the MLP."""

    def attention(i: int, block: nn.Module) -> AttentionWeights:
        a = block.self_attn
        return attention_weights(
            model, block, block.input_layernorm.weight,
            q_norm=_weight(getattr(a, "q_norm", None)), k_norm=_weight(getattr(a, "k_norm", None)),
            sliding_window=_window(model.config, i),
        )  # fmt: skip

    def mlp(i: int, block: nn.Module) -> MLPWeights:
        return gated_mlp(block, block.post_attention_layernorm.weight)

    return lean_layers(model, style, attention, mlp)


def _window(cfg, i: int) -> int | None:
    """Layer ``i``'s sliding window as Hugging Face applies it: Qwen2 and Qwen3 on the
    sliding layers of their ``layer_types``, Mistral on every layer (``sliding_window``)."""
    if getattr(cfg, "layer_types", None) is not None:
        return sliding_window(cfg, i)
    return getattr(cfg, "sliding_window", None)


def _olmo2(model: nn.Module) -> DecoderWeights:
    """OLMo2: no pre-norms; post_attention_layernorm / post_feedforward_layernorm normalise
    the blocks' outputs; q_norm / k_norm are RMSNorms over all heads' dims together."""
    cfg = model.config
    style = Style(
        family="OLMo2", act=activation(cfg.hidden_act, "OLMo2"), pre_norm=False, post_norm=True,
        qk_norm="all",
    )  # fmt: skip

    def attention(i: int, block: nn.Module) -> AttentionWeights:
        a = block.self_attn
        return attention_weights(
            model, block, None, q_norm=a.q_norm.weight, k_norm=a.k_norm.weight,
            post_norm=block.post_attention_layernorm.weight,
        )  # fmt: skip

    def mlp(i: int, block: nn.Module) -> MLPWeights:
        return gated_mlp(block, None, post_norm=block.post_feedforward_layernorm.weight)

    return lean_layers(model, style, attention, mlp)
