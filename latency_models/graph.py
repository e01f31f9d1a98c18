"""A lean forward pass of a (pruned) Llama-layout decoder, for latency measurement.

Hugging Face's forward builds masks and caches in Python, which adds interpreter overhead a
deployed runtime does not have and which the TorchScript ONNX exporter cannot follow. This
module holds the same arithmetic as plain tensor ops over static shapes: one graph per
workload, with the rotary tables and the causal mask baked in. torch runs it as it is;
``latency_models.onnx_graph`` writes the same graph for ONNX Runtime.

Blocks may have any number of KV groups and MLP neurons, or be missing (a dropped block).
Weights are compacted on the way in, so the graph runs a physically pruned model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from latency_models.workload import Workload
from searcher.errors import SearcherError

Rotary = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
"""(first position, count) -> (cos, sin), each [count, head_dim]."""


def _param(t: torch.Tensor | None) -> nn.Parameter | None:
    """A parameter with compact storage (a column slice of a weight is copied; a row slice or
    a whole weight is not)."""
    return None if t is None else nn.Parameter(t.detach().contiguous(), requires_grad=False)


class Norm(nn.Module):
    """RMSNorm as Llama computes it: in float32, then scaled by the weight."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = _param(weight)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


@dataclass
class AttentionWeights:
    norm: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    head_dim: int
    group_size: int  # query heads per KV head
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # per-head RMSNorm of Qwen3-style attention
    k_norm: torch.Tensor | None = None

    @property
    def groups(self) -> int:
        return self.k.shape[0] // self.head_dim

    def sliced(self, groups: int) -> AttentionWeights:
        """The first ``groups`` KV groups with their query heads (timing needs only shapes)."""
        q, kv = groups * self.group_size * self.head_dim, groups * self.head_dim

        def cut(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
            return None if t is None else t[:n]

        return dataclasses.replace(
            self, q=self.q[:q], k=self.k[:kv], v=self.v[:kv], o=self.o[:, :q],
            q_bias=cut(self.q_bias, q), k_bias=cut(self.k_bias, kv), v_bias=cut(self.v_bias, kv),
        )  # fmt: skip


@dataclass
class MLPWeights:
    norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    def sliced(self, width: int) -> MLPWeights:
        """The first ``width`` neurons (timing needs only shapes)."""
        return MLPWeights(self.norm, self.gate[:width], self.up[:width], self.down[:, :width])


@dataclass
class DecoderWeights:
    """Everything a forward pass needs. ``embed``/``head`` None: hidden states in and out."""

    layers: list[tuple[AttentionWeights | None, MLPWeights | None]]
    eps: float
    rotary: Rotary
    hidden: int
    embed: torch.Tensor | None = None
    final_norm: torch.Tensor | None = None
    head: torch.Tensor | None = None

    def without_ends(
        self, layers: Sequence[tuple[AttentionWeights | None, MLPWeights | None]]
    ) -> DecoderWeights:
        """Other blocks chained on hidden states, with no embedding or head."""
        return DecoderWeights(list(layers), self.eps, self.rotary, self.hidden)

    def nbytes(self) -> int:
        """Bytes of weights a forward pass reads, as float32 (what ONNX Runtime holds; a tied
        head counted once)."""
        seen: dict[int, int] = {}
        for t in self._tensors():
            seen[id(t)] = t.numel() * max(t.element_size(), 4)
        return sum(seen.values())

    def _tensors(self) -> list[torch.Tensor]:
        out = [t for t in (self.embed, self.final_norm, self.head) if t is not None]
        for attn, mlp in self.layers:
            for part in (attn, mlp):
                if part is not None:
                    out += [v for v in vars(part).values() if isinstance(v, torch.Tensor)]
        return out

    def ends_only(self) -> DecoderWeights:
        """Embedding, final norm and head with no blocks between."""
        return dataclasses.replace(self, layers=[])


class Attention(nn.Module):
    def __init__(self, w: AttentionWeights, eps: float) -> None:
        super().__init__()
        self.norm = Norm(w.norm, eps)
        self.q, self.k = _linear(w.q, w.q_bias), _linear(w.k, w.k_bias)
        self.v, self.o = _linear(w.v, w.v_bias), _linear(w.o, w.o_bias)
        self.q_norm = None if w.q_norm is None else Norm(w.q_norm, eps)
        self.k_norm = None if w.k_norm is None else Norm(w.k_norm, eps)
        self.hd, self.r, self.g = w.head_dim, w.group_size, w.groups
        self.scale = w.head_dim**-0.5

    def forward(self, h, cos, sin, mask, past_k=None, past_v=None):
        b, s, _ = h.shape
        x = self.norm(h)
        q = self.q(x).view(b, s, self.g, self.r, self.hd)
        k = self.k(x).view(b, s, self.g, self.hd)
        v = self.v(x).view(b, s, self.g, self.hd)
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        q = q.permute(0, 2, 3, 1, 4)  # [b, g, r, s, hd]
        k = k.permute(0, 2, 1, 3)  # [b, g, s, hd]
        v = v.permute(0, 2, 1, 3)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        keys, values = k, v
        if past_k is not None:
            keys = torch.cat([past_k, k], dim=2)
            values = torch.cat([past_v, v], dim=2)
        scores = torch.matmul(q, keys.unsqueeze(2).transpose(-1, -2)) * self.scale
        if mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, values.unsqueeze(2))  # [b, g, r, s, hd]
        out = out.permute(0, 3, 1, 2, 4).reshape(b, s, self.g * self.r * self.hd)
        return h + self.o(out), k, v


class MLP(nn.Module):
    def __init__(self, w: MLPWeights, eps: float) -> None:
        super().__init__()
        self.norm = Norm(w.norm, eps)
        self.gate, self.up, self.down = _param(w.gate), _param(w.up), _param(w.down)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.norm(h)
        a = torch.nn.functional.linear(x, self.gate)
        u = torch.nn.functional.linear(x, self.up)
        return h + torch.nn.functional.linear(torch.nn.functional.silu(a) * u, self.down)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(1, 1, bias=bias is not None)
    lin.weight = _param(weight)
    if bias is not None:
        lin.bias = _param(bias)
    return lin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class Decoder(nn.Module):
    """One workload's forward pass: prefill (ids [B, S] -> next-token logits and the new KV
    cache) or decode (one token with a KV cache of S positions -> logits and its K/V)."""

    def __init__(self, weights: DecoderWeights, workload: Workload) -> None:
        super().__init__()
        self.workload = workload
        self.source = weights
        w = weights
        self.embed = _param(w.embed)
        self.final_norm = None if w.final_norm is None else Norm(w.final_norm, w.eps)
        self.head = _param(w.head)
        blocks = []
        for attn, mlp in w.layers:
            blocks.append(None if attn is None else Attention(attn, w.eps))
            blocks.append(None if mlp is None else MLP(mlp, w.eps))
        self.blocks = nn.ModuleList([b for b in blocks if b is not None])
        self.kinds = [isinstance(b, Attention) for b in self.blocks]
        first, count = (0, workload.seq_len) if workload.prefill else (workload.seq_len, 1)
        cos, sin = w.rotary(first, count)
        self.register_buffer("cos", cos.detach().clone(), persistent=False)
        self.register_buffer("sin", sin.detach().clone(), persistent=False)
        if workload.prefill:
            s = workload.seq_len
            mask = torch.full((s, s), torch.finfo(cos.dtype).min, dtype=cos.dtype).triu(1)
            self.register_buffer("mask", mask, persistent=False)
        else:
            self.mask = None

    def example_inputs(self, dtype: torch.dtype, device: str = "cpu") -> tuple[torch.Tensor, ...]:
        return example_inputs(self.source, self.workload, dtype, device)

    def forward(self, x: torch.Tensor, *past: torch.Tensor):
        h = x if self.embed is None else self.embed[x]
        cache: list[torch.Tensor] = []
        j = 0
        for block, is_attn in zip(self.blocks, self.kinds):
            if is_attn:
                pk, pv = (past[2 * j], past[2 * j + 1]) if past else (None, None)
                h, k, v = block(h, self.cos, self.sin, self.mask, pk, pv)
                cache += [k, v]
                j += 1
            else:
                h = block(h)
        if self.head is not None:
            h = torch.nn.functional.linear(self.final_norm(h[:, -1]), self.head)
        return (h, *cache)


def example_inputs(
    weights: DecoderWeights, workload: Workload, dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Inputs of the workload's shapes: token ids (hidden states without an embedding), then
    for decode the past keys and values of each attention block."""
    wl = workload
    tokens = wl.seq_len if wl.prefill else 1
    gen = torch.Generator().manual_seed(0)
    if weights.embed is not None:
        x = torch.randint(0, weights.embed.shape[0], (wl.batch, tokens), generator=gen)
    else:
        x = torch.randn(wl.batch, tokens, weights.hidden, generator=gen).to(dtype)
    inputs = [x.to(device)]
    if not wl.prefill:
        for attn, _ in weights.layers:
            if attn is not None:
                shape = (wl.batch, attn.groups, wl.seq_len, attn.head_dim)
                for _ in "kv":
                    inputs.append(torch.randn(shape, generator=gen).to(dtype).to(device))
    return tuple(inputs)


def weights_of(model: nn.Module) -> DecoderWeights:
    """The weights of a Llama-layout causal LM, pruned or not, as a ``DecoderWeights``.

    A block whose attention / MLP has no projections (a dropped block) is left out.
    """
    cfg = model.config
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise SearcherError(f"latency measurement supports SiLU-gated MLPs, not {act!r}")
    base = model.model
    eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
    heads, kv_heads = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None)
    group = heads // (kv_heads or heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layers = []
    for block in base.layers:
        a, m = block.self_attn, block.mlp
        attn = mlp = None
        if hasattr(a, "q_proj") and a.q_proj.weight.shape[0] > 0:
            attn = AttentionWeights(
                norm=block.input_layernorm.weight, q=a.q_proj.weight, k=a.k_proj.weight,
                v=a.v_proj.weight, o=a.o_proj.weight, head_dim=head_dim, group_size=group,
                q_bias=a.q_proj.bias, k_bias=a.k_proj.bias, v_bias=a.v_proj.bias,
                o_bias=a.o_proj.bias,
                q_norm=getattr(getattr(a, "q_norm", None), "weight", None),
                k_norm=getattr(getattr(a, "k_norm", None), "weight", None),
            )  # fmt: skip
        if hasattr(m, "gate_proj") and m.gate_proj.weight.shape[0] > 0:
            mlp = MLPWeights(
                block.post_attention_layernorm.weight,
                m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight,
            )  # fmt: skip
        layers.append((attn, mlp))
    return DecoderWeights(
        layers=layers, eps=eps, rotary=rotary_of(model, head_dim), hidden=cfg.hidden_size,
        embed=model.get_input_embeddings().weight, final_norm=base.norm.weight,
        head=model.get_output_embeddings().weight,
    )  # fmt: skip


def rotary_of(model: nn.Module, head_dim: int) -> Rotary:
    """The model's own rotary embedding (with any scaling it applies) as a table function."""
    emb = model.model.rotary_emb

    def table(first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = next(model.parameters())
        x = torch.zeros(1, count, head_dim, dtype=p.dtype, device=p.device)
        pos = torch.arange(first, first + count, device=p.device)[None]
        with torch.no_grad():
            cos, sin = emb(x, pos)
        return cos[0], sin[0]

    return table
