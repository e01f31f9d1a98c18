"""OPT: ``model.decoder.layers[i].self_attn.{q,k,v,out}_proj`` with biases, and the MLP as
``fc1`` / ``fc2`` directly on the decoder layer (ReLU between), so removing the MLP replaces
both: ``fc1`` by an empty projection and ``fc2`` by zeros."""

from __future__ import annotations

from typing import Any

from torch import nn

from latency_models.graph import AttentionWeights, DecoderWeights, MLPWeights, Style
from latency_models.lean_parts import activation, layer_norm, live
from searcher.errors import SearcherError
from searcher.families.base import (
    BlockLayout,
    Dropped,
    Family,
    Shapes,
    is_removed,
    linear_block,
    linear_slabs,
)


class OPT(Family):
    name = "opt"
    model_types = ("opt",)
    layers_path = "model.decoder.layers"
    head_dim_in_config = False
    intermediate_key = "ffn_dim"

    def check(self, model: nn.Module) -> None:
        cfg = model.config
        if cfg.word_embed_proj_dim != cfg.hidden_size or not cfg.do_layer_norm_before:
            raise SearcherError(
                "OPT-350m's layout (projected embeddings, norms after the blocks) is not "
                "supported; other OPT sizes are"
            )

    def block(self, kind: str, shapes: Shapes, layer: nn.Module) -> BlockLayout:
        s = shapes
        if kind == "mlp":
            one = ((0, 1),)
            slabs = linear_slabs("", [("fc1", one)], ("fc2", one), layer)
            fc2_bias = ("fc2.bias",) if layer.fc2.bias is not None else ()
            return BlockLayout("mlp", "fc1", s.intermediate, slabs, "fc2", fc2_bias)
        head = ((0, s.head_dim),)
        outs = [("q_proj", head), ("k_proj", head), ("v_proj", head)]
        return linear_block("attn", "self_attn", s.kv_heads, outs, ("out_proj", head), layer)

    def resized(self, layer: nn.Module, block: BlockLayout, units: int, shapes: Shapes) -> None:
        if block.kind == "attn":
            layer.self_attn.num_heads = units

    def drop(self, layer: nn.Module, block: BlockLayout) -> Any:
        if block.kind == "attn":
            return super().drop(layer, block)
        original = (layer.fc1, layer.fc2)
        # fc1 gives no features; fc2 zeros of the residual's width
        layer.fc1 = Dropped("mlp", features=0)
        layer.fc2 = Dropped("mlp", features=layer.fc2.weight.shape[0])
        return original

    def restore(self, layer: nn.Module, block: BlockLayout, original: Any) -> None:
        if block.kind == "attn":
            super().restore(layer, block, original)
        else:
            layer.fc1, layer.fc2 = original

    def is_dropped(self, layer: nn.Module, block: BlockLayout) -> bool:
        if block.kind == "attn":
            return super().is_dropped(layer, block)
        return is_removed(layer.fc2)

    def lean(self, model: nn.Module) -> DecoderWeights:
        """q/k/v/out_proj with biases, LayerNorms, a ReLU MLP (fc1 / fc2 on the decoder layer
        itself), learned positions with OPT's offset of 2."""
        self.check(model)  # OPT-350m's layout would read here as another computation
        cfg, dec = model.config, model.model.decoder
        hd = cfg.hidden_size // cfg.num_attention_heads
        style = Style(
            family="OPT", norm="layer", act=activation(cfg.activation_function, "OPT"),
            gated=False, rotary_dims=0,
        )  # fmt: skip
        layers = []
        for block in dec.layers:
            a = block.self_attn
            attn = mlp = None
            if live(a, "q_proj"):
                norm, norm_bias = layer_norm(block.self_attn_layer_norm, cfg.hidden_size)
                attn = AttentionWeights(
                    norm, a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.out_proj.weight,
                    hd, 1, q_bias=a.q_proj.bias, k_bias=a.k_proj.bias, v_bias=a.v_proj.bias,
                    o_bias=a.out_proj.bias, norm_bias=norm_bias,
                )  # fmt: skip
            if live(block, "fc1"):
                norm, norm_bias = layer_norm(block.final_layer_norm, cfg.hidden_size)
                mlp = MLPWeights(
                    norm, None, block.fc1.weight, block.fc2.weight, norm_bias=norm_bias,
                    up_bias=block.fc1.bias, down_bias=block.fc2.bias,
                )  # fmt: skip
            layers.append((attn, mlp))
        final = final_bias = None
        if dec.final_layer_norm is not None:
            final, final_bias = layer_norm(dec.final_layer_norm, cfg.hidden_size)
        positions = dec.embed_positions.weight[dec.embed_positions.offset :]
        eps = dec.layers[0].self_attn_layer_norm.eps if len(dec.layers) else 1e-5
        return DecoderWeights(
            layers, float(eps), None, cfg.hidden_size, embed=dec.embed_tokens.weight,
            final_norm=final, head=model.get_output_embeddings().weight, style=style,
            positions=positions, final_norm_bias=final_bias,
        )  # fmt: skip
