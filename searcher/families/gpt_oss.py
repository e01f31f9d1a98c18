"""gpt-oss: Llama's attention with biases and a learned sink per query head, a MoE MLP of
transposed, interleaved stacked experts with biases, and a router with a bias.

- ``self_attn.sinks`` [heads]: one logit per query head, softmaxed with the scores; a KV group
  owns its query heads' sinks.
- ``mlp.router``: ``weight`` [experts, hidden] and ``bias`` [experts]; top-k on the logits,
  then a softmax over the k (the top-k probabilities renormalised).
- ``mlp.experts``: ``gate_up_proj`` [experts, hidden, 2 * width] with gate and up columns
  interleaved (neuron j owns columns 2j and 2j + 1), ``gate_up_proj_bias`` [experts,
  2 * width], ``down_proj`` [experts, width, hidden], ``down_proj_bias`` [experts, hidden];
  a clamped SwiGLU (the experts module's ``_apply_gate``).
- The MLP returns (output, router scores).

Published checkpoints hold the experts in MXFP4; transformers dequantises them on load
(``Mxfp4Config(dequantize=True)`` where its kernels are missing, as on a CPU).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from searcher.families.base import BlockLayout, Experts, Shapes, Slab, get_tensor
from searcher.families.moe import Mixtral, _has_experts


class GptOss(Mixtral):
    name = "gpt_oss"
    model_types = ("gpt_oss",)
    count_key = "num_local_experts"
    mlp_pair: ClassVar[bool] = True

    def block(self, kind: str, shapes: Shapes, layer: nn.Module) -> BlockLayout:
        if kind == "attn":
            attn = super().block(kind, shapes, layer)
            sinks = Slab("self_attn.sinks", 0, ((0, shapes.group_size),))
            owned = tuple(p for p in attn.owned if p != sinks.tensor)
            return BlockLayout(
                attn.kind, attn.name, attn.units, (*attn.slabs, sinks), attn.score, owned
            )  # fmt: skip
        if not _has_experts(layer):
            raise AttributeError("mlp.experts")  # a removed MLP
        e = "mlp.experts"
        gate_up, down = f"{e}.gate_up_proj", f"{e}.down_proj"
        count, _, double = get_tensor(layer, gate_up).shape
        width = double // 2
        pair, one = ((0, 2),), ((0, 1),)  # gate and up of a neuron side by side
        slabs = (
            Slab(gate_up, 2, pair, matmul=True),
            Slab(f"{gate_up}_bias", 1, pair),
            Slab(down, 1, one, matmul=True),
        )
        router = layer.get_submodule("mlp.router")
        experts = Experts(
            count=count,
            top_k=int(router.top_k),
            renormalised=True,  # softmax over the top k's logits
            tensors=(gate_up, f"{gate_up}_bias", down, f"{down}_bias"),
            router=("mlp.router.weight", "mlp.router.bias"),
            module=e,
            gate="mlp.router",
            down=down,
            transposed=True,
        )
        return BlockLayout(
            "mlp", "mlp", width, slabs, "mlp", owned=(f"{down}_bias", "mlp.router.bias"),
            matmuls=("mlp.router.weight",), experts=experts,
        )  # fmt: skip

    def expert_hidden(self, experts: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
        gate_up = x @ experts.gate_up_proj[expert] + experts.gate_up_proj_bias[expert]
        return experts._apply_gate(gate_up)
