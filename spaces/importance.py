"""Activation statistics on calibration tokens, gathered in one pass: of linear-layer inputs
(width, sparsity), and of what each block adds to the residual stream (depth)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from spaces.structure import Structure


def input_statistics(
    model: nn.Module, modules: Mapping[str, nn.Linear], windows: torch.Tensor, batch_size: int
) -> dict[str, dict[str, torch.Tensor]]:
    """Per input feature of each module: mean |x| and the L2 norm of x over all tokens."""
    sums: dict[str, dict[str, torch.Tensor]] = {}

    def hook(name: str):
        def record(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            acc = sums.setdefault(
                name,
                {
                    "abs": torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device),
                    "sq": torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device),
                    "n": torch.zeros((), dtype=torch.float64, device=x.device),
                },
            )
            acc["abs"] += x.abs().sum(0).double()
            acc["sq"] += x.square().sum(0).double()
            acc["n"] += x.shape[0]

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    for _ in forward_batches(model, windows, batch_size, handles):
        pass
    return {n: {"mean_abs": s["abs"] / s["n"], "l2": s["sq"].sqrt()} for n, s in sums.items()}


def forward_batches(
    model: nn.Module, windows: torch.Tensor, batch_size: int, handles: list
) -> Iterator[None]:
    """Run the model over ``windows`` in batches (no gradients, no KV cache), yielding after
    each so that hooks' findings can be read; the hooks' ``handles`` are removed at the end,
    whatever happens."""
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for start in range(0, len(windows), batch_size):
                model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
                yield
    finally:
        for h in handles:
            h.remove()


def residual_ratios(structure: Structure, windows: torch.Tensor, batch_size: int) -> list[float]:
    """Per block (each layer's attention, then its MLP: the depth space's gene order), how
    much it changes the residual stream: the mean over tokens of the block output's norm over
    the norm of the stream it is added to (the layer's input for attention, that plus
    attention's output for the MLP; for parallel-residual families an approximation)."""
    found: dict[tuple[int, str], torch.Tensor] = {}
    sums = torch.zeros(len(structure.layers), 2, dtype=torch.float64)
    count = 0

    def summarise(i: int) -> None:
        """Add layer i's ratios once its input and both blocks' outputs are in, and let them
        go: one layer's activations are held at a time, not every layer's of a batch (24
        layers' three float32 copies were 0.15 GB for 4 x 128 tokens of a 1024-wide model)."""
        if all((i, k) in found for k in ("in", "attn", "mlp")):
            # per token (some families' MLPs see the tokens flattened)
            x, a, m = (
                found.pop((i, k)).reshape(-1, structure.hidden) for k in ("in", "attn", "mlp")
            )
            sums[i, 0] += (a.norm(dim=-1) / x.norm(dim=-1)).sum().double()
            sums[i, 1] += (m.norm(dim=-1) / (x + a).norm(dim=-1)).sum().double()

    def layer_input(i: int):
        def record(_module, args, kwargs):
            found[(i, "in")] = (args[0] if args else kwargs["hidden_states"]).detach().float()

        return record

    def block_output(i: int, kind: str):
        def record(_module, _args, output):
            out = output[0] if isinstance(output, tuple) else output
            found[(i, kind)] = out.detach().float()
            summarise(i)

        return record

    handles = []
    for layer in structure.layers:
        handles.append(
            layer.module.register_forward_pre_hook(layer_input(layer.index), with_kwargs=True)
        )
        for kind in ("attn", "mlp"):
            # the block's output projection: its output is what the block adds (before any
            # post-norm), in every family's layout
            module = layer.module.get_submodule(layer.block(kind).score)
            handles.append(module.register_forward_hook(block_output(layer.index, kind)))
    for start, _ in enumerate(forward_batches(structure.model, windows, batch_size, handles)):
        if found:
            raise RuntimeError(f"blocks of layers {sorted({i for i, _ in found})} did not run")
        ids = windows[start * batch_size : (start + 1) * batch_size]
        count += ids.numel()
    return (sums / max(count, 1)).flatten().tolist()
