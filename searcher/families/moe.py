"""Mixture-of-experts decoders with Llama's attention: Mixtral, Qwen2-MoE (with its shared
expert), Qwen3-MoE and OLMoE, as transformers 5 holds them.

A MoE layer's ``mlp`` is a sparse block: a router (``mlp.gate``, a bare ``weight`` of one row
per expert, not an ``nn.Linear``) picks ``num_experts_per_tok`` of the routed experts for each
token, whose weights are fused 3-D tensors with the expert on axis 0:
``mlp.experts.gate_up_proj`` [experts, 2 * width, hidden] (gate rows, then up rows) and
``mlp.experts.down_proj`` [experts, hidden, width]. Qwen2-MoE adds a shared expert that every
token runs (``mlp.shared_expert``, a gated MLP of its own width, scaled by
``sigmoid(mlp.shared_expert_gate(x))``). Qwen2-MoE and Qwen3-MoE can keep a dense MLP in some
layers (``mlp_only_layers``, ``decoder_sparse_step``): those layers are Llama's.

Routing, as transformers computes it: softmax over the router's logits, the top k
probabilities, then divided by their sum where the family renormalises (Mixtral always;
Qwen2-MoE, Qwen3-MoE and OLMoE when ``norm_topk_prob``). Removing an expert removes its logit:
the softmax runs over the experts kept, top-k is at most the experts kept.

The block's units, for the cost model, are each routed expert's neurons; its experts are
described by ``Experts`` (``searcher.families.base``).

Alignment: transformers runs the experts with its ``grouped_mm`` kernel by default
(``torch._grouped_mm``, on the CPU and on CUDA), which refuses a matrix whose rows are not a
whole multiple of 16 bytes ("strides should be multiple of 16 bytes"): an expert's width and
the hidden size, times the element size, must be. The spaces therefore keep expert widths
that are multiples of ``EXPERT_WIDTH_MULTIPLE`` neurons, and ``check`` refuses, in one line,
a model whose own experts that kernel cannot run.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import nn

from searcher.errors import SearcherError
from searcher.families.base import BlockLayout, Experts, Shapes, Slab, get_tensor, linear_slabs
from searcher.families.llama import Llama, _has

EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts")
# torch._grouped_mm takes rows of whole multiples of this many bytes only
GROUPED_MM_ROW_BYTES = 16
# Expert widths the spaces keep are multiples of this many neurons: 16 bytes at 2-byte values
# (bfloat16, float16), so that a model pruned in float32 runs in half precision too (at float32,
# 4 would do).
EXPERT_WIDTH_MULTIPLE = GROUPED_MM_ROW_BYTES // 2


class Mixtral(Llama):
    name = "mixtral"
    model_types: ClassVar[tuple[str, ...]] = ("mixtral",)
    count_key: ClassVar[str] = "num_local_experts"  # the config key that counts experts
    always_renormalised: ClassVar[bool] = True
    note = "mixture of experts"

    def check(self, model: nn.Module) -> None:
        # With per-layer expert counts the auxiliary (load-balancing) loss cannot stack the
        # layers' router logits; it is a training loss, so a pruned model does not compute it.
        model.config.output_router_logits = False
        refuse_unaligned_experts(self, model)

    def block(self, kind: str, shapes: Shapes, layer: nn.Module) -> BlockLayout:
        if kind == "attn":
            return super().block(kind, shapes, layer)
        if not _has_experts(layer):  # a dense MLP layer, as wide as its config says
            width = getattr(layer.get_submodule("mlp"), "intermediate_size", shapes.intermediate)
            return super().block(kind, replace(shapes, intermediate=int(width)), layer)
        gate_up = "mlp.experts.gate_up_proj"
        down = "mlp.experts.down_proj"
        count, double, _ = get_tensor(layer, gate_up).shape
        width = double // 2
        slabs = (
            Slab(gate_up, 1, ((0, 1), (width, 1)), matmul=True),
            Slab(down, 2, ((0, 1),), matmul=True),
        )
        router = layer.get_submodule("mlp.gate")
        experts = Experts(
            count=router.weight.shape[0],
            top_k=int(router.top_k),
            renormalised=self.always_renormalised or bool(getattr(router, "norm_topk_prob", 0)),
            tensors=(gate_up, down),
            router=("mlp.gate.weight",),
            module="mlp.experts",
            gate="mlp.gate",
            down=down,
        )
        matmuls = ("mlp.gate.weight",)
        if _has(layer, "mlp.shared_expert.down_proj.weight"):  # Qwen2-MoE
            shared_width = get_tensor(layer, "mlp.shared_expert.down_proj.weight").shape[1]
            linears = ("gate_proj", "up_proj", "down_proj")
            matmuls += ("mlp.shared_expert_gate.weight",)
            if shared_width % width:  # no whole number of its neurons to a unit: kept whole
                matmuls += tuple(f"mlp.shared_expert.{n}.weight" for n in linears)
            else:  # shared_width / width of its neurons to a unit, pruned with the experts'
                each = ((0, shared_width // width),)
                slabs += linear_slabs(
                    "mlp.shared_expert", [(linears[0], each), (linears[1], each)],
                    (linears[2], each), layer,
                )  # fmt: skip
                experts = replace(experts, shared="mlp.shared_expert.down_proj")
        return BlockLayout(
            "mlp", "mlp", width, slabs, "mlp", matmuls=matmuls, experts=experts
        )  # fmt: skip

    def expert_hidden(self, experts: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
        """act(gate) * up of ``expert`` (its gate and up rows fused, gate first)."""
        return experts._apply_gate(nn.functional.linear(x, experts.gate_up_proj[expert]))

    def config_for(
        self, config: dict[str, Any], shapes: Shapes, groups: int, neurons: int,
        experts: int | None = None,
    ) -> dict[str, Any] | None:  # fmt: skip
        out = super().config_for(config, shapes, groups, neurons)
        if out is None or experts is None:
            return out
        shared, width = config.get("shared_expert_intermediate_size"), config[self.intermediate_key]
        if shared and shared % width == 0:  # pruned with the routed experts (else kept whole)
            out["shared_expert_intermediate_size"] = neurons * (shared // width)
        top_k = int(config["num_experts_per_tok"])
        # every key that counts experts (Qwen3-MoE's config has num_local_experts as well)
        counts = {k: experts for k in EXPERT_COUNT_KEYS if k in config or k == self.count_key}
        return {**out, **counts, "num_experts_per_tok": min(top_k, experts)}

    def lean(self, model: nn.Module) -> Any:
        raise SearcherError(
            f"latency tables and ONNX export do not support mixture-of-experts models (the "
            f"{self.name} family) yet: their lean decoder graph has no MoE block; search "
            "without --latency-device and export with --format pruned"
        )


class QwenMoe(Mixtral):
    """Qwen2-MoE (shared expert) and Qwen3-MoE (per-head q/k norms): Mixtral's experts, counted
    by ``num_experts``, ``moe_intermediate_size`` wide, renormalised per ``norm_topk_prob``."""

    name = "qwen_moe"
    model_types = ("qwen2_moe", "qwen3_moe")
    count_key = "num_experts"
    intermediate_key = "moe_intermediate_size"
    always_renormalised = False


class Olmoe(Mixtral):
    """OLMoE: q/k norms over all heads together (as OLMo2's), Mixtral's experts counted by
    ``num_experts``, renormalised per ``norm_topk_prob``."""

    name = "olmoe"
    model_types = ("olmoe",)
    count_key = "num_experts"
    always_renormalised = False
    # its q/k norms are sized from hidden_size, so a config with fewer heads cannot build them
    head_dim_in_config = False


def refuse_unaligned_experts(family: Mixtral, model: nn.Module) -> None:
    """Refuse, in one line, a model whose experts transformers' ``grouped_mm`` kernel (its
    default) cannot run in the model's dtype: an expert width or hidden size whose rows are not
    whole multiples of 16 bytes. Such a model fails in plain transformers as well, with a
    traceback from deep in its forward pass."""
    if getattr(model.config, "_experts_implementation", None) != "grouped_mm":
        return  # eager and batched_mm take any width
    hidden = int(model.config.hidden_size)
    for i, layer in enumerate(family.decoder_layers(model)):
        if not _has_experts(layer):
            continue
        t = get_tensor(layer, "mlp.experts.gate_up_proj")
        if t.device.type == "meta" or t.shape[0] == 0:
            continue  # a shell with no values to multiply
        width = t[0].numel() // (2 * hidden)  # [2 * width, hidden] or [hidden, 2 * width]
        size = t.element_size()
        if all(n * size % GROUPED_MM_ROW_BYTES == 0 for n in (width, hidden)):
            continue
        step, dtype = GROUPED_MM_ROW_BYTES // size, str(t.dtype).removeprefix("torch.")
        fits = all(n * 4 % GROUPED_MM_ROW_BYTES == 0 for n in (width, hidden))
        fix = (
            "load it in float32 (--dtype float32)"
            if fits
            else "no dtype fixes that, and plain transformers cannot run the model either"
        )
        raise SearcherError(
            f"this {family.name} model's experts (layer {i}: {width} neurons wide, hidden size "
            f"{hidden}) do not run in transformers' grouped_mm experts kernel in {dtype}: it "
            f"needs both to be multiples of {step} at {size}-byte values; {fix}"
        )


def _has_experts(layer: nn.Module) -> bool:
    return _has(layer, "mlp.experts.gate_up_proj")
