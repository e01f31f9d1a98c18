"""Sparsity: per linear layer, an unstructured sparsity level on an EvoPress-style grid.

The mask is Wanda's: weights are ranked within each output row by |W_ij| * ||X_j||_2, with
||X_j|| the norm of input feature j over the calibration tokens, and a level of sparsity s
zeroes the ceil(s * in_features) lowest-ranked weights of every row (ties: the earlier column
first). Applying a candidate rewrites only the layers whose level changed, from dense values
read back from the model's checkpoint (``searcher.checkpoint``) where it holds exactly the
loaded weights, so the space holds no dense copy beside the model (a model built in memory
gets one). Nor does it hold a mask: per row and level it keeps the highest score that level
zeroes (and, for the rare rows where equal scores straddle that cut, how many of them go),
and a mask is the dense values' scores above that cut (``_kept``). That is 8 bytes a row per
level (80 on the default grid of 10 levels), where the masks kept before took half a byte a
weight (512 bytes for a row of 1024; 0.25x of bfloat16 weights).

Unstructured zeros do not make dense kernels faster, so FLOPs are reported as dense; what the
budget limits is the kept ("nonzero") share of the prunable weights (``sparsity=R`` means at
least R of them are zero) or the whole model's parameters.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from latency_models.table import CostTable
from searcher.checkpoint import CheckpointTensors
from searcher.families.base import in_axis
from searcher.heap import release_free
from spaces.base import (
    Block,
    Gene,
    SearchSpace,
    block_costs,
    dense_blocks,
    fixed_costs,
)
from spaces.experts import routing_by_layer
from spaces.importance import input_statistics
from spaces.structure import Structure

log = logging.getLogger(__name__)

OWL_M = 5.0  # OWL's outlier threshold: a score above M times the layer's mean (paper default)


class SparsitySpace(SearchSpace):
    name = "sparsity"
    latency_note = (
        "unstructured sparsity runs on dense kernels (ONNX Runtime and torch alike), so every "
        "sparsity candidate has the dense model's latency"
    )

    def __init__(
        self,
        structure: Structure,
        seq_len: int,
        windows: torch.Tensor,
        batch_size: int = 4,
        step: float = 0.1,
        max_sparsity: float = 0.9,
    ) -> None:
        super().__init__(structure, seq_len)
        if not 0 < step <= max_sparsity < 1:
            raise ValueError("need 0 < step <= max_sparsity < 1")
        n = int(max_sparsity / step + 1e-9)
        self.step, self.max_sparsity = step, max_sparsity
        self.sparsities = tuple(round(step * k, 6) for k in range(n, -1, -1))
        # every matmul weight of every block, as (layer, path relative to the layer): a
        # module's (nn.Linear, Conv1D), or a MoE's stacked experts' weight [experts, out, in],
        # whose rows are every expert's output rows (the router is not pruned)
        self.linears = [
            (layer, slab.tensor.removesuffix(".weight"))
            for layer in structure.layers
            for block in (layer.attn, layer.mlp)
            for slab in block.slabs
            if slab.matmul
        ]
        self.genes = tuple(
            Gene(
                layer.name(p),
                "linear",
                self.sparsities,
                tuple(1.0 - x for x in self.sparsities),
            )  # fmt: skip
            for layer, p in self.linears
        )
        stats = self._statistics(windows, batch_size)
        checkpoint = CheckpointTensors.of(structure.model)
        self._shapes: list[tuple[int, int]] = []  # [out, in] of each gene's weight
        # per gene, what its masks are computed from: the input norms, per level and row the
        # highest score the level zeroes ([levels, out], float64), and per level the rows
        # where the scores tied at that cut are not all zeroed: (rows, how many of them go)
        self._norms = [stats[g.name] for g in self.genes]
        self._cuts: list[torch.Tensor] = []
        self._ties: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = []
        # dense values: read back from the checkpoint where it holds exactly the loaded
        # weight, else a resident copy
        self._stored: list[str | None] = []
        self._copies: dict[int, torch.Tensor] = {}
        self._checkpoint = checkpoint
        self._outliers: list[float] = []  # OWL's outlier ratio of each gene's decoder layer
        fingerprint = hashlib.sha256()
        total, count, first = 0.0, 0, 0  # the current decoder layer's scores so far
        for gi, (layer, _) in enumerate(self.linears):
            w = self._rows(gi)
            score = self._score(gi, stats)
            total, count = total + float(score.sum()), count + score.numel()
            order = torch.argsort(score, dim=1, stable=True)
            fingerprint.update(_ranks(order).cpu().numpy().tobytes())
            self._shapes.append((w.shape[0], w.shape[1]))
            zeroed = [self._zeroed(gi, level) for level in range(len(self.sparsities))]
            cuts, ties = _cuts(score, order, zeroed)
            self._cuts.append(cuts)
            self._ties.append(ties)
            del score, order
            self._stored.append(_stored_name(checkpoint, self._name(gi), self._weight(gi)))
            if self._stored[-1] is None:
                self._copies[gi] = w.clone()
            if gi + 1 == len(self.linears) or self.linears[gi + 1][0] is not layer:
                # OWL's outlier ratio over all the layer's projections, one at a time (the
                # scores again, not kept: a layer's scores in float64 are twice its weights)
                bar = OWL_M * total / count
                above = sum(int((self._score(g, stats) > bar).sum()) for g in range(first, gi + 1))
                self._outliers += [above / count] * (gi + 1 - first)
                total, count, first = 0.0, 0, gi + 1
            # this weight's freed scores, ranks and checkpoint read back to the system, or the
            # heap grows by some of them each weight (searcher.heap)
            release_free()
        self._fingerprint = fingerprint.hexdigest()[:16]
        if self._copies:
            log.info(
                "sparsity space: %d of %d weights kept as a dense copy (not in the checkpoint "
                "as loaded)", len(self._copies), len(self.linears),
            )  # fmt: skip
        self._applied = list(self.dense())

    def _experts(self, gi: int) -> int:
        """Experts stacked in gene gi's weight (0: an ordinary matmul weight)."""
        layer, p = self.linears[gi]
        moe = layer.mlp.experts
        return moe.count if moe is not None and p in moe.tensors else 0

    def _weight(self, gi: int) -> torch.Tensor:
        """Gene gi's weight as the model holds it."""
        layer, p = self.linears[gi]
        return layer.tensor(p if self._experts(gi) else f"{p}.weight").detach()

    def _rows(self, gi: int) -> torch.Tensor:
        """Gene gi's weight as [out, in] rows: a view of the model's tensor, or for stacked
        experts held [experts, in, out] (gpt-oss) a copy (``_write`` puts rows back)."""
        layer, p = self.linears[gi]
        if self._experts(gi):
            return _stacked_rows(self._weight(gi), layer.mlp.experts.transposed)
        return _rows_out(layer.module.get_submodule(p)).detach()

    def _write(self, gi: int, dense: torch.Tensor, keep: torch.Tensor) -> None:
        """Set gene gi's weight to ``dense`` rows where ``keep``, zero elsewhere."""
        layer = self.linears[gi][0]
        if self._experts(gi) and layer.mlp.experts.transposed:
            t = self._weight(gi)
            t.copy_((dense * keep).view(t.shape[0], t.shape[2], t.shape[1]).transpose(1, 2))
        else:
            torch.mul(dense, keep, out=self._rows(gi))

    def _name(self, gi: int) -> str:
        """Gene gi's weight's name in the model."""
        layer, p = self.linears[gi]
        return layer.name(p if self._experts(gi) else f"{p}.weight")

    def weight_names(self) -> list[str]:
        """The names, in the model, of the weights this space masks (one per gene)."""
        return [self._name(gi) for gi in range(len(self.linears))]

    def _statistics(self, windows: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
        """Per gene (by name), the L2 norm of each input feature over the calibration tokens
        ([in]; [experts, in] for stacked experts: over the tokens routed to each expert)."""
        s = self.structure
        plain = [gi for gi in range(len(self.linears)) if not self._experts(gi)]
        modules = {
            self.genes[gi].name: self.linears[gi][0].module.get_submodule(self.linears[gi][1])
            for gi in plain
        }
        found = input_statistics(s.model, modules, windows, batch_size)
        out = {name: stats["l2"] for name, stats in found.items()}
        routing = routing_by_layer(s, windows, batch_size)
        for gi in range(len(self.linears)):
            if self._experts(gi):
                layer, p = self.linears[gi]
                r = routing[layer.index]
                sq = r.hidden_sq if p == layer.mlp.experts.down else r.input_sq
                out[self.genes[gi].name] = sq.sqrt()
        return out

    def _score(self, gi: int, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Wanda's score of each weight of gene gi, [out, in], in float64."""
        w = self._rows(gi)
        l2 = stats[self.genes[gi].name].to(w.device)
        # stacked experts: each expert's rows by the norms of its own inputs
        l2 = l2.repeat_interleave(w.shape[0] // len(l2), 0) if l2.dim() == 2 else l2[None, :]
        return w.abs().double() * l2

    def _keep(self, gi: int, dense: torch.Tensor, level: int) -> torch.Tensor:
        """Gene gi's mask at ``level`` from its dense rows: False at the ``_zeroed`` lowest
        Wanda scores of each row, ties broken by the earlier column (the same bytes as
        ranking each row, ``_row_ranks``, and zeroing the lowest ranks)."""
        if self._zeroed(gi, level) == 0:
            return torch.ones(dense.shape, dtype=torch.bool, device=dense.device)
        cut = self._cuts[gi][level].to(dense.device)
        return _kept(dense, self._norms[gi], cut, self._ties[gi].get(level))

    def _dense(self, gi: int) -> torch.Tensor:
        """Gene gi's dense weight as [out, in], on the model's device and in its dtype."""
        if gi in self._copies:
            return self._copies[gi]
        layer, p = self.linears[gi]
        stored = self._checkpoint.read(self._stored[gi])
        if self._experts(gi):
            dense = _stacked_rows(stored, layer.mlp.experts.transposed)
        else:
            dense = stored if in_axis(layer.module.get_submodule(p)) == 1 else stored.t()
        w = self._rows(gi)
        return dense.to(device=w.device, dtype=w.dtype)

    def _zeroed(self, gi: int, level: int) -> int:
        """Weights zeroed per output row of gene gi's linear at this level: rounded up, so
        that a level of s zeroes at least s of every row and ``sparsity=s`` admits it."""
        in_features = self._shapes[gi][1]
        return math.ceil(self.sparsities[level] * in_features - 1e-9)

    def row_zeros(self, gi: int, level: int) -> tuple[int, int]:
        """Gene gi's linear: (its input features, the weights zeroed per row at ``level``)."""
        return self._shapes[gi][1], self._zeroed(gi, level)

    def apply(self, candidate: Sequence[int]) -> None:
        with torch.no_grad():
            for gi, level in enumerate(candidate):
                if self._applied[gi] == level:
                    continue
                dense = self._dense(gi)
                self._write(gi, dense, self._keep(gi, dense, level))
                self._applied[gi] = level

    def cost_tables(self) -> dict[str, CostTable]:
        s = self.structure
        fixed = fixed_costs(s, self.seq_len)
        dense = [
            block_costs(s, layer, kind, None, self.seq_len)
            for layer in s.layers
            for kind in ("attn", "mlp")
        ]
        flops = fixed["flops"] + sum(f for f, _, _ in dense)
        # what a block holds besides its matmul weights (biases, norms, a MoE router) stays
        # dense
        others = sum(p for _, p, _ in dense) - sum(r * c for r, c in self._shapes)
        nonzero, active = [], []
        for gi in range(len(self.genes)):
            rows, cols = self._shapes[gi]
            kept = [rows * (cols - self._zeroed(gi, lv)) for lv in range(len(self.sparsities))]
            nonzero.append(kept)
            # stacked experts: a token uses its top k's (every expert has as many nonzeros)
            experts = self._experts(gi)
            runs = min(self.linears[gi][0].mlp.experts.top_k, experts) if experts else 0
            active.append([n // experts * runs for n in kept] if experts else kept)
        zeros = [[0.0] * len(self.sparsities) for _ in self.genes]
        tables = {
            "flops": CostTable.build("flops", flops, zeros),
            "params": CostTable.build("params", fixed["params"] + others, nonzero),
            "nonzero": CostTable.build("nonzero", 0.0, nonzero),
        }
        if "active_params" in fixed:
            full = sum(a[-1] for a in active)  # the genes' weights dense, as used per token
            rest = fixed["active_params"] + sum(a for _, _, a in dense) - full
            tables["active_params"] = CostTable.build("active_params", rest, active)
        return tables

    def blocks(self) -> tuple[list[Block], list[list[Block | None]]]:
        return dense_blocks(self.structure), [[None] * len(g.values) for g in self.genes]

    def describe(self, candidate: Sequence[int]) -> dict[str, dict[str, Any]]:
        return {g.name: {"sparsity": g.values[lv]} for g, lv in zip(self.genes, candidate)}

    def priors(self) -> dict[str, Any]:
        """``outlier_ratio``: per gene, the share of its decoder layer's weights whose Wanda
        score exceeds ``OWL_M`` times the layer's mean score (OWL's layerwise outlier
        distribution, computed over all the layer's projections together)."""
        return {"outlier_ratio": list(self._outliers)}

    def fingerprint(self) -> str:
        return self._fingerprint  # digest(*ranks), hashed one weight at a time

    def options(self) -> dict[str, Any]:
        return {"step": self.step, "max_sparsity": self.max_sparsity}


def _cuts(
    score: torch.Tensor, order: torch.Tensor, zeroed: Sequence[int]
) -> tuple[torch.Tensor, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Per level (zeroing ``zeroed[level]`` weights a row) and row of ``score`` ([out, in],
    ``order`` its stable argsort per row): the highest score zeroed ([levels, out]; -inf
    where none is), and, for the levels where some row's next score equals it (ties that
    the cut splits, which the stable order zeroes from the earlier column), those rows and
    how many of the scores equal to the cut are zeroed."""
    cuts = torch.full((len(zeroed), score.shape[0]), -math.inf, dtype=score.dtype)
    ties: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for level, k in enumerate(zeroed):
        if k == 0:
            continue
        cut = score.gather(1, order[:, k - 1 : k])
        cuts[level] = cut[:, 0].cpu()
        if k == score.shape[1]:
            continue
        split = (score.gather(1, order[:, k : k + 1]) == cut)[:, 0].nonzero()[:, 0]
        if len(split):
            below = (score[split] < cut[split]).sum(1)
            ties[level] = (split, k - below)
    return cuts, ties


def _kept(
    dense: torch.Tensor,
    l2: torch.Tensor,
    cut: torch.Tensor,
    ties: tuple[torch.Tensor, torch.Tensor] | None,
    block: int = 1 << 18,
) -> torch.Tensor:
    """The mask keeping the weights of ``dense`` ([out, in]) whose Wanda score |W_ij| *
    ||X_j|| (``l2`` [in], or [experts, in] for stacked experts, whose rows are each expert's
    in turn) is above their row's ``cut``; in the rows ``ties`` names, the scores equal to
    the cut beyond the first ``short`` are kept too. Scores exist in float64 (as ranked) for
    about ``block`` weights at a time: small enough to stay in cache, several times faster
    than scoring a large weight at once."""
    rows, cols = dense.shape
    keep = torch.empty(dense.shape, dtype=torch.bool, device=dense.device)
    l2 = l2.to(dense.device)
    per = rows // len(l2) if l2.dim() == 2 else 0  # rows of each expert

    def scores(index: torch.Tensor | slice) -> torch.Tensor:
        s = dense[index].double()
        s.abs_()
        if not per:
            return s.mul_(l2)
        at = torch.arange(rows, device=dense.device)[index]
        return s.mul_(l2[at // per])

    step = max(1, block // cols)
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        torch.gt(scores(slice(r0, r1)), cut[r0:r1, None], out=keep[r0:r1])
    if ties is not None:
        split, short = ties
        for i in range(0, len(split), step):
            at, n = split[i : i + step].to(dense.device), short[i : i + step, None].to(dense.device)
            s, c = scores(at), cut[at, None]
            tied = s == c
            keep[at] = ~((s < c) | (tied & (tied.cumsum(1) <= n)))
    return keep


def _row_ranks(score: torch.Tensor) -> torch.Tensor:
    """Each weight's rank within its row by score (ties: the earlier column first)."""
    return _ranks(torch.argsort(score, dim=1, stable=True))


def _ranks(order: torch.Tensor) -> torch.Tensor:
    """Each weight's rank within its row from the row's (stable) argsort ``order``."""
    rank_dtype = torch.int16 if order.shape[1] < 2**15 else torch.int32
    rank = torch.empty_like(order, dtype=rank_dtype)
    cols = torch.arange(order.shape[1], device=order.device, dtype=rank_dtype)
    rank.scatter_(1, order, cols.expand_as(order).contiguous())
    return rank


def _stored_name(checkpoint: CheckpointTensors | None, name: str, w: torch.Tensor) -> str | None:
    """The checkpoint's name for the weight ``w`` (``name`` in the model) where the checkpoint
    holds exactly the loaded values, else None."""
    if checkpoint is None:
        return None
    for key in (name, name.split(".", 1)[-1]):  # GPT-2's files omit "transformer."
        if key not in checkpoint:
            continue
        stored = checkpoint.read(key)
        if stored.shape == w.shape and torch.equal(stored.to(w.device, w.dtype), w.detach()):
            return key
    return None


def _stacked_rows(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Stacked experts' weight [experts, out, in] (or [experts, in, out], ``transposed``) as
    [experts * out, in] rows: a view, or for the transposed layout a copy."""
    if transposed:
        return t.transpose(1, 2).reshape(-1, t.shape[1])
    return t.view(-1, t.shape[-1])


def _rows_out(module: nn.Module) -> torch.Tensor:
    """A matmul weight as [out, in] (a transposed view of GPT-2's Conv1D [in, out])."""
    return module.weight if in_axis(module) == 1 else module.weight.t()
