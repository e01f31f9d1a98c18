"""Width: per layer, how many MLP neurons and how many attention KV groups to keep.

Attention is pruned by whole KV groups (a KV head together with the query heads that share
it). That keeps grouped-query attention's uniform heads-per-KV ratio, which the model's
attention kernels assume, and it shrinks the K/V projections and the KV cache too. Pruning
query heads inside groups instead would leave groups of unequal size, which standard GQA
kernels cannot run. For multi-head attention (one query head per KV head) the two coincide.

Which neurons and groups go is fixed once per run by an activation-aware score
(mean |input| of down_proj / o_proj times the L2 norm of the matching weight column). The
weights are then permuted, once, so that every level keeps a prefix: applying a candidate
points each layer at slices of the full weights, with no copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from latency_models.table import CostTable
from spaces.base import Block, Gene, SearchSpace, block_tables, digest, set_linear
from spaces.importance import input_statistics
from spaces.structure import Structure


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
                    f"{layer.prefix}.self_attn",
                    "attn",
                    tuple(g * s.group_size for g in self.group_counts),
                    tuple(g / s.kv_heads for g in self.group_counts),
                )
            )
            genes.append(
                Gene(
                    f"{layer.prefix}.mlp",
                    "mlp",
                    tuple(self.mlp_sizes),
                    tuple(k / s.intermediate for k in self.mlp_sizes),
                )
            )
        self.genes = tuple(genes)
        self._rank(windows, batch_size)
        self._applied: list[int | None] = list(self.dense())

    def _rank(self, windows: torch.Tensor, batch_size: int) -> None:
        """Score neurons and KV groups on calibration tokens; permute so the best come first."""
        s = self.structure
        modules = {}
        for layer in s.layers:
            modules[f"{layer.index}.down"] = layer.mlp.down_proj
            modules[f"{layer.index}.o"] = layer.attn.o_proj
        stats = input_statistics(s.model, modules, windows, batch_size)
        self.neuron_order: list[list[int]] = []
        self.group_order: list[list[int]] = []
        self._scores: list[tuple[list[float], list[float]]] = []  # (groups, neurons), sorted
        self._full: list[dict[str, tuple[torch.Tensor, torch.Tensor | None]]] = []
        span = s.group_size * s.head_dim
        for layer in s.layers:
            with torch.no_grad():
                down = layer.mlp.down_proj.weight
                neuron = stats[f"{layer.index}.down"]["mean_abs"] * down.double().norm(dim=0)
                o = layer.attn.o_proj.weight
                per_dim = stats[f"{layer.index}.o"]["mean_abs"] * o.double().norm(dim=0)
                group = per_dim.reshape(s.kv_heads, span).sum(1)
                n_order = torch.argsort(neuron, descending=True, stable=True).to(down.device)
                g_order = torch.argsort(group, descending=True, stable=True).to(o.device)
                q_rows = _expand(g_order, span)
                kv_rows = _expand(g_order, s.head_dim)
                full = {}
                for name, rows in (
                    ("gate_proj", n_order), ("up_proj", n_order),
                    ("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows),
                ):  # fmt: skip
                    lin = layer.linear(name)
                    bias = None if lin.bias is None else lin.bias[rows].contiguous()
                    full[name] = (lin.weight[rows].contiguous(), bias)
                for name, cols in (("down_proj", n_order), ("o_proj", q_rows)):
                    lin = layer.linear(name)
                    bias = None if lin.bias is None else lin.bias.detach()
                    full[name] = (lin.weight[:, cols].contiguous(), bias)
            for name, (w, b) in full.items():  # run on the permuted copy; free the original
                set_linear(layer.linear(name), w, b)
            self._full.append(full)
            self.neuron_order.append(n_order.tolist())
            self.group_order.append(g_order.tolist())
            self._scores.append((group[g_order.cpu()].tolist(), neuron[n_order.cpu()].tolist()))

    def apply(self, candidate: Sequence[int]) -> None:
        s = self.structure
        for gi, level in enumerate(candidate):
            if self._applied[gi] == level:
                continue
            layer, full = s.layers[gi // 2], self._full[gi // 2]
            if gi % 2 == 0:
                groups = self.group_counts[level]
                q = groups * s.group_size * s.head_dim
                kv = groups * s.head_dim
                for name, n in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                    w, b = full[name]
                    set_linear(layer.linear(name), w[:n], None if b is None else b[:n])
                w, b = full["o_proj"]
                set_linear(layer.linear("o_proj"), w[:, :q], b)
            else:
                k = self.mlp_sizes[level]
                for name in ("gate_proj", "up_proj"):
                    w, b = full[name]
                    set_linear(layer.linear(name), w[:k], None if b is None else b[:k])
                w, b = full["down_proj"]
                set_linear(layer.linear("down_proj"), w[:, :k], b)
            self._applied[gi] = level

    def cost_tables(self) -> dict[str, CostTable]:
        n = len(self.structure.layers)
        attn = [self.group_counts] * n
        mlp = [self.mlp_sizes] * n
        order = [(g.kind, i // 2) for i, g in enumerate(self.genes)]
        return block_tables(self.structure, self.seq_len, attn, mlp, order)

    def blocks(self) -> tuple[list[Block], list[list[Block | None]]]:
        attn: list[Block | None] = [("attn", g) for g in self.group_counts]
        mlp: list[Block | None] = [("mlp", w) for w in self.mlp_sizes]
        return [], [attn if g.kind == "attn" else mlp for g in self.genes]

    def describe(self, candidate: Sequence[int]) -> dict[str, dict[str, Any]]:
        s = self.structure
        out: dict[str, dict[str, Any]] = {}
        for gi, level in enumerate(candidate):
            gene, i = self.genes[gi], gi // 2
            if gene.kind == "attn":
                groups = self.group_counts[level]
                out[gene.name] = {
                    "num_heads": groups * s.group_size,
                    "num_key_value_heads": groups,
                    "keep": gene.keep[level],
                    "kept_kv_groups": sorted(self.group_order[i][:groups]),
                }
            else:
                k = self.mlp_sizes[level]
                out[gene.name] = {
                    "intermediate_size": k,
                    "keep": gene.keep[level],
                    "kept_neurons": sorted(self.neuron_order[i][:k]),
                }
        return out

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


def _expand(order: torch.Tensor, span: int) -> torch.Tensor:
    """Row indices of whole blocks of ``span`` rows, blocks taken in ``order``."""
    return (order[:, None] * span + torch.arange(span, device=order.device)[None, :]).reshape(-1)
