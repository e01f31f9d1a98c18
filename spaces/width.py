"""Width: per layer, how many MLP neurons and how many attention KV groups to keep.

Attention is pruned by whole KV groups (a KV head together with the query heads that share
it). That keeps grouped-query attention's uniform heads-per-KV ratio, which the model's
attention kernels assume, and it shrinks the K/V projections and the KV cache too. Pruning
query heads inside groups instead would leave groups of unequal size, which standard GQA
kernels cannot run. For multi-head attention (one query head per KV head) the two coincide.

Which neurons and groups go is fixed once per run by an activation-aware score (at the
block's output projection, e.g. Llama's down_proj / o_proj: mean |input| times the L2 norm of
the matching weight column, summed over the unit's features). The weights are then permuted,
once, so that every level keeps a prefix: applying a candidate points each layer at slices of
the full weights, with no copy (fused projections, whose units own several segments, gather
the kept rows instead). Which tensors a unit owns is the model family's business
(``searcher.families``).

In a mixture-of-experts block a unit is one neuron of every routed expert: each expert's
neurons are ranked by its own routed activations (so a level keeps each expert's own best),
and a shared expert's neurons, a whole multiple of an expert's width, go at the same share,
ranked by their own scores. Stacked expert weights are sliced into contiguous copies, and an
expert's width is a multiple of 8 neurons (``EXPERT_WIDTH_MULTIPLE``: the grid's widths
rounded to the nearest, repeats dropped), since transformers' grouped expert matmul takes
rows of whole multiples of 16 bytes only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from latency_models.table import CostTable
from searcher.families import BlockLayout, Slab
from searcher.families.base import in_axis
from searcher.families.moe import EXPERT_WIDTH_MULTIPLE
from spaces.base import Block, Gene, SearchSpace, block_tables, digest, refuse_mixed
from spaces.experts import Routing, routing_by_layer
from spaces.importance import input_statistics
from spaces.structure import Layer, Structure


class WidthSpace(SearchSpace):
    name = "width"

    def __init__(
        self,
        structure: Structure,
        seq_len: int,
        windows: torch.Tensor,
        batch_size: int = 4,
        mlp_steps: int = 16,
        mlp_min_steps: int = 1,
        attn_min_groups: int = 1,
    ) -> None:
        super().__init__(structure, seq_len)
        refuse_mixed(structure, self.name)
        s = structure
        if not 1 <= mlp_min_steps <= mlp_steps:
            raise ValueError("mlp_min_steps must lie in [1, mlp_steps]")
        self.mlp_steps, self.mlp_min_steps = mlp_steps, mlp_min_steps
        self.attn_min_groups = max(1, min(attn_min_groups, s.kv_heads))
        # MoE experts' widths on multiples of the experts kernel's alignment (see
        # searcher.families.moe): every level runs, in float32 and in half precision
        multiple = EXPERT_WIDTH_MULTIPLE if s.moe else 1
        self.mlp_sizes = mlp_levels(s.intermediate, mlp_steps, mlp_min_steps, multiple)
        self.group_counts = list(range(self.attn_min_groups, s.kv_heads + 1))
        genes = []
        for layer in s.layers:
            genes.append(
                Gene(
                    layer.name(layer.attn.name),
                    "attn",
                    tuple(g * s.group_size for g in self.group_counts),
                    tuple(g / s.kv_heads for g in self.group_counts),
                )
            )
            genes.append(
                Gene(
                    layer.name(layer.mlp.name),
                    "mlp",
                    tuple(self.mlp_sizes),
                    tuple(k / s.intermediate for k in self.mlp_sizes),
                )
            )
        self.widths = tuple(genes)  # the width levels, whatever genes a subclass searches
        self.genes = self.searched(self.widths)
        self._rank(windows, batch_size)
        self._applied: list[int | None] = [len(g.values) - 1 for g in self.widths]

    def searched(self, widths: tuple[Gene, ...]) -> tuple[Gene, ...]:
        """The genes the search sees, given each block's width levels: those levels here."""
        return widths

    def _rank(self, windows: torch.Tensor, batch_size: int) -> None:
        """Score neurons and KV groups on calibration tokens; permute so the best come first.
        A MoE block's neurons are ranked within each routed expert (and the shared expert's
        by their own score): a level keeps each expert's best neurons."""
        s = self.structure
        modules = {}
        for layer in s.layers:
            for block in (layer.attn, layer.mlp):
                path = block.experts.shared if block.experts else block.score
                if path:
                    modules[layer.name(path)] = layer.module.get_submodule(path)
        stats = input_statistics(s.model, modules, windows, batch_size)
        routing = self.routing(windows, batch_size)
        self.neuron_order: list[list[int] | dict[str, list]] = []
        self.group_order: list[list[int]] = []
        self._scores: list[tuple[list[float], list[float]]] = []  # (groups, neurons), sorted
        self._full: list[dict[str, torch.Tensor]] = []  # per layer: permuted slabs by path
        for layer in s.layers:
            full: dict[str, torch.Tensor] = {}
            scores, orders = [], []
            for block in (layer.attn, layer.mlp):
                with torch.no_grad():
                    if block.experts is not None:
                        score, order = _rank_experts_neurons(
                            layer, block, routing[layer.index], stats, full
                        )
                        scores.append(score)
                        orders.append(order)
                        continue
                    score = _unit_scores(layer, block, stats[layer.name(block.score)])
                    order = torch.argsort(score, descending=True, stable=True)
                    for slab in block.slabs:
                        t = layer.tensor(slab.tensor).detach()
                        rows = slab.indices(order.to(t.device), t.device)
                        full[slab.tensor] = t.index_select(slab.axis, rows).contiguous()
                scores.append(score[order].tolist())
                orders.append(order.tolist())
            for path, t in full.items():  # run on the permuted copy; free the original
                layer.set(path, t)
            self._full.append(full)
            self.group_order.append(orders[0])
            self.neuron_order.append(orders[1])
            self._scores.append((scores[0], scores[1]))

    def routing(self, windows: torch.Tensor, batch_size: int) -> dict[int, Routing]:
        """Calibration routing of each MoE layer (by layer index), for ranking neurons."""
        return routing_by_layer(self.structure, windows, batch_size)

    def apply(self, candidate: Sequence[int]) -> None:
        for gi, level in enumerate(candidate):
            self.resize(gi, level)

    def resize(self, gi: int, level: int) -> None:
        """Point gene ``gi``'s block at the first units its width ``level`` keeps."""
        if self._applied[gi] == level:
            return
        s = self.structure
        layer = s.layers[gi // 2]
        block = layer.attn if gi % 2 == 0 else layer.mlp
        units = self.group_counts[level] if gi % 2 == 0 else self.mlp_sizes[level]
        for slab in block.slabs:
            w = self.source(gi // 2, slab.tensor)
            if slab.is_prefix():  # a view: no copy
                w = w.narrow(slab.axis, 0, slab.size(units))
                # stacked expert weights whole (grouped matmul kernels want them so)
                layer.set(slab.tensor, w.contiguous() if w.dim() > 2 else w)
            else:  # fused segments: gather each segment's first units
                keep = slab.indices(range(units), w.device)
                layer.set(slab.tensor, w.index_select(slab.axis, keep))
        s.family.resized(layer.module, block, units, s.shapes)
        self._applied[gi] = level

    def source(self, layer: int, path: str) -> torch.Tensor:
        """The ranked full tensor a layer's block is sliced from."""
        return self._full[layer][path]

    def cost_tables(self) -> dict[str, CostTable]:
        levels = {"attn": self.group_counts, "mlp": self.mlp_sizes}
        order = [(g.kind, i // 2) for i, g in enumerate(self.genes)]
        return block_tables(self.structure, self.seq_len, levels, order)

    def blocks(self) -> tuple[list[Block], list[list[Block | None]]]:
        attn: list[Block | None] = [("attn", g) for g in self.group_counts]
        mlp: list[Block | None] = [("mlp", w) for w in self.mlp_sizes]
        return [], [attn if g.kind == "attn" else mlp for g in self.genes]

    def describe(self, candidate: Sequence[int]) -> dict[str, dict[str, Any]]:
        return {self.genes[gi].name: self.detail(gi, level) for gi, level in enumerate(candidate)}

    def detail(self, gi: int, level: int) -> dict[str, Any]:
        """What gene ``gi`` keeps at width ``level``: its shape and which units."""
        gene, i = self.widths[gi], gi // 2
        if gene.kind == "attn":
            groups = self.group_counts[level]
            return {
                "num_heads": groups * self.structure.group_size,
                "num_key_value_heads": groups,
                "keep": gene.keep[level],
                "kept_kv_groups": sorted(self.group_order[i][:groups]),
            }
        k = self.mlp_sizes[level]
        order = self.neuron_order[i]
        if isinstance(order, dict):  # a MoE block: each expert's own neurons
            out = {
                "intermediate_size": k,
                "keep": gene.keep[level],
                "kept_neurons": [sorted(o[:k]) for o in order["experts"]],
            }
            if order["shared"]:
                n = k * len(order["shared"]) // self.structure.intermediate
                out["shared_expert_intermediate_size"] = n
                out["kept_shared_neurons"] = sorted(order["shared"][:n])
            return out
        return {"intermediate_size": k, "keep": gene.keep[level], "kept_neurons": sorted(order[:k])}

    def priors(self) -> dict[str, Any]:
        """``unit_scores``: per gene, the activation-aware score of each unit (KV group or
        neuron), best first, the order in which levels keep them; ``units``: per gene and
        level, how many units the level keeps."""
        scores, units = [], []
        for gi, gene in enumerate(self.genes):
            groups, neurons = self._scores[gi // 2]
            attn = gene.kind == "attn"
            scores.append(groups if attn else neurons)
            units.append(list(self.group_counts) if attn else list(self.mlp_sizes))
        return {"unit_scores": scores, "units": units}

    def fingerprint(self) -> str:
        return digest(self.neuron_order, self.group_order)

    def options(self) -> dict[str, Any]:
        return {
            "mlp_steps": self.mlp_steps,
            "mlp_min_steps": self.mlp_min_steps,
            "attn_min_groups": self.attn_min_groups,
        }


def mlp_levels(full: int, steps: int, min_steps: int = 1, multiple: int = 1) -> list[int]:
    """The MLP widths of a grid of ``steps``: k / steps of ``full`` neurons, k from
    ``min_steps``, narrowest first. With ``multiple`` > 1 each is rounded to the nearest
    multiple of it (at least one multiple, at most ``full``) and repeats are dropped; ``full``
    itself stays a level, the dense model's width whatever its alignment."""
    widths = [max(1, round(full * k / steps)) for k in range(min_steps, steps + 1)]
    if multiple == 1:
        return widths  # (repeats too, where steps > full: as it always was for dense MLPs)
    top = full // multiple * multiple  # the widest aligned width up to full
    if top == 0:  # not one multiple fits: the dense width alone
        return [full]
    aligned = {
        w if w == full else min(top, max(multiple, multiple * round(w / multiple))) for w in widths
    }
    return sorted(aligned)


def _rank_experts_neurons(
    layer: Layer, block: BlockLayout, routing: Routing, stats: dict[str, dict[str, torch.Tensor]],
    full: dict[str, torch.Tensor],
) -> tuple[list[float], dict[str, list]]:  # fmt: skip
    """Rank a MoE block's neurons and fill ``full`` with its permuted slabs. Each routed
    expert's neuron j scores mean |routing weight * hidden activation j| (over all tokens: 0
    where not routed) times the L2 norm of the down projection's column j; each expert is
    permuted by its own scores, so unit u is every expert's u-th best neuron. The shared
    expert's neurons score as a dense MLP's, ``span`` of them to a unit. A unit's score (for
    allocation baselines) sums its neurons'. Returns the units' scores, best first, and the
    orders: per expert, and the shared expert's."""
    moe = block.experts
    assert moe is not None
    down = block.slab(moe.down)
    w = layer.tensor(moe.down).detach().double()
    column = w.norm(dim=({1, 2} - {down.axis}).pop())  # [experts, neurons]
    routed = routing.hidden.to(column) * column
    order = torch.argsort(routed, dim=1, descending=True, stable=True)
    unit = routed.gather(1, order).sum(0)
    shared = torch.empty(0, dtype=torch.long)
    if moe.shared:
        module = layer.module.get_submodule(moe.shared)
        feature = stats[layer.name(moe.shared)]["mean_abs"] * module.weight.double().norm(dim=0)
        shared = torch.argsort(feature.cpu(), descending=True, stable=True)
        unit = unit + feature.cpu()[shared].reshape(block.units, -1).sum(1).to(unit)
    for slab in block.slabs:
        t = layer.tensor(slab.tensor).detach()
        if slab.tensor in moe.tensors:  # [experts, ...]: each expert by its own order
            full[slab.tensor] = torch.stack([
                t[e].index_select(slab.axis - 1, slab.indices(o.to(t.device), t.device))
                for e, o in enumerate(order)
            ]).contiguous()  # fmt: skip
        else:
            rows = _neuron_rows(slab, shared.to(t.device))
            full[slab.tensor] = t.index_select(slab.axis, rows).contiguous()
    return unit.tolist(), {"experts": order.tolist(), "shared": shared.tolist()}


def _neuron_rows(slab: Slab, neurons: torch.Tensor) -> torch.Tensor:
    """Indices along a slab's axis of ``neurons`` (an order of every index of a segment: a
    shared expert's neurons, several to a unit)."""
    return torch.cat([off + neurons for off, _ in slab.segments])


def _unit_scores(layer: Layer, block: BlockLayout, stats: dict[str, torch.Tensor]):
    """Each unit's activation-aware score: over the features it feeds the block's output
    projection, mean |input| times the L2 norm of the weight's matching column (or row)."""
    module = layer.module.get_submodule(block.score)
    w = module.weight
    axis = in_axis(module)
    per_feature = stats["mean_abs"] * w.double().norm(dim=1 - axis)
    slab = block.score_slab
    total = 0
    for off, span in slab.segments:
        total = total + per_feature[off : off + block.units * span].reshape(block.units, span).sum(
            1
        )
    return total.cpu()
