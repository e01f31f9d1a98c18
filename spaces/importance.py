"""Activation statistics of linear-layer inputs on calibration tokens, gathered in one pass."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


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
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for start in range(0, len(windows), batch_size):
                model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: {"mean_abs": s["abs"] / s["n"], "l2": s["sq"].sqrt()} for n, s in sums.items()}
