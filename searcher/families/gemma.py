"""Gemma, Gemma 2 and Gemma 3 (text): the Llama layout of projections, with Gemma's own norms
(x * (1 + w)), scaled embeddings, GELU-tanh MLP, extra norms around each block (Gemma 2 and 3)
and per-head q/k norms (Gemma 3). Slicing is Llama's; the lean latency block is Gemma's, read
with Llama's readers of the shared module names."""

from __future__ import annotations

from torch import nn

from latency_models.graph import AttentionWeights, DecoderWeights, MLPWeights, Style, rotary_of
from latency_models.lean_parts import (
    activation,
    embed_scale,
    head_dim,
    no_bidirectional,
    sliding_window,
)
from searcher.families.llama import Llama, attention_weights, gated_mlp, lean_layers


class Gemma(Llama):
    name = "gemma"
    model_types = ("gemma", "gemma2", "gemma3_text")

    def lean(self, model: nn.Module) -> DecoderWeights:
        read = {"gemma": _gemma, "gemma2": _gemma2, "gemma3_text": _gemma3_text}
        return read[model.config.model_type](model)


def _gemma(model: nn.Module) -> DecoderWeights:
    """Gemma: RMSNorm as x * (1 + w), embeddings scaled by sqrt(hidden) in the model's dtype,
    a tanh-GELU gated MLP, head_dim independent of hidden / heads."""
    cfg = model.config
    no_bidirectional(cfg, "Gemma")
    style = Style(
        family="Gemma", norm="rms1p", act=activation(cfg.hidden_act, "Gemma"),
        # this transformers' Gemma (1) scales scores by head_dim ** -0.5
        score_scale=None, embed_scale=embed_scale(model.model.embed_tokens),
    )  # fmt: skip

    def attention(i: int, block: nn.Module) -> AttentionWeights:
        return attention_weights(model, block, block.input_layernorm.weight)

    def mlp(i: int, block: nn.Module) -> MLPWeights:
        return gated_mlp(block, block.post_attention_layernorm.weight)

    return lean_layers(model, style, attention, mlp)


def _post_normed_mlp(i: int, block: nn.Module) -> MLPWeights:
    """Gemma 2 and 3's MLP: pre_feedforward_layernorm before, post_feedforward_layernorm
    after."""
    return gated_mlp(
        block, block.pre_feedforward_layernorm.weight,
        post_norm=block.post_feedforward_layernorm.weight,
    )  # fmt: skip


def _gemma2(model: nn.Module) -> DecoderWeights:
    """Gemma 2: Gemma's norms with post-norms on both blocks (post_attention_layernorm is the
    attention's post-norm; pre_feedforward_layernorm the MLP's pre-norm), softcapped attention
    scores and logits, scores scaled by query_pre_attn_scalar ** -0.5, sliding windows on
    alternate layers (recorded, not applied)."""
    cfg = model.config
    no_bidirectional(cfg, "Gemma 2")
    style = Style(
        family="Gemma 2", norm="rms1p", post_norm=True,
        act=activation(cfg.hidden_activation, "Gemma 2"),
        score_scale=float(cfg.query_pre_attn_scalar) ** -0.5,
        attn_softcap=cfg.attn_logit_softcapping, logits_softcap=cfg.final_logit_softcapping,
        embed_scale=embed_scale(model.model.embed_tokens),
    )  # fmt: skip

    def attention(i: int, block: nn.Module) -> AttentionWeights:
        return attention_weights(
            model, block, block.input_layernorm.weight,
            post_norm=block.post_attention_layernorm.weight, sliding_window=sliding_window(cfg, i),
        )  # fmt: skip

    return lean_layers(model, style, attention, _post_normed_mlp)


def _gemma3_text(model: nn.Module) -> DecoderWeights:
    """Gemma 3 (text, Gemma3ForCausalLM): Gemma 2's layout plus per-head q_norm / k_norm in
    the 1 + w form and a rotary table per layer type (local sliding layers, global full
    ones). Its attention takes no score softcap (the config's attn_logit_softcapping is not
    passed on)."""
    cfg = model.config
    no_bidirectional(cfg, "Gemma 3")
    style = Style(
        family="Gemma 3", norm="rms1p", post_norm=True,
        act=activation(cfg.hidden_activation, "Gemma 3"),
        score_scale=float(cfg.query_pre_attn_scalar) ** -0.5,
        logits_softcap=cfg.final_logit_softcapping,
        embed_scale=embed_scale(model.model.embed_tokens),
    )  # fmt: skip
    emb, hd = model.model.rotary_emb, head_dim(cfg)
    tables = {kind: rotary_of(model, emb, hd, kind) for kind in sorted(set(cfg.layer_types))}

    def attention(i: int, block: nn.Module) -> AttentionWeights:
        a = block.self_attn
        return attention_weights(
            model, block, block.input_layernorm.weight, q_norm=a.q_norm.weight,
            k_norm=a.k_norm.weight, post_norm=block.post_attention_layernorm.weight,
            rotary=tables[cfg.layer_types[i]], sliding_window=sliding_window(cfg, i),
        )  # fmt: skip

    main = tables.get("full_attention") or next(iter(tables.values()))
    return lean_layers(model, style, attention, _post_normed_mlp, rotary=main)
