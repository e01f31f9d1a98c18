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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from latency_models.table import CostTable
from searcher.families import BlockLayout
from searcher.families.base import in_axis
from spaces.base import Block, Gene, SearchSpace, block_tables, digest, refuse_moe
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
        refuse_moe(structure, self.name)
        s = structure
        if not 1 <= mlp_min_steps <= mlp_steps:
            raise ValueError("mlp_min_steps must lie in [1, mlp_steps]")
        self.mlp_steps, self.mlp_min_steps = mlp_steps, mlp_min_steps
        self.attn_min_groups = max(1, min(attn_min_groups, s.kv_heads))
        self.mlp_sizes = [
            max(1, round(s.intermediate * k / mlp_steps))
            for k in range(mlp_min_steps, mlp_steps + 1)
        ]
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
        """Score neurons and KV groups on calibration tokens; permute so the best come first."""
        s = self.structure
        modules = {
            layer.name(block.score): layer.module.get_submodule(block.score)
            for layer in s.layers
            for block in (layer.attn, layer.mlp)
        }
        stats = input_statistics(s.model, modules, windows, batch_size)
        self.neuron_order: list[list[int]] = []
        self.group_order: list[list[int]] = []
        self._scores: list[tuple[list[float], list[float]]] = []  # (groups, neurons), sorted
        self._full: list[dict[str, torch.Tensor]] = []  # per layer: permuted slabs by path
        for layer in s.layers:
            full: dict[str, torch.Tensor] = {}
            scores, orders = [], []
            for block in (layer.attn, layer.mlp):
                with torch.no_grad():
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

    def apply(self, candidate: Sequence[int]) -> None:
        for gi, level in enumerate(candidate):
            self.resize(gi, level)

    def resize(self, gi: int, level: int) -> None:
        """Point gene ``gi``'s block at the first units its width ``level`` keeps."""
        if self._applied[gi] == level:
            return
        s = self.structure
        layer, full = s.layers[gi // 2], self._full[gi // 2]
        block = layer.attn if gi % 2 == 0 else layer.mlp
        units = self.group_counts[level] if gi % 2 == 0 else self.mlp_sizes[level]
        for slab in block.slabs:
            w = full[slab.tensor]
            if slab.is_prefix():  # a view: no copy
                layer.set(slab.tensor, w.narrow(slab.axis, 0, slab.size(units)))
            else:  # fused segments: gather each segment's first units
                keep = slab.indices(range(units), w.device)
                layer.set(slab.tensor, w.index_select(slab.axis, keep))
        s.family.resized(layer.module, block, units, s.shapes)
        self._applied[gi] = level

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
        return {
            "intermediate_size": k,
            "keep": gene.keep[level],
            "kept_neurons": sorted(self.neuron_order[i][:k]),
        }

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
