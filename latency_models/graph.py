"""A lean forward pass of a (pruned) decoder-only LM, for latency measurement.

Hugging Face's forward builds masks and caches in Python, which adds interpreter overhead a
deployed runtime does not have and which the TorchScript ONNX exporter cannot follow. This
module holds the same arithmetic as plain tensor ops over static shapes: one graph per
workload, with the rotary tables and the causal mask baked in. torch runs it as it is;
``latency_models.onnx_graph`` writes the same graph for ONNX Runtime.

The Llama layout is the default; a ``Style`` on ``DecoderWeights`` describes how other
families differ (norm kind, where norms sit, parallel residual, activation, rotary, scales and
softcaps, learned positions). Each model family reads its models into ``DecoderWeights``
(``Family.lean`` in ``searcher/families``); nothing here knows a family's module names.

Blocks may have any number of KV groups and MLP neurons, or be missing (a dropped block).
Weights are compacted on the way in, so the graph runs a physically pruned model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from latency_models.workload import Workload
from searcher.errors import SearcherError

Rotary = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]
"""(first position, count) -> (cos, sin), each [count, rotated dims]."""

NORMS = ("rms", "rms1p", "layer")


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    # GPT-2's tanh approximation written out as Hugging Face's NewGELUActivation does, so the
    # rounding matches its (torch's fused tanh GELU rounds differently).
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3.0))))


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": _gelu_new,
    "relu": F.relu,
}
"""Hugging Face activation names (``ACT2FN`` keys) the graph computes."""


@dataclass(frozen=True)
class Style:
    """How a family's decoder computes, beyond what its tensors' shapes say. The defaults are
    Llama's: RMSNorm before each block, SiLU-gated MLP, rotary over whole heads, scores
    scaled by head_dim ** -0.5."""

    family: str = "llama"  # the name messages use
    norm: str = "rms"  # "rms": w * x / rms(x); "rms1p": (1 + w) * x / rms(x); "layer": LayerNorm
    pre_norm: bool = True  # a norm on each block's input (OLMo2 has none)
    post_norm: bool = False  # a norm on each block's output, before the residual add
    parallel: bool = False  # the MLP reads the layer's input, not the attention's output
    act: str = "silu"  # a key of ACTIVATIONS
    gated: bool = True  # act(gate x) * (up x); else act(up x)
    rotary_dims: int | None = None  # rotated dims of each head: None all, 0 none, n the first n
    qk_norm: str = "head"  # q/k norms, where present, over each "head" or over "all" heads at once
    score_scale: float | None = None  # attention scores' factor; None: head_dim ** -0.5
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap), before the mask
    embed_scale: float = 1.0  # token embeddings' factor (already rounded to the model's dtype)
    residual_scale: float = 1.0  # each block's output's factor in the residual add
    logits_divisor: float = 1.0
    logits_softcap: float | None = None

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise SearcherError(f"the lean graph has no {self.norm!r} norm (it has {NORMS})")
        if self.act not in ACTIVATIONS:
            raise SearcherError(
                f"the lean graph has no {self.act!r} activation (it has {', '.join(ACTIVATIONS)})"
            )
        if self.qk_norm not in ("head", "all"):
            raise SearcherError(f"q/k norms go over 'head' or 'all', not {self.qk_norm!r}")


def _param(t: torch.Tensor | None) -> nn.Parameter | None:
    """A parameter with compact storage (a column slice of a weight is copied; a row slice or
    a whole weight is not)."""
    return None if t is None else nn.Parameter(t.detach().contiguous(), requires_grad=False)


class Norm(nn.Module):
    """The norms of the supported families. "rms" as Llama computes it (in float32, then
    scaled by the weight); "rms1p" as Gemma does (scaled by 1 + weight in float32); "layer" is
    LayerNorm with its bias."""

    def __init__(
        self, weight: torch.Tensor, eps: float, kind: str = "rms", bias: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.weight = _param(weight)
        self.bias = _param(bias)
        self.eps = eps
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.kind == "rms1p":
            return (x * (1.0 + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


def _norm(
    weight: torch.Tensor | None, bias: torch.Tensor | None, style: Style, eps: float
) -> Norm | None:
    return None if weight is None else Norm(weight, eps, style.norm, bias)


def _cut(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    return None if t is None else t[:n]


@dataclass
class AttentionWeights:
    """One attention block: projections [out, in] (nn.Linear layout), KV groups of
    ``group_size`` query heads each (a model without GQA: one head per group)."""

    norm: torch.Tensor | None  # the pre-norm (None: the style has none)
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
    q_norm: torch.Tensor | None = None  # [head_dim] per head, or [heads * head_dim] across heads
    k_norm: torch.Tensor | None = None
    norm_bias: torch.Tensor | None = None  # the pre-norm's bias (LayerNorm)
    post_norm: torch.Tensor | None = None  # the norm of the block's output (OLMo2, Gemma 2/3)
    scale: float | None = None  # this block's score scale, over the style's (GPT-2 option)
    rotary: Rotary | None = None  # this block's own rotary table (Gemma 3's local layers)
    # Not applied here: this graph attends to every past position, which is exact while the
    # sequence (with the decoded token) fits the window, and times the same work. The
    # deployable ONNX graph (latency_models.onnx_decoder) applies it in its mask.
    sliding_window: int | None = None

    @property
    def groups(self) -> int:
        return self.k.shape[0] // self.head_dim

    def sliced(self, groups: int) -> AttentionWeights:
        """The first ``groups`` KV groups with their query heads (timing needs only shapes)."""
        q, kv = groups * self.group_size * self.head_dim, groups * self.head_dim

        def across(norm: torch.Tensor | None, n: int) -> torch.Tensor | None:
            # a norm across heads has one weight per projected dim: cut with its heads
            return norm[:n] if norm is not None and norm.shape[0] > self.head_dim else norm

        return dataclasses.replace(
            self, q=self.q[:q], k=self.k[:kv], v=self.v[:kv], o=self.o[:, :q],
            q_bias=_cut(self.q_bias, q), k_bias=_cut(self.k_bias, kv),
            v_bias=_cut(self.v_bias, kv), q_norm=across(self.q_norm, q),
            k_norm=across(self.k_norm, kv),
        )  # fmt: skip


@dataclass
class MLPWeights:
    """One MLP block: act(gate x) * (up x) -> down, or act(up x) -> down without a gate."""

    norm: torch.Tensor | None  # the pre-norm (None: the style has none)
    gate: torch.Tensor | None  # None: a non-gated MLP (``up`` is its first projection)
    up: torch.Tensor
    down: torch.Tensor
    norm_bias: torch.Tensor | None = None
    post_norm: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def width(self) -> int:
        """Neurons (intermediate size)."""
        return self.up.shape[0]

    def sliced(self, width: int) -> MLPWeights:
        """The first ``width`` neurons (timing needs only shapes)."""
        return dataclasses.replace(
            self, gate=_cut(self.gate, width), up=self.up[:width], down=self.down[:, :width],
            gate_bias=_cut(self.gate_bias, width), up_bias=_cut(self.up_bias, width),
        )  # fmt: skip


Layer = tuple[AttentionWeights | None, MLPWeights | None]


@dataclass
class DecoderWeights:
    """Everything a forward pass needs. ``embed``/``head`` None: hidden states in and out."""

    layers: list[Layer]
    eps: float
    rotary: Rotary | None  # None only when the style has no rotary
    hidden: int
    embed: torch.Tensor | None = None
    final_norm: torch.Tensor | None = None
    head: torch.Tensor | None = None
    style: Style = Style()
    # learned absolute position embeddings [positions, hidden], row i for position i (OPT's
    # offset already dropped), added to the token embeddings: part of the ends
    positions: torch.Tensor | None = None
    final_norm_bias: torch.Tensor | None = None

    def without_ends(self, layers: Sequence[Layer]) -> DecoderWeights:
        """Other blocks chained on hidden states, with no embedding or head."""
        return DecoderWeights(list(layers), self.eps, self.rotary, self.hidden, style=self.style)

    def nbytes(self) -> int:
        """Bytes of weights a forward pass reads, as float32 (what ONNX Runtime holds; a tied
        head counted once)."""
        seen: dict[int, int] = {}
        for t in self._tensors():
            seen[id(t)] = t.numel() * max(t.element_size(), 4)
        return sum(seen.values())

    def _tensors(self) -> list[torch.Tensor]:
        ends = (self.embed, self.positions, self.final_norm, self.final_norm_bias, self.head)
        out = [t for t in ends if t is not None]
        for attn, mlp in self.layers:
            for part in (attn, mlp):
                if part is not None:
                    out += [v for v in vars(part).values() if isinstance(v, torch.Tensor)]
        return out

    def ends_only(self) -> DecoderWeights:
        """Embedding, final norm and head with no blocks between."""
        return dataclasses.replace(self, layers=[])


class Attention(nn.Module):
    """Returns the block's output (before the residual add) and the new K/V."""

    def __init__(self, w: AttentionWeights, eps: float, style: Style = Style()) -> None:
        super().__init__()
        self.norm = _norm(w.norm, w.norm_bias, style, eps)
        self.post_norm = _norm(w.post_norm, None, style, eps)
        self.q, self.k = _linear(w.q, w.q_bias), _linear(w.k, w.k_bias)
        self.v, self.o = _linear(w.v, w.v_bias), _linear(w.o, w.o_bias)
        self.q_norm = _norm(w.q_norm, None, style, eps)
        self.k_norm = _norm(w.k_norm, None, style, eps)
        self.across = style.qk_norm == "all"
        self.hd, self.r, self.g = w.head_dim, w.group_size, w.groups
        scale = w.scale if w.scale is not None else style.score_scale
        self.scale = w.head_dim**-0.5 if scale is None else scale
        self.softcap = style.attn_softcap

    def forward(self, h, cos, sin, mask, past_k=None, past_v=None):
        b, s, _ = h.shape
        x = h if self.norm is None else self.norm(h)
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.across:  # OLMo2: one RMSNorm over all heads' dims together
            q = q if self.q_norm is None else self.q_norm(q)
            k = k if self.k_norm is None else self.k_norm(k)
        q = q.view(b, s, self.g, self.r, self.hd)
        k = k.view(b, s, self.g, self.hd)
        v = v.view(b, s, self.g, self.hd)
        if not self.across:
            q = q if self.q_norm is None else self.q_norm(q)
            k = k if self.k_norm is None else self.k_norm(k)
        q = q.permute(0, 2, 3, 1, 4)  # [b, g, r, s, hd]
        k = k.permute(0, 2, 1, 3)  # [b, g, s, hd]
        v = v.permute(0, 2, 1, 3)
        if cos is not None:
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        keys, values = k, v
        if past_k is not None:
            keys = torch.cat([past_k, k], dim=2)
            values = torch.cat([past_v, v], dim=2)
        scores = torch.matmul(q, keys.unsqueeze(2).transpose(-1, -2)) * self.scale
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, values.unsqueeze(2))  # [b, g, r, s, hd]
        out = out.permute(0, 3, 1, 2, 4).reshape(b, s, self.g * self.r * self.hd)
        out = self.o(out)
        return (out if self.post_norm is None else self.post_norm(out)), k, v


class MLP(nn.Module):
    """Returns the block's output (before the residual add)."""

    def __init__(self, w: MLPWeights, eps: float, style: Style = Style()) -> None:
        super().__init__()
        self.norm = _norm(w.norm, w.norm_bias, style, eps)
        self.post_norm = _norm(w.post_norm, None, style, eps)
        self.gate = None if w.gate is None else _linear(w.gate, w.gate_bias)
        self.up, self.down = _linear(w.up, w.up_bias), _linear(w.down, w.down_bias)
        self.act = ACTIVATIONS[style.act]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h if self.norm is None else self.norm(h)
        y = self.act(self.up(x)) if self.gate is None else self.act(self.gate(x)) * self.up(x)
        y = self.down(y)
        return y if self.post_norm is None else self.post_norm(y)


class DecoderLayer(nn.Module):
    """An attention block and an MLP block (either may be missing) with their residual adds:
    sequential, or parallel (both read the layer's input)."""

    def __init__(
        self, attn: Attention | None, mlp: MLP | None, style: Style, table: int = 0
    ) -> None:
        super().__init__()
        self.attn, self.mlp = attn, mlp
        self.parallel = style.parallel
        self.scale = style.residual_scale
        self.table = table  # which of the decoder's rotary tables the attention uses

    def _add(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return h + out if self.scale == 1.0 else h + out * self.scale

    def forward(self, h, cos, sin, mask, past_k=None, past_v=None):
        kv: tuple[torch.Tensor, ...] = ()
        if self.parallel and self.attn is not None and self.mlp is not None:
            out, k, v = self.attn(h, cos, sin, mask, past_k, past_v)
            if self.scale == 1.0:  # GPT-NeoX's order of the adds, so that bf16 rounds alike
                return self.mlp(h) + out + h, (k, v)
            return h + (self.mlp(h) + out) * self.scale, (k, v)
        if self.attn is not None:
            out, k, v = self.attn(h, cos, sin, mask, past_k, past_v)
            h, kv = self._add(h, out), (k, v)
        if self.mlp is not None:
            h = self._add(h, self.mlp(h))
        return h, kv


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(1, 1, bias=bias is not None)
    lin.weight = _param(weight)
    if bias is not None:
        lin.bias = _param(bias)
    return lin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary over the first ``cos.shape[-1]`` dims of each head (all of them, or a partial
    rotary's share); the rest pass through."""
    n = cos.shape[-1]
    if n == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    head = x[..., :n]
    return torch.cat([head * cos + _rotate_half(head) * sin, x[..., n:]], dim=-1)


def check_style(weights: DecoderWeights) -> None:
    """The blocks carry the norms and gates their style says (the graph computes with the
    tensors present, so a converter's slip would otherwise pass silently)."""
    st = weights.style
    for i, (attn, mlp) in enumerate(weights.layers):
        for name, part in (("attention", attn), ("MLP", mlp)):
            if part is None:
                continue
            wanted = {"norm": st.pre_norm, "post_norm": st.post_norm}
            if isinstance(part, MLPWeights):
                wanted["gate"] = st.gated
            for field, want in wanted.items():
                if (getattr(part, field) is not None) != want:
                    raise SearcherError(
                        f"{st.family} weights do not fit their style: layer {i}'s {name} "
                        f"{'lacks' if want else 'has'} a {field} tensor"
                    )


def rotary_functions(weights: DecoderWeights) -> tuple[list[Rotary], list[int]]:
    """The distinct rotary functions ([] without rotary; the decoder's first), in the order
    ``rotary_tables`` gives their tables, and for each layer the index of the one its attention
    uses."""
    style = weights.style
    if style.rotary_dims == 0:
        return [], [0] * len(weights.layers)
    if weights.rotary is None:
        raise SearcherError(f"{style.family} weights have rotary attention but no rotary table")
    fns: list[Rotary] = [weights.rotary]
    index = []
    for attn, _ in weights.layers:
        fn = weights.rotary if attn is None or attn.rotary is None else attn.rotary
        if fn not in fns:
            fns.append(fn)
        index.append(fns.index(fn))
    return fns, index


def rotary_tables(
    weights: DecoderWeights, first: int, count: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[int]]:
    """The distinct rotary tables of a workload's positions ([] without rotary), and for each
    layer the index of the one its attention uses (the decoder's is 0)."""
    style = weights.style
    fns, index = rotary_functions(weights)
    tables = []
    for fn in fns:
        cos, sin = fn(first, count)
        if style.rotary_dims is not None and cos.shape[-1] != style.rotary_dims:
            raise SearcherError(
                f"{style.family}: a rotary table has {cos.shape[-1]} dims, the style says "
                f"{style.rotary_dims}"
            )
        tables.append((cos.detach().clone(), sin.detach().clone()))
    return tables, index


def _dtype(weights: DecoderWeights) -> torch.dtype:
    tensors = weights._tensors()
    return tensors[0].dtype if tensors else torch.float32


class Decoder(nn.Module):
    """One workload's forward pass: prefill (ids [B, S] -> next-token logits and the new KV
    cache) or decode (one token with a KV cache of S positions -> logits and its K/V)."""

    def __init__(self, weights: DecoderWeights, workload: Workload) -> None:
        super().__init__()
        self.workload = workload
        self.source = weights
        w, st = weights, weights.style
        check_style(w)
        self.embed = _param(w.embed)
        self.final_norm = _norm(w.final_norm, w.final_norm_bias, st, w.eps)
        self.head = _param(w.head)
        first, count = (0, workload.seq_len) if workload.prefill else (workload.seq_len, 1)
        tables, index = rotary_tables(w, first, count)
        self.tables = len(tables)
        for i, (cos, sin) in enumerate(tables):
            self.register_buffer(f"cos{i}", cos, persistent=False)
            self.register_buffer(f"sin{i}", sin, persistent=False)
        layers = []
        for (attn, mlp), table in zip(w.layers, index):
            if attn is None and mlp is None:
                continue
            a = None if attn is None else Attention(attn, w.eps, st)
            m = None if mlp is None else MLP(mlp, w.eps, st)
            layers.append(DecoderLayer(a, m, st, table))
        self.layers = nn.ModuleList(layers)
        pos = None
        if w.positions is not None and w.embed is not None:
            pos = w.positions[first : first + count].detach().clone()
        self.register_buffer("pos", pos, persistent=False)
        dtype = tables[0][0].dtype if tables else _dtype(w)
        if workload.prefill:
            s = workload.seq_len
            mask = torch.full((s, s), torch.finfo(dtype).min, dtype=dtype).triu(1)
            self.register_buffer("mask", mask, persistent=False)
        else:
            self.mask = None

    def example_inputs(self, dtype: torch.dtype, device: str = "cpu") -> tuple[torch.Tensor, ...]:
        return example_inputs(self.source, self.workload, dtype, device)

    def _table(self, i: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.tables:
            return None, None
        return getattr(self, f"cos{i}"), getattr(self, f"sin{i}")

    def forward(self, x: torch.Tensor, *past: torch.Tensor):
        st = self.source.style
        h = x if self.embed is None else self.embed[x]
        if self.embed is not None and st.embed_scale != 1.0:
            h = h * st.embed_scale
        if self.pos is not None:
            h = h + self.pos
        cache: list[torch.Tensor] = []
        for layer in self.layers:
            j = len(cache)
            pk, pv = (past[j], past[j + 1]) if past and layer.attn is not None else (None, None)
            cos, sin = self._table(layer.table)
            h, kv = layer(h, cos, sin, self.mask, pk, pv)
            cache += kv
        if self.head is not None:
            h = h[:, -1]
            h = h if self.final_norm is None else self.final_norm(h)
            h = torch.nn.functional.linear(h, self.head)
            if st.logits_divisor != 1.0:
                h = h / st.logits_divisor
            if st.logits_softcap is not None:
                h = torch.tanh(h / st.logits_softcap) * st.logits_softcap
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


def rotary_of(
    model: nn.Module, emb: nn.Module, head_dim: int, layer_type: str | None = None
) -> Rotary:
    """A model's own rotary embedding module ``emb`` (with any scaling it applies) as a table
    function, in the dtype and on the device of ``model``'s parameters. ``emb`` is called as
    Hugging Face's rotary embeddings are, ``emb(x, position_ids)``, with ``layer_type`` after
    them where the model keeps one table per kind of layer (Gemma 3)."""
    extra = () if layer_type is None else (layer_type,)

    def table(first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = next(model.parameters())
        x = torch.zeros(1, count, head_dim, dtype=p.dtype, device=p.device)
        pos = torch.arange(first, first + count, device=p.device)[None]
        with torch.no_grad():
            cos, sin = emb(x, pos, *extra)
        # the model's dtype, as Llama's table returns it (OLMo2's stays float32)
        return cos[0].to(p.dtype), sin[0].to(p.dtype)

    return table
