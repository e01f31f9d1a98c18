"""Phi-3 and Phi-4 (model type phi3): fused projections. ``qkv_proj`` holds every query head,
then the keys, then the values, so a KV group owns three segments of its rows; ``gate_up_proj``
holds the gate rows then the up rows, so a neuron owns two."""

from __future__ import annotations

from torch import nn

from latency_models.graph import AttentionWeights, DecoderWeights, MLPWeights, Style, rotary_of
from latency_models.lean_parts import activation, group_size, head_dim, live, rotary_dims
from searcher.export.modeling_searcher_pruned import LayerConfig
from searcher.families.base import BlockLayout, Family, Shapes, Slab, owned_rest


class Phi3(Family):
    name = "phi3"
    model_types = ("phi3",)

    def block(self, kind: str, shapes: Shapes, layer: nn.Module) -> BlockLayout:
        s = shapes
        if kind == "mlp":
            layer.get_submodule("mlp.gate_up_proj")
            slabs = (
                Slab("mlp.gate_up_proj.weight", 0, ((0, 1), (s.intermediate, 1)), matmul=True),
                Slab("mlp.down_proj.weight", 1, ((0, 1),), matmul=True),
            )
            return BlockLayout("mlp", "mlp", s.intermediate, slabs, "mlp.down_proj",
                               owned_rest(layer, "mlp", slabs))  # fmt: skip
        q = s.group_size * s.head_dim
        queries = s.heads * s.head_dim
        keys = queries + s.kv_heads * s.head_dim
        segs = ((0, q), (queries, s.head_dim), (keys, s.head_dim))
        slabs = (Slab("self_attn.qkv_proj.weight", 0, segs, matmul=True),)
        if layer.get_submodule("self_attn.qkv_proj").bias is not None:
            slabs += (Slab("self_attn.qkv_proj.bias", 0, segs),)
        slabs += (Slab("self_attn.o_proj.weight", 1, ((0, q),), matmul=True),)
        return BlockLayout("attn", "self_attn", s.kv_heads, slabs, "self_attn.o_proj",
                           owned_rest(layer, "self_attn", slabs))  # fmt: skip

    def resized(self, layer: nn.Module, block: BlockLayout, units: int, shapes: Shapes) -> None:
        if block.kind != "attn":
            return
        attn = layer.get_submodule(block.name)
        # Phi-3's attention finds where keys start in qkv from its config's head count, and
        # the config is shared by every layer: each layer gets its own view of it to say its
        # count, which reads the rest (the attention implementation) from the shared config
        shared = attn.config.shared if isinstance(attn.config, LayerConfig) else attn.config
        heads = units * shapes.group_size
        if heads == shared.num_attention_heads:
            attn.config = shared  # the dense count again: no view needed
        else:
            attn.config = LayerConfig(shared, num_attention_heads=heads)
        attn.num_key_value_heads = units

    def lean(self, model: nn.Module) -> DecoderWeights:
        """Llama's layout with fused projections, split here: qkv_proj rows are
        [q (groups * group_size heads), k (groups heads), v (groups heads)], gate_up_proj
        rows [gate, up]. Partial rotary where rope_parameters has partial_rotary_factor."""
        cfg, base = model.config, model.model
        hd, group = head_dim(cfg), group_size(cfg)
        act = activation(cfg.hidden_act, "Phi-3")
        style = Style(family="Phi-3", act=act, rotary_dims=rotary_dims(cfg, hd))
        layers = []
        for block in base.layers:
            a, m = block.self_attn, block.mlp
            attn = mlp = None
            if live(a, "qkv_proj"):
                w, b = a.qkv_proj.weight, a.qkv_proj.bias
                kv = w.shape[0] // (group + 2)  # rows of k (and of v)
                cuts = (group * kv, kv, kv)
                q, k, v = w.split(cuts)
                qb, kb, vb = (None, None, None) if b is None else b.split(cuts)
                attn = AttentionWeights(
                    block.input_layernorm.weight, q, k, v, a.o_proj.weight, hd, group,
                    q_bias=qb, k_bias=kb, v_bias=vb, o_bias=a.o_proj.bias,
                    sliding_window=getattr(cfg, "sliding_window", None),
                )  # fmt: skip
            if live(m, "gate_up_proj"):
                gate, up = m.gate_up_proj.weight.chunk(2)
                b = m.gate_up_proj.bias
                gb, ub = (None, None) if b is None else b.chunk(2)
                mlp = MLPWeights(
                    block.post_attention_layernorm.weight, gate, up, m.down_proj.weight,
                    gate_bias=gb, up_bias=ub, down_bias=m.down_proj.bias,
                )  # fmt: skip
            layers.append((attn, mlp))
        return DecoderWeights(
            layers, float(cfg.rms_norm_eps), rotary_of(model, base.rotary_emb, hd),
            cfg.hidden_size, embed=model.get_input_embeddings().weight, final_norm=base.norm.weight,
            head=model.get_output_embeddings().weight, style=style,
        )  # fmt: skip
