"""GPT-NeoX and Pythia: ``gpt_neox.layers[i].attention.query_key_value`` holds, head by head,
that head's query, key and value rows (3 * head_dim per head), ``attention.dense`` the output;
``mlp.dense_h_to_4h`` / ``mlp.dense_4h_to_h``; biases; a parallel residual and partial rotary
matter only to the lean latency block."""

from __future__ import annotations

from torch import nn

from latency_models.graph import AttentionWeights, DecoderWeights, MLPWeights, Style, rotary_of
from latency_models.lean_parts import activation, layer_norm, live, rotary_dims
from searcher.families.base import BlockLayout, Family, Shapes, linear_block


class GPTNeoX(Family):
    name = "gpt_neox"
    model_types = ("gpt_neox",)
    layers_path = "gpt_neox.layers"
    head_dim_in_config = False

    def block(self, kind: str, shapes: Shapes, layer: nn.Module) -> BlockLayout:
        s = shapes
        if kind == "mlp":
            one = ((0, 1),)
            outs = [("dense_h_to_4h", one)]
            return linear_block("mlp", "mlp", s.intermediate, outs, ("dense_4h_to_h", one), layer)
        qkv, out = ((0, 3 * s.head_dim),), ((0, s.head_dim),)
        outs = [("query_key_value", qkv)]
        return linear_block("attn", "attention", s.kv_heads, outs, ("dense", out), layer)

    def lean(self, model: nn.Module) -> DecoderWeights:
        """Fused query_key_value with rows [heads, 3 (q, k, v), head_dim], partial rotary,
        LayerNorms, biases, a non-gated GELU MLP, and (use_parallel_residual)
        h + attn(ln1(h)) + mlp(ln2(h))."""
        cfg, base = model.config, model.gpt_neox
        hd = cfg.hidden_size // cfg.num_attention_heads
        style = Style(
            family="GPT-NeoX", norm="layer", act=activation(cfg.hidden_act, "GPT-NeoX"),
            gated=False, rotary_dims=rotary_dims(cfg, hd),
            parallel=bool(cfg.use_parallel_residual),
        )  # fmt: skip
        layers = []
        for block in base.layers:
            a, m = block.attention, block.mlp
            attn = mlp = None
            if live(a, "query_key_value"):
                w, b = a.query_key_value.weight, a.query_key_value.bias
                heads = w.shape[0] // (3 * hd)
                w = w.reshape(heads, 3, hd, w.shape[1])
                q, k, v = (w[:, i].reshape(heads * hd, -1) for i in range(3))
                qb = kb = vb = None
                if b is not None:
                    qb, kb, vb = (b.reshape(heads, 3, hd)[:, i].reshape(-1) for i in range(3))
                norm, norm_bias = layer_norm(block.input_layernorm, cfg.hidden_size)
                attn = AttentionWeights(
                    norm, q, k, v, a.dense.weight, hd, 1, q_bias=qb, k_bias=kb, v_bias=vb,
                    o_bias=a.dense.bias, norm_bias=norm_bias,
                )  # fmt: skip
            if live(m, "dense_h_to_4h"):
                mlp = mlp_weights(m, block.post_attention_layernorm, cfg.hidden_size)
            layers.append((attn, mlp))
        final, final_bias = layer_norm(base.final_layer_norm, cfg.hidden_size)
        return DecoderWeights(
            layers, float(cfg.layer_norm_eps), rotary_of(model, base.rotary_emb, hd),
            cfg.hidden_size, embed=base.embed_in.weight, final_norm=final,
            head=model.get_output_embeddings().weight, style=style, final_norm_bias=final_bias,
        )  # fmt: skip


def mlp_weights(mlp: nn.Module, norm: nn.Module, hidden: int) -> MLPWeights:
    """The lean block of GPT-NeoX's MLP (``dense_h_to_4h``, activation, ``dense_4h_to_h``,
    biases) behind the LayerNorm ``norm``; Falcon's MLP is the same."""
    weight, bias = layer_norm(norm, hidden)
    return MLPWeights(
        weight, None, mlp.dense_h_to_4h.weight, mlp.dense_4h_to_h.weight, norm_bias=bias,
        up_bias=mlp.dense_h_to_4h.bias, down_bias=mlp.dense_4h_to_h.bias,
    )  # fmt: skip
