"""Falcon: ``transformer.h[i].self_attention.query_key_value`` in one of three layouts, and
``mlp.dense_h_to_4h`` / ``mlp.dense_4h_to_h``. With the new decoder architecture (Falcon
40B/180B) the fused rows come group by group: a KV group's query heads, then its key and its
value; with multi-query attention (Falcon 7B) all queries, then the one key and value (one KV
group, so attention width is not searchable); otherwise head by head (query, key, value).
The MLP is GPT-NeoX's. ALiBi models are refused: their slopes are built for the model's full
head count."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from latency_models.graph import AttentionWeights, DecoderWeights, Style, rotary_of
from latency_models.lean_parts import activation, layer_norm, live
from searcher.errors import SearcherError
from searcher.families.base import BlockLayout, Shapes, linear_block
from searcher.families.gpt_neox import GPTNeoX, mlp_weights


class Falcon(GPTNeoX):
    name = "falcon"
    model_types = ("falcon",)
    layers_path = "transformer.h"
    head_dim_in_config = False
    intermediate_key = "ffn_hidden_size"

    def check(self, model: nn.Module) -> None:
        if model.config.alibi:
            raise SearcherError(
                "Falcon models with ALiBi are not supported: their slopes are built for the "
                "model's full head count (rotary Falcon models are)"
            )

    def shapes(self, model: nn.Module) -> Shapes:
        cfg = model.config
        kv = cfg.num_kv_heads if cfg.new_decoder_architecture or not cfg.multi_query else 1
        return Shapes(
            layers=len(self.decoder_layers(model)),
            hidden=cfg.hidden_size,
            heads=cfg.num_attention_heads,
            kv_heads=kv,
            head_dim=cfg.hidden_size // cfg.num_attention_heads,
            intermediate=cfg.ffn_hidden_size,
            vocab=model.get_output_embeddings().weight.shape[0],
        )

    def block(self, kind: str, shapes: Shapes, layer: nn.Module) -> BlockLayout:
        s = shapes
        if kind == "mlp":
            return super().block(kind, shapes, layer)  # GPT-NeoX's MLP
        attn = layer.get_submodule("self_attention")
        hd, r = s.head_dim, s.group_size
        if attn.new_decoder_architecture:
            qkv = ((0, (r + 2) * hd),)
        elif attn.multi_query:
            qkv = ((0, s.heads * hd), (s.heads * hd, hd), ((s.heads + 1) * hd, hd))
        else:
            qkv = ((0, 3 * hd),)
        outs = [("query_key_value", qkv)]
        into = ("dense", ((0, r * hd),))
        return linear_block("attn", "self_attention", s.kv_heads, outs, into, layer)

    def resized(self, layer: nn.Module, block: BlockLayout, units: int, shapes: Shapes) -> None:
        if block.kind == "attn":
            attn = layer.get_submodule(block.name)
            attn.num_heads = units * shapes.group_size
            if attn.new_decoder_architecture or not attn.multi_query:
                attn.num_kv_heads = units

    def lean(self, model: nn.Module) -> DecoderWeights:
        """Rotary Falcon as ``FalconDecoderLayer.forward`` computes it: LayerNorms (with
        biases), a non-gated MLP, biases where ``config.bias``, rotary over whole heads. The
        new decoder architecture and ``parallel_attn`` models add both blocks to the layer's
        input (h + attn(ln_a(h)) + mlp(ln_m(h))): with ``ln_attn`` / ``ln_mlp`` where the new
        architecture has two norms, else with ``input_layernorm`` read by both blocks (the
        graph computes it once per block: one extra LayerNorm a layer). Other models are
        sequential: ``post_attention_layernorm`` before the MLP."""
        self.check(model)  # ALiBi: the graph would rotate what the model does not
        cfg, base = model.config, model.transformer
        hd = cfg.hidden_size // cfg.num_attention_heads
        new = bool(cfg.new_decoder_architecture)
        parallel = new or bool(cfg.parallel_attn)
        # the decoder layer sets num_ln_in_parallel_attn to 2 when the new architecture's
        # config leaves it out
        two_norms = new and cfg.num_ln_in_parallel_attn in (None, 2)
        style = Style(
            family="Falcon", norm="layer", act=activation(cfg.activation, "Falcon"), gated=False,
            parallel=parallel,
        )  # fmt: skip
        layers = []
        for block in base.h:
            if two_norms:
                attn_ln, mlp_ln = block.ln_attn, block.ln_mlp
            elif parallel:
                attn_ln = mlp_ln = block.input_layernorm
            else:
                attn_ln, mlp_ln = block.input_layernorm, block.post_attention_layernorm
            a, m = block.self_attention, block.mlp
            attn = mlp = None
            if live(a, "query_key_value"):
                (q, k, v), group = _split_qkv(a.query_key_value.weight, cfg, hd)
                qb = kb = vb = None
                if a.query_key_value.bias is not None:
                    (qb, kb, vb), _ = _split_qkv(a.query_key_value.bias, cfg, hd)
                norm, norm_bias = layer_norm(attn_ln, cfg.hidden_size)
                attn = AttentionWeights(
                    norm, q, k, v, a.dense.weight, hd, group, q_bias=qb, k_bias=kb, v_bias=vb,
                    o_bias=a.dense.bias, norm_bias=norm_bias,
                )  # fmt: skip
            if live(m, "dense_h_to_4h"):
                mlp = mlp_weights(m, mlp_ln, cfg.hidden_size)
            layers.append((attn, mlp))
        final, final_bias = layer_norm(base.ln_f, cfg.hidden_size)
        return DecoderWeights(
            layers, float(cfg.layer_norm_epsilon), rotary_of(model, base.rotary_emb, hd),
            cfg.hidden_size, embed=base.word_embeddings.weight, final_norm=final,
            head=model.get_output_embeddings().weight, style=style, final_norm_bias=final_bias,
        )  # fmt: skip


def _split_qkv(
    t: torch.Tensor, cfg: Any, hd: int
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], int]:
    """A (possibly pruned) query_key_value weight [rows, in] or bias [rows] as its query, key
    and value rows, and the query heads per KV head. The row counts come from ``t``; the
    query heads per KV group from the config (pruning removes whole groups)."""
    rows, rest = t.shape[0], t.shape[1:]
    if cfg.new_decoder_architecture:  # [group][r queries, 1 key, 1 value][head_dim]
        r = cfg.num_attention_heads // cfg.num_kv_heads
        by_group = t.reshape(rows // ((r + 2) * hd), r + 2, hd, *rest)
        q = by_group[:, :r].reshape(-1, *rest)
        k, v = (by_group[:, i].reshape(-1, *rest) for i in (r, r + 1))
        return (q, k, v), r
    if cfg.multi_query:  # [all queries, 1 key, 1 value]: one KV group of every query head
        q, k, v = t.split([rows - 2 * hd, hd, hd])
        return (q, k, v), q.shape[0] // hd
    by_head = t.reshape(rows // (3 * hd), 3, hd, *rest)  # head by head: [q, k, v][head_dim]
    q, k, v = (by_head[:, i].reshape(-1, *rest) for i in range(3))
    return (q, k, v), 1
