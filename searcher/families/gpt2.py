"""GPT-2: ``transformer.h[i].attn`` with one fused ``c_attn`` (queries, keys, values) and
``mlp.c_fc`` / ``mlp.c_proj``, all transformers ``Conv1D`` modules whose weights are stored
transposed ([in, out]); biases everywhere; no grouped-query attention, so a unit of attention
is one head."""

from __future__ import annotations

from torch import nn

from latency_models.graph import AttentionWeights, DecoderWeights, MLPWeights, Style
from latency_models.lean_parts import activation, layer_norm, live
from searcher.errors import SearcherError
from searcher.families.base import BlockLayout, Family, Shapes, Slab, owned_rest


class GPT2(Family):
    name = "gpt2"
    model_types = ("gpt2",)
    layers_path = "transformer.h"
    head_dim_in_config = False
    intermediate_key = "n_inner"

    def check(self, model: nn.Module) -> None:
        if getattr(model.config, "add_cross_attention", False):
            raise SearcherError("GPT-2 models with cross-attention are not decoder-only LMs")

    def intermediate(self, model: nn.Module) -> int:
        return model.config.n_inner or 4 * model.config.hidden_size

    def block(self, kind: str, shapes: Shapes, layer: nn.Module) -> BlockLayout:
        s = shapes
        if kind == "mlp":
            layer.get_submodule("mlp.c_fc")
            slabs = (
                Slab("mlp.c_fc.weight", 1, ((0, 1),), matmul=True),
                Slab("mlp.c_fc.bias", 0, ((0, 1),)),
                Slab("mlp.c_proj.weight", 0, ((0, 1),), matmul=True),
            )
            return BlockLayout("mlp", "mlp", s.intermediate, slabs, "mlp.c_proj",
                               owned_rest(layer, "mlp", slabs))  # fmt: skip
        layer.get_submodule("attn.c_attn")
        hd, e = s.head_dim, s.hidden
        segs = ((0, hd), (e, hd), (2 * e, hd))
        slabs = (
            Slab("attn.c_attn.weight", 1, segs, matmul=True),
            Slab("attn.c_attn.bias", 0, segs),
            Slab("attn.c_proj.weight", 0, ((0, hd),), matmul=True),
        )
        return BlockLayout("attn", "attn", s.kv_heads, slabs, "attn.c_proj",
                           owned_rest(layer, "attn", slabs))  # fmt: skip

    def resized(self, layer: nn.Module, block: BlockLayout, units: int, shapes: Shapes) -> None:
        if block.kind == "attn":
            attn = layer.get_submodule(block.name)
            attn.num_heads = units
            attn.split_size = units * shapes.head_dim  # where c_attn's output is split

    def lean(self, model: nn.Module) -> DecoderWeights:
        """Conv1D weights stored [in, out] (transposed here), fused c_attn with columns
        [q, k, v], biases everywhere, LayerNorms, a non-gated gelu_new MLP, learned absolute
        positions (wpe) added to the token embeddings, no rotary."""
        cfg, base = model.config, model.transformer
        hd = cfg.hidden_size // cfg.num_attention_heads
        style = Style(
            family="GPT-2", norm="layer", act=activation(cfg.activation_function, "GPT-2"),
            gated=False, rotary_dims=0, score_scale=None if cfg.scale_attn_weights else 1.0,
        )  # fmt: skip
        layers = []
        for i, block in enumerate(base.h):
            a, m = block.attn, block.mlp
            attn = mlp = None
            if live(a, "c_attn"):
                q, k, v = a.c_attn.weight.t().chunk(3)
                qb, kb, vb = a.c_attn.bias.chunk(3)
                norm, norm_bias = layer_norm(block.ln_1, cfg.hidden_size)
                # scale_attn_by_inverse_layer_idx: each layer's own score scale
                scale = None
                if cfg.scale_attn_by_inverse_layer_idx:
                    scale = (hd**-0.5 if cfg.scale_attn_weights else 1.0) / float(i + 1)
                attn = AttentionWeights(
                    norm, q, k, v, a.c_proj.weight.t(), hd, 1, q_bias=qb, k_bias=kb, v_bias=vb,
                    o_bias=a.c_proj.bias, norm_bias=norm_bias, scale=scale,
                )  # fmt: skip
            if live(m, "c_fc"):
                norm, norm_bias = layer_norm(block.ln_2, cfg.hidden_size)
                mlp = MLPWeights(
                    norm, None, m.c_fc.weight.t(), m.c_proj.weight.t(), norm_bias=norm_bias,
                    up_bias=m.c_fc.bias, down_bias=m.c_proj.bias,
                )  # fmt: skip
            layers.append((attn, mlp))
        final, final_bias = layer_norm(base.ln_f, cfg.hidden_size)
        return DecoderWeights(
            layers, float(cfg.layer_norm_epsilon), None, cfg.hidden_size, embed=base.wte.weight,
            final_norm=final, head=model.get_output_embeddings().weight, style=style,
            positions=base.wpe.weight, final_norm_bias=final_bias,
        )  # fmt: skip
