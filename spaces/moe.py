"""Width and expert counts in one genome, for mixture-of-experts models.

Each attention block is a gene as in the width space (KV groups kept). Each MoE block is one
gene over pairs (experts kept, neurons kept in each): the ``experts`` space's counts on a grid
of ``expert_steps`` (the experts ranked by routed contribution, as that space ranks them) by
the width space's neuron levels (each expert's neurons ranked by its own scores, the shared
expert's with them). One gene, not two, because a MoE block's cost is the product of its
two sizes (experts x neurons), which no sum of per-gene costs can say; its levels are the
pairs ordered by the share of the routed experts' weights they keep (ties: fewer experts
first), so a step down a level is a small cut of either kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from latency_models.table import CostTable
from searcher.errors import SearcherError
from spaces.base import Block, Gene, block_costs, cost_tables, dense_blocks, digest, fixed_costs
from spaces.experts import Routing, rank_experts, routing_by_layer
from spaces.structure import Structure
from spaces.width import WidthSpace


class MoeSpace(WidthSpace):
    name = "moe"
    latency_note = (
        "latency tables do not model mixture-of-experts blocks: every moe candidate has the "
        "dense model's latency here"
    )

    def __init__(
        self,
        structure: Structure,
        seq_len: int,
        windows: torch.Tensor,
        batch_size: int = 4,
        mlp_steps: int = 8,
        mlp_min_steps: int = 1,
        attn_min_groups: int = 1,
        expert_steps: int = 8,
        min_experts: int = 1,
    ) -> None:
        moe = structure.moe_layers
        if not moe:
            raise SearcherError(
                f"the moe space needs a mixture-of-experts model: this {structure.family.name} "
                "model routes no tokens to experts (use --space width)"
            )
        fewest = min(layer.mlp.experts.count for layer in moe)
        if expert_steps < 1 or not 1 <= min_experts <= fewest:
            raise ValueError(f"need expert_steps >= 1 and min_experts in [1, {fewest}]")
        self.expert_steps, self.min_experts = expert_steps, min_experts
        # experts first: ranked and permuted in place, so that the width space ranks each
        # expert's neurons in the experts' kept order
        self.expert_order: dict[int, list[int]] = {}
        # per layer, what only the expert count cuts: the router's rows, expert biases that
        # no neuron owns (gpt-oss's down projection's)
        self._by_count: dict[int, dict[str, torch.Tensor]] = {}
        self._ranked: dict[int, Routing] = {}
        routing = routing_by_layer(structure, windows, batch_size)  # one pass, all layers
        for layer in moe:
            r = routing[layer.index]
            best, full = rank_experts(layer, r.contribution)
            self.expert_order[layer.index] = best.tolist()
            sliced = {slab.tensor for slab in layer.mlp.slabs}
            self._by_count[layer.index] = {p: t for p, t in full.items() if p not in sliced}
            self._ranked[layer.index] = r.permuted(best)
        self._kept: dict[int, int] = {}  # layer index -> experts the model keeps now
        super().__init__(
            structure, seq_len, windows, batch_size, mlp_steps, mlp_min_steps, attn_min_groups
        )
        self._kept = {layer.index: layer.mlp.experts.count for layer in moe}

    def routing(self, windows: torch.Tensor, batch_size: int) -> dict[int, Routing]:
        return self._ranked  # measured once, in the experts' ranked order

    def searched(self, widths: tuple[Gene, ...]) -> tuple[Gene, ...]:
        genes = []
        self.pairs: dict[int, list[tuple[int, int]]] = {}  # gene -> (experts, width level)
        for gi, gene in enumerate(widths):
            moe = self.structure.layers[gi // 2].mlp.experts
            if gene.kind == "attn" or moe is None:
                genes.append(gene)
                continue
            total, steps = moe.count, self.expert_steps
            grid = (round(total * k / steps) for k in range(1, steps + 1))
            counts = sorted({max(self.min_experts, c) for c in grid})
            pairs = sorted(
                ((c, lv) for c in counts for lv in range(len(gene.values))),
                key=lambda p: (p[0] / total * gene.keep[p[1]], p[0]),
            )
            self.pairs[gi] = pairs
            genes.append(
                Gene(
                    gene.name,
                    gene.kind,
                    tuple((c, gene.values[lv]) for c, lv in pairs),
                    tuple(c / total * gene.keep[lv] for c, lv in pairs),
                )
            )
        return tuple(genes)

    def apply(self, candidate: Sequence[int]) -> None:
        for gi, level in enumerate(candidate):
            if gi in self.pairs:
                count, level = self.pairs[gi][level]
                self._keep_experts(gi, count)
            self.resize(gi, level)

    def _keep_experts(self, gi: int, count: int) -> None:
        """Cut MoE gene ``gi``'s layer to its first ``count`` experts (the router's rows now,
        the experts' neurons' tensors when its width is next sliced)."""
        layer = self.structure.layers[gi // 2]
        if self._kept[layer.index] == count:
            return
        for path, t in self._by_count[layer.index].items():
            layer.set(path, t[:count])
        self.structure.family.set_experts(layer.module, layer.mlp, count)
        self._kept[layer.index] = count
        self._applied[gi] = None  # the experts' tensors: slice them again

    def source(self, layer: int, path: str) -> torch.Tensor:
        full = super().source(layer, path)
        moe = self.structure.layers[layer].mlp.experts
        if moe is not None and path in moe.tensors and layer in self._kept:
            return full[: self._kept[layer]]
        return full

    def cost_tables(self) -> dict[str, CostTable]:
        s, rows = self.structure, []
        for gi, gene in enumerate(self.genes):
            layer = s.layers[gi // 2]
            if gi in self.pairs:
                rows.append([
                    block_costs(s, layer, "mlp", self.mlp_sizes[lv], self.seq_len, experts=c)
                    for c, lv in self.pairs[gi]
                ])  # fmt: skip
            else:
                units = self.group_counts if gene.kind == "attn" else self.mlp_sizes
                rows.append([block_costs(s, layer, gene.kind, u, self.seq_len) for u in units])
        return cost_tables(fixed_costs(s, self.seq_len), rows)

    def blocks(self) -> tuple[list[Block], list[list[Block | None]]]:
        return dense_blocks(self.structure), [[None] * len(g.values) for g in self.genes]

    def describe(self, candidate: Sequence[int]) -> dict[str, dict[str, Any]]:
        out = {}
        for gi, level in enumerate(candidate):
            if gi not in self.pairs:
                out[self.genes[gi].name] = self.detail(gi, level)
                continue
            count, width = self.pairs[gi][level]
            layer = self.structure.layers[gi // 2]
            detail = self.detail(gi, width)
            order = self.expert_order[layer.index]
            out[self.genes[gi].name] = {
                **detail,
                "keep": self.genes[gi].keep[level],
                "num_experts": count,
                "top_k": min(layer.mlp.experts.top_k, count),
                "kept_experts": sorted(order[:count]),
                # each kept expert's neurons, by its id in the dense model
                "kept_neurons": {str(order[e]): detail["kept_neurons"][e] for e in range(count)},
            }
        return out

    def priors(self) -> dict[str, Any]:
        return {}  # no allocation baseline reads (experts, width) pairs

    def fingerprint(self) -> str:
        return digest(self.neuron_order, self.group_order, self.expert_order)

    def options(self) -> dict[str, Any]:
        return {
            **super().options(),
            "expert_steps": self.expert_steps,
            "min_experts": self.min_experts,
        }
