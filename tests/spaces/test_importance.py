"""Depth's residual-ratio prior: each layer summarised as its blocks run."""

from __future__ import annotations

import pytest
import torch

import spaces
from spaces.importance import residual_ratios
from tests.helpers import random_windows, tiny_model


def direct_ratios(structure: spaces.Structure, windows: torch.Tensor) -> list[float]:
    """The ratios from float64 copies of each layer's input and block outputs, taken as they
    are computed, over one forward pass of all ``windows``."""
    seen: dict[tuple[int, str], torch.Tensor] = {}

    def keep(key: tuple[int, str], t) -> None:
        seen[key] = (t[0] if isinstance(t, tuple) else t).detach().double().clone()

    handles = []
    for layer in structure.layers:
        i = layer.index
        handles.append(
            layer.module.register_forward_pre_hook(
                lambda _m, a, kw, i=i: keep((i, "in"), a[0] if a else kw["hidden_states"]),
                with_kwargs=True,
            )
        )
        for kind in ("attn", "mlp"):
            module = layer.module.get_submodule(layer.block(kind).score)
            handles.append(
                module.register_forward_hook(lambda _m, _a, o, key=(i, kind): keep(key, o))
            )
    try:
        with torch.inference_mode():
            structure.model(input_ids=windows, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = []
    for i in range(len(structure.layers)):
        x, a, m = (seen[(i, k)].reshape(-1, structure.hidden) for k in ("in", "attn", "mlp"))
        out += [
            float((a.norm(dim=-1) / x.norm(dim=-1)).mean()),
            float((m.norm(dim=-1) / (x + a).norm(dim=-1)).mean()),
        ]
    return out


@pytest.mark.parametrize("kind", ["llama", "falcon"])
def test_residual_ratios_are_read_as_each_layer_runs(kind: str) -> None:
    """Falcon adds attention's output into the MLP's output in place after the MLP's hook has
    fired: a float32 output kept until the batch ended (as before) was read with attention's
    output in it. Each layer is summarised as soon as its blocks have run, holding one
    layer's activations, not every layer's."""
    if kind == "falcon":
        from transformers import AutoModelForCausalLM, FalconConfig

        config = FalconConfig(
            vocab_size=320, hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
            multi_query=True, new_decoder_architecture=False, parallel_attn=True, alibi=False,
            max_position_embeddings=128,
        )  # fmt: skip
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    else:
        model = tiny_model(kind)
    structure = spaces.Structure.of(model)
    windows = random_windows(model, 3, 16)
    want = direct_ratios(structure, windows)
    got = residual_ratios(structure, windows, batch_size=3)
    assert got == pytest.approx(want, rel=1e-5)
    # batches add up: two batches give the mean over all tokens
    assert residual_ratios(structure, windows, batch_size=2) == pytest.approx(want, rel=1e-5)
