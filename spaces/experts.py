"""Experts: per mixture-of-experts layer, how many of its routed experts to keep.

Which experts go is fixed once per run from calibration routing. The default order ranks a
layer's experts by their contribution: over the calibration tokens, the mean norm of what the
expert adds to the block's output, ``|| g_e(x) * E_e(x) ||`` (g_e the routing weight the
token gives it, 0 where the expert is not in its top k). That is exactly the norm of what
removing the expert takes from each token's output (before the router renormalises over the
rest), so it ranks an expert that is often routed but contributes little, or seldom routed
but large where it fires, by what it does. ``order="frequency"`` ranks by how often the
router picks an expert instead (the usual heuristic, for comparison).

The experts' tensors and the router's rows are permuted once so that every level keeps a
prefix (the model computes the same: routing is permutation-equivariant); applying a
candidate points each layer at the first experts (a view, no copy), and sets the router's
and the experts module's counts, with top-k at most the experts kept. The router then drops
the removed experts' logits: its softmax runs over the experts kept, so a token's top-k
experts are the same unless one of them was removed; where the family renormalises the
top-k weights (Mixtral; the others with ``norm_topk_prob``) such a token's output is exactly
the dense model's; without renormalisation its weights are divided by the probability mass
the kept experts hold (softmax over fewer logits).

Attention, dense MLP layers and shared experts are not touched by this space.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from latency_models.table import CostTable
from searcher.errors import SearcherError
from spaces.base import (
    Block,
    Gene,
    SearchSpace,
    block_costs,
    cost_tables,
    dense_blocks,
    digest,
    fixed_costs,
)
from spaces.importance import forward_batches
from spaces.structure import Layer, Structure

ORDERS = ("contribution", "frequency")


class ExpertsSpace(SearchSpace):
    name = "experts"
    latency_note = (
        "latency tables do not model mixture-of-experts blocks: every experts candidate has "
        "the dense model's latency here"
    )

    def __init__(
        self,
        structure: Structure,
        seq_len: int,
        windows: torch.Tensor,
        batch_size: int = 4,
        min_experts: int = 1,
        order: str = "contribution",
    ) -> None:
        super().__init__(structure, seq_len)
        self.moe_layers = structure.moe_layers
        if not self.moe_layers:
            raise SearcherError(
                f"the experts space needs a mixture-of-experts model: this "
                f"{structure.family.name} model routes no tokens to experts (use --space width)"
            )
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, not {order!r}")
        most = min(layer.mlp.experts.count for layer in self.moe_layers)
        if not 1 <= min_experts <= most:
            raise ValueError(
                f"min_experts must lie in [1, {most}] (the fewest experts a layer has)"
            )
        self.min_experts, self.order = min_experts, order
        self.counts: list[list[int]] = []
        genes = []
        for layer in self.moe_layers:
            total = layer.mlp.experts.count
            counts = list(range(min_experts, total + 1))
            self.counts.append(counts)
            name = layer.name(layer.mlp.experts.module)
            genes.append(Gene(name, "experts", tuple(counts), tuple(c / total for c in counts)))
        self.genes = tuple(genes)
        routing = routing_statistics(structure, self.moe_layers, windows, batch_size)
        self.expert_order: list[list[int]] = []
        self._full: list[dict[str, torch.Tensor]] = []
        self.routing: list[Routing] = []  # in the order the levels keep the experts
        for layer, r in zip(self.moe_layers, routing, strict=True):
            best, full = rank_experts(layer, getattr(r, order))
            self.expert_order.append(best.tolist())
            self._full.append(full)
            self.routing.append(r.permuted(best))
        self._applied = list(self.dense())

    def apply(self, candidate: Sequence[int]) -> None:
        s = self.structure
        for gi, level in enumerate(candidate):
            if self._applied[gi] == level:
                continue
            layer, count = self.moe_layers[gi], self.counts[gi][level]
            for path, t in self._full[gi].items():
                layer.set(path, t[:count])  # a prefix along axis 0: a view
            s.family.set_experts(layer.module, layer.mlp, count)
            self._applied[gi] = level

    def cost_tables(self) -> dict[str, CostTable]:
        s = self.structure
        fixed = fixed_costs(s, self.seq_len)  # flops, params, active_params (a MoE model)
        searched = {id(layer) for layer in self.moe_layers}
        for layer in s.layers:  # attention, and dense MLP layers: as they are
            kinds = ("attn",) if id(layer) in searched else ("attn", "mlp")
            for kind in kinds:
                for metric, value in zip(fixed, block_costs(s, layer, kind, None, self.seq_len)):
                    fixed[metric] += value
        rows = [
            [block_costs(s, layer, "mlp", None, self.seq_len, experts=c) for c in counts]
            for layer, counts in zip(self.moe_layers, self.counts, strict=True)
        ]
        return cost_tables(fixed, rows)

    def blocks(self) -> tuple[list[Block], list[list[Block | None]]]:
        return dense_blocks(self.structure), [[None] * len(g.values) for g in self.genes]

    def describe(self, candidate: Sequence[int]) -> dict[str, dict[str, Any]]:
        out = {}
        for gi, level in enumerate(candidate):
            layer, count = self.moe_layers[gi], self.counts[gi][level]
            out[self.genes[gi].name] = {
                "num_experts": count,
                "top_k": min(layer.mlp.experts.top_k, count),
                "keep": self.genes[gi].keep[level],
                "kept_experts": sorted(self.expert_order[gi][:count]),
            }
        return out

    def priors(self) -> dict[str, Any]:
        """``expert_frequency``: per gene, the share of calibration tokens the router sends to
        each expert, in the order the levels keep them; ``expert_contribution`` likewise, the
        mean norm of what each adds to the output; ``units``: per gene and level, the experts
        kept."""
        return {
            "expert_frequency": [r.frequency.tolist() for r in self.routing],
            "expert_contribution": [r.contribution.tolist() for r in self.routing],
            "units": [list(c) for c in self.counts],
        }

    def fingerprint(self) -> str:
        return digest(self.expert_order)

    def options(self) -> dict[str, Any]:
        return {"min_experts": self.min_experts, "order": self.order}


@dataclass
class Routing:
    """One MoE layer's calibration routing, per expert, each a mean over all tokens."""

    frequency: torch.Tensor  # [experts] the share of tokens whose top k include the expert
    contribution: torch.Tensor  # [experts] the norm of its routing weight times its output
    hidden: torch.Tensor  # [experts, width] |routing weight * hidden activation| per neuron
    # sums over the tokens routed to each expert (not means): for Wanda's input norms
    input_sq: torch.Tensor  # [experts, hidden size] squared inputs
    hidden_sq: torch.Tensor  # [experts, width] squared hidden activations

    def permuted(self, order: torch.Tensor) -> Routing:
        """The same, its experts in ``order``."""
        return Routing(*(getattr(self, f.name)[order] for f in fields(self)))


def routing_statistics(
    structure: Structure, layers: Sequence[Layer], windows: torch.Tensor, batch_size: int
) -> list[Routing]:
    """Per MoE layer, over the calibration tokens, each expert's ``Routing``: its output is
    computed by the layer's own experts module, run for that expert alone, its hidden
    activations by the family (``Family.expert_hidden``)."""
    family = structure.family
    found = [
        Routing(
            *(torch.zeros(shape, dtype=torch.float64) for shape in (e, e, (e, w), (e, h), (e, w)))
        )
        for e, w, h in ((ly.mlp.experts.count, ly.mlp.units, structure.hidden) for ly in layers)
    ]
    tokens = [0]

    def hook(i: int):
        def record(module, args, kwargs):
            x, index, weights = _routing_args(args, kwargs)
            stats = found[i]
            x = x.reshape(-1, x.shape[-1])
            for e in torch.unique(index).tolist():
                rows, slot = torch.where(index == e)
                alone = torch.zeros(len(rows), 1, dtype=index.dtype, device=index.device)
                out = module.forward(x[rows], alone + e, torch.ones_like(alone, dtype=x.dtype))
                g = weights[rows, slot].to(out.dtype)[:, None]
                stats.frequency[e] += len(rows)
                stats.contribution[e] += float((g * out).float().norm(dim=-1).sum())
                hidden = family.expert_hidden(module, e, x[rows]).double()
                stats.hidden[e] += (g.double() * hidden).abs().sum(0).cpu()
                stats.hidden_sq[e] += hidden.square().sum(0).cpu()
                stats.input_sq[e] += x[rows].double().square().sum(0).cpu()
            if i == 0:
                tokens[0] += x.shape[0]

        return record

    handles = [
        layer.module.get_submodule(layer.mlp.experts.module).register_forward_pre_hook(
            hook(i), with_kwargs=True
        )
        for i, layer in enumerate(layers)
    ]
    for _ in forward_batches(structure.model, windows, batch_size, handles):
        pass
    n = max(tokens[0], 1)
    return [
        Routing(r.frequency / n, r.contribution / n, r.hidden / n, r.input_sq, r.hidden_sq)
        for r in found
    ]


def routing_by_layer(
    structure: Structure, windows: torch.Tensor, batch_size: int
) -> dict[int, Routing]:
    """``routing_statistics`` of every MoE layer, by layer index (no pass without one)."""
    moe = structure.moe_layers
    found = routing_statistics(structure, moe, windows, batch_size) if moe else []
    return {layer.index: r for layer, r in zip(moe, found, strict=True)}


def rank_experts(layer: Layer, score: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Permute a MoE layer's experts (their tensors and the router's rows) best ``score``
    first, in place: the order, and the permuted tensors by path."""
    best = torch.argsort(score, descending=True, stable=True)
    moe = layer.mlp.experts
    full = {}
    for path in (*moe.tensors, *moe.router):
        t = layer.tensor(path).detach()
        full[path] = t.index_select(0, best.to(t.device)).contiguous()
        layer.set(path, full[path])
    return best, full


def _routing_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The experts module's (hidden states, top-k indices, top-k weights), however passed."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args) + [kwargs[n] for n in names[len(args) :] if n in kwargs]
    if len(values) < 3:
        raise SearcherError("cannot read the routing of this MoE model's experts module")
    return values[0], values[1], values[2]
