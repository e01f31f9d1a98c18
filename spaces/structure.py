"""Where the prunable parts of a decoder-only transformer live, and their shapes.

Supports the Llama layout (Llama, Mistral, Qwen2, Qwen3, SmolLM and kin): ``model.layers[i]``
with ``self_attn.{q,k,v,o}_proj`` and a gated ``mlp.{gate,up,down}_proj``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from searcher.errors import SearcherError

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclass
class Layer:
    index: int
    prefix: str  # module name of the decoder layer, e.g. "model.layers.3"
    block: nn.Module
    attn: nn.Module
    mlp: nn.Module

    def linear(self, name: str) -> nn.Linear:
        owner = self.attn if name in ATTN_PROJ else self.mlp
        return getattr(owner, name)

    def linear_name(self, name: str) -> str:
        owner = "self_attn" if name in ATTN_PROJ else "mlp"
        return f"{self.prefix}.{owner}.{name}"


@dataclass
class Structure:
    """The model and the shapes every space and cost model needs."""

    model: nn.Module
    layers: list[Layer]
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads

    @classmethod
    def of(cls, model: nn.Module) -> Structure:
        cfg = getattr(model, "config", None)
        base = getattr(model, "model", None)
        blocks = getattr(base, "layers", None)
        if cfg is None or blocks is None or not len(blocks):
            raise SearcherError(
                f"unsupported model {type(model).__name__}: searcher needs a decoder-only causal "
                "LM with the Llama layout (model.layers[i].self_attn / .mlp), such as Llama, "
                "Mistral, Qwen2 or SmolLM"
            )
        layers = []
        for i, block in enumerate(blocks):
            attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
            ok = attn is not None and mlp is not None
            ok = ok and all(isinstance(getattr(attn, n, None), nn.Linear) for n in ATTN_PROJ)
            ok = ok and all(isinstance(getattr(mlp, n, None), nn.Linear) for n in MLP_PROJ)
            if not ok:
                raise SearcherError(
                    f"unsupported layer layout in {type(model).__name__} layer {i}: expected "
                    "self_attn.{q,k,v,o}_proj and a gated mlp.{gate,up,down}_proj"
                )
            layers.append(Layer(i, f"model.layers.{i}", block, attn, mlp))
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        return cls(
            model=model,
            layers=layers,
            hidden=cfg.hidden_size,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate=cfg.intermediate_size,
            vocab=model.get_output_embeddings().weight.shape[0],
            tied=tied,
        )

    def fixed_params(self) -> int:
        """Parameters no space prunes: embeddings, LM head (unless tied), norms."""
        prunable = {
            id(layer.linear(n).weight) for layer in self.layers for n in ATTN_PROJ + MLP_PROJ
        }
        prunable |= {
            id(layer.linear(n).bias)
            for layer in self.layers
            for n in ATTN_PROJ + MLP_PROJ
            if layer.linear(n).bias is not None
        }
        return sum(p.numel() for p in self.model.parameters() if id(p) not in prunable)
