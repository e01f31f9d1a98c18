"""The lean decoder (``latency_models.graph``) written directly as an ONNX graph.

Exporting through torch takes about 10 s for the 30-layer embedded model even without weights
(TorchScript tracing and its passes), which is most of the cost of measuring one candidate.
The graph is regular, so it is built here node by node in milliseconds; the weights are
handed to ONNX Runtime from memory as external initializers, never serialised. Tests check
that it computes what the torch decoder computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from latency_models.graph import (
    AttentionWeights,
    DecoderWeights,
    MLPWeights,
    Style,
    check_style,
    rotary_tables,
)
from latency_models.workload import Workload
from searcher.errors import SearcherError

OPSET = 17
TYPES = {np.dtype("float32"): TensorProto.FLOAT}
EXTERNAL_OVER = 2**31 - 2**26  # bytes past which weights go to <name>.data (protobuf: 2 GB)


@dataclass
class OnnxDecoder:
    model: onnx.ModelProto
    weights: dict[str, np.ndarray]  # external initializers, by name
    inputs: list[str]
    outputs: list[str]

    def save(self, path: str | Path, external: bool | None = None) -> list[Path]:
        """Write the graph with its weights to ``path``, self-contained; past 2 GB in all
        (weights, tables, masks and graph: every byte protobuf would hold), or where
        ``external`` says so, the weights and every other initializer of 1 MB or more go to
        ``<path name>.data`` beside it, written straight from their arrays (tensors of 1 MB
        and more at 64 KB offsets, which runtimes can map). Returns the files."""
        path = Path(path)
        data = path.with_name(path.name + ".data")
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        kept = [t for t in model.graph.initializer if not is_external(t)]
        del model.graph.initializer[:]
        if external is None:
            inline = model.ByteSize()  # the graph and its inline constants (rotary tables...)
            external = inline + sum(a.nbytes for a in self.weights.values()) > EXTERNAL_OVER
        data.unlink(missing_ok=True)
        if not external:
            model.graph.initializer.extend(kept)
            model.graph.initializer.extend(
                numpy_helper.from_array(a, name) for name, a in self.weights.items()
            )
            onnx.save_model(model, str(path))
            return [path]
        big = [t for t in kept if len(t.raw_data) >= 2**20]
        model.graph.initializer.extend(t for t in kept if len(t.raw_data) < 2**20)
        arrays = [*self.weights.items(), *((t.name, numpy_helper.to_array(t)) for t in big)]
        with open(data, "wb") as f:
            for name, a in arrays:
                if a.nbytes >= 2**20 and f.tell() % 2**16:
                    f.write(bytes(2**16 - f.tell() % 2**16))
                offset = f.tell()
                np.ascontiguousarray(a).tofile(f)
                t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(a.dtype))
                t.dims.extend(a.shape)
                t.data_location = TensorProto.EXTERNAL
                for key, value in (
                    ("location", data.name), ("offset", offset), ("length", a.nbytes),
                ):  # fmt: skip
                    entry = t.external_data.add()
                    entry.key, entry.value = key, str(value)
                model.graph.initializer.append(t)
        onnx.save_model(model, str(path))
        return [path, data]


def is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


@dataclass
class Builder:
    """Nodes, constants and weights of a graph. Each weight tensor is stored once however many
    nodes read it (a tied embedding and head, the one norm both blocks of a parallel Falcon
    layer read)."""

    dtype: np.dtype
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    consts: list[TensorProto] = field(default_factory=list)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    externals: list[TensorProto] = field(default_factory=list)
    n: int = 0
    seen: dict[tuple[int, bool], tuple[torch.Tensor, str]] = field(default_factory=dict)

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{hint}_{self.n}"

    def op(self, op: str, *inputs: str, hint: str = "", **attrs) -> str:
        out = self.name(hint or op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        return out

    def const(self, value: np.ndarray | list[int], hint: str = "c") -> str:
        arr = np.asarray(value)
        name = self.name(hint)
        self.consts.append(numpy_helper.from_array(arr, name))
        return name

    def weight(self, t: torch.Tensor, hint: str, transpose: bool = False) -> str:
        """A weight handed to ONNX Runtime from memory (transposed for MatMul if asked)."""
        key = (id(t), transpose)  # the tensor is kept in ``seen``: its id is not reused
        if key not in self.seen:
            self.seen[key] = (t, self._weight(t, hint, transpose))
        return self.seen[key][1]

    def _weight(self, t: torch.Tensor, hint: str, transpose: bool) -> str:
        arr = t.detach().to("cpu", torch.float32).numpy().astype(self.dtype, copy=False)
        arr = np.ascontiguousarray(arr.T if transpose else arr)
        name = self.name(hint)
        self.weights[name] = arr
        proto = TensorProto(name=name, data_type=TYPES[arr.dtype], dims=arr.shape)
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "memory"), ("offset", "0"), ("length", str(arr.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        self.externals.append(proto)
        return name

    def table(self, t: torch.Tensor, hint: str) -> str:
        return self.const(t.detach().cpu().float().numpy().astype(self.dtype), hint)

    def scalar(self, value: float) -> str:
        return self.const(np.array(value, dtype=self.dtype))

    def linear(self, x: str, w: torch.Tensor, bias: torch.Tensor | None, hint: str) -> str:
        y = self.op("MatMul", x, self.weight(w, hint, transpose=True), hint=hint)
        return y if bias is None else self.op("Add", y, self.weight(bias, f"{hint}_b"))

    def norm(
        self, x: str, w: torch.Tensor, eps: float, kind: str = "rms",
        bias: torch.Tensor | None = None,
    ) -> str:  # fmt: skip
        """``graph.Norm``: RMSNorm (weight, or 1 + weight for "rms1p") or LayerNorm."""
        if kind == "layer":
            scale, shift = self.weight(w, "ln"), self.weight(_or_zeros(bias, w), "ln_b")
            return self.op("LayerNormalization", x, scale, shift, axis=-1, epsilon=eps)
        sq = self.op("Mul", x, x)
        ms = self.op("ReduceMean", sq, axes=[-1], keepdims=1)
        r = self.op("Sqrt", self.op("Add", ms, self.scalar(eps)))
        scale = 1.0 + w.detach().float() if kind == "rms1p" else w
        return self.op("Mul", self.op("Div", x, r), self.weight(scale, "norm"))

    def rotate(self, x: str, cos: str, sin: str, half: int) -> str:
        axes = self.const([-1])
        lo = self.op("Slice", x, self.const([0]), self.const([half]), axes)
        hi = self.op("Slice", x, self.const([half]), self.const([2 * half]), axes)
        rot = self.op("Concat", self.op("Neg", hi), lo, axis=-1)
        return self.op("Add", self.op("Mul", x, cos), self.op("Mul", rot, sin))

    def rotary(self, x: str, cos: str, sin: str, dims: int, head_dim: int) -> str:
        """Rotary over the first ``dims`` of each head; the rest pass through."""
        if dims == head_dim:
            return self.rotate(x, cos, sin, dims // 2)
        axes = self.const([-1])
        head = self.op("Slice", x, self.const([0]), self.const([dims]), axes)
        rest = self.op("Slice", x, self.const([dims]), self.const([head_dim]), axes)
        return self.op("Concat", self.rotate(head, cos, sin, dims // 2), rest, axis=-1)

    def softcap(self, x: str, cap: float) -> str:
        c = self.scalar(cap)
        return self.op("Mul", self.op("Tanh", self.op("Div", x, c)), c)

    def activation(self, x: str, name: str) -> str:
        if name in ("silu", "swish"):
            return self.op("Mul", x, self.op("Sigmoid", x))
        if name == "relu":
            return self.op("Relu", x)
        half_x = self.op("Mul", x, self.scalar(0.5))
        if name == "gelu":  # erf form
            inner = self.op("Erf", self.op("Mul", x, self.scalar(math.sqrt(0.5))))
        else:  # tanh approximation (gelu_new, gelu_pytorch_tanh)
            cube = self.op("Mul", self.op("Mul", x, x), x)
            arg = self.op("Add", x, self.op("Mul", cube, self.scalar(0.044715)))
            inner = self.op("Tanh", self.op("Mul", arg, self.scalar(math.sqrt(2.0 / math.pi))))
        return self.op("Mul", half_x, self.op("Add", inner, self.scalar(1.0)))


def _or_zeros(bias: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if bias is None else bias


ONNX_ACTIVATIONS = ("silu", "swish", "relu", "gelu", "gelu_new", "gelu_pytorch_tanh")


def refuse_unbuilt(style: Style) -> None:
    """One line naming what this builder does not write, before any node is built."""
    if style.act not in ONNX_ACTIVATIONS:
        raise SearcherError(
            f"the ONNX graph supports {', '.join(ONNX_ACTIVATIONS)} MLPs, not {style.family}'s "
            f"{style.act!r}; time it with --device torch-cpu or torch-cuda"
        )


def build(weights: DecoderWeights, workload: Workload) -> OnnxDecoder:
    """The ONNX graph of ``Decoder(weights, workload)``: same inputs, outputs and arithmetic,
    in float32 (what ONNX Runtime's CPU kernels run)."""
    style = weights.style
    check_style(weights)
    refuse_unbuilt(style)
    b = Builder(np.dtype("float32"))
    wl = workload
    tokens = wl.seq_len if wl.prefill else 1
    first = 0 if wl.prefill else wl.seq_len
    tables, index = rotary_tables(weights, first, tokens)
    # per table: cos, sin and the rotated dims of each head
    ropes = [(b.table(cos, "cos"), b.table(sin, "sin"), cos.shape[-1]) for cos, sin in tables]
    mask = None
    if wl.prefill:
        m = np.triu(np.full((tokens, tokens), np.finfo(b.dtype).min, dtype=b.dtype), 1)
        mask = b.const(m, "mask")
    hidden = weights.hidden
    inputs: list[onnx.ValueInfoProto] = []
    outputs: list[onnx.ValueInfoProto] = []
    elem = TYPES[b.dtype]
    if weights.embed is not None:
        inputs.append(
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, [wl.batch, tokens])
        )
        h = embed(b, weights, slice(first, first + tokens))
    else:
        inputs.append(helper.make_tensor_value_info("hidden_in", elem, [wl.batch, tokens, hidden]))
        h = "hidden_in"
    past: list[onnx.ValueInfoProto] = []
    present: list[onnx.ValueInfoProto] = []
    j = 0
    for (attn, mlp), table in zip(weights.layers, index):
        x = h  # the layer's input, which a parallel MLP reads
        if attn is not None:
            shape = [wl.batch, attn.groups, wl.seq_len, attn.head_dim]
            pk = pv = None
            if not wl.prefill:
                pk, pv = f"past_k_{j}", f"past_v_{j}"
                past += [helper.make_tensor_value_info(n, elem, shape) for n in (pk, pv)]
            rope = ropes[table] if ropes else None
            rope = None if rope is None else (rope[:2], rope[:2], rope[2])
            out, new, _ = attention(
                b, h, attn, weights.eps, style, rope, mask, pk, pv, (wl.batch, tokens)
            )
            h = residual(b, h, out, style)
            for kv, name in zip("kv", new):
                out = f"present_{kv}_{j}"
                b.nodes.append(helper.make_node("Identity", [name], [out]))
                dims = [wl.batch, attn.groups, tokens, attn.head_dim]
                present.append(helper.make_tensor_value_info(out, elem, dims))
            j += 1
        if mlp is not None:
            h = residual(
                b, h, mlp_block(b, x if style.parallel else h, mlp, weights.eps, style), style
            )
    inputs += past
    if weights.head is not None:
        b.nodes.append(
            helper.make_node("Identity", [logits(b, weights, h, tokens - 1)], ["logits"])
        )
        outputs.append(
            helper.make_tensor_value_info("logits", elem, [wl.batch, weights.head.shape[0]])
        )
    else:
        b.nodes.append(helper.make_node("Identity", [h], ["hidden_out"]))
        outputs.append(
            helper.make_tensor_value_info("hidden_out", elem, [wl.batch, tokens, hidden])
        )
    return finish(b, f"searcher-{wl.key}", inputs, outputs + present)


def finish(
    b: Builder, name: str, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]
) -> OnnxDecoder:
    """The model of ``b``'s nodes and initializers."""
    graph = helper.make_graph(b.nodes, name, inputs, outputs, initializer=b.consts + b.externals)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    model.producer_name = "searcher"
    return OnnxDecoder(model, b.weights, [i.name for i in inputs], [o.name for o in outputs])


def embed(b: Builder, weights: DecoderWeights, positions: slice | str) -> str:
    """``input_ids``' embeddings [B, S, hidden], scaled, plus learned positions where the model
    has them: the table's rows ``positions`` (a slice), or gathered by the input it names."""
    style = weights.style
    assert weights.embed is not None
    h = b.op("Gather", b.weight(weights.embed, "embed"), "input_ids")
    if style.embed_scale != 1.0:
        h = b.op("Mul", h, b.scalar(style.embed_scale))
    if weights.positions is not None:
        if isinstance(positions, slice):
            pos = b.weight(weights.positions[positions], "positions")
        else:
            pos = b.op("Gather", b.weight(weights.positions, "positions"), positions)
        h = b.op("Add", h, pos)
    return h


def logits(b: Builder, weights: DecoderWeights, h: str, last: int | None = None) -> str:
    """The final norm and LM head (divisor, softcap) over ``h`` [B, S, hidden]: at position
    ``last`` only ([B, vocab]), or at every position ([B * S, vocab])."""
    style = weights.style
    assert weights.head is not None
    if last is not None:
        h = b.op("Gather", h, b.const(np.array(last, dtype=np.int64)), axis=1)
    if weights.final_norm is not None:
        h = b.norm(h, weights.final_norm, weights.eps, style.norm, weights.final_norm_bias)
    if last is None:
        h = b.op("Reshape", h, b.const([-1, weights.hidden]))
    out = b.op("Gemm", h, b.weight(weights.head, "head"), transB=1)  # tied: the embedding
    if style.logits_divisor != 1.0:
        out = b.op("Div", out, b.scalar(style.logits_divisor))
    if style.logits_softcap is not None:
        out = b.softcap(out, style.logits_softcap)
    return out


def residual(b: Builder, h: str, out: str, style: Style) -> str:
    if style.residual_scale != 1.0:
        out = b.op("Mul", out, b.scalar(style.residual_scale))
    return b.op("Add", h, out)


Rope = tuple[tuple[str, str], tuple[str, str], int]


def attention(
    b: Builder, h: str, w: AttentionWeights, eps: float, style: Style, rope: Rope | None,
    mask: str | None, pk: str | None, pv: str | None, shape: tuple[int, int] = (0, 0),
) -> tuple[str, tuple[str, str], tuple[str, str]]:  # fmt: skip
    """The block's output (before the residual add), its new K and V, and the whole cache
    (``pk``/``pv``, where given, then the new K/V) [B, g, past + S, hd]. ``rope``: cos and sin
    shaped for the queries [.., S, dims] and for the keys, and the rotated dims; ``mask``: added
    to the scores; ``shape``: batch and tokens (0: as the input's)."""
    batch, tokens = shape
    g, r, hd = w.groups, w.group_size, w.head_dim
    x = h if w.norm is None else b.norm(h, w.norm, eps, style.norm, w.norm_bias)
    q = b.linear(x, w.q, w.q_bias, "q")
    k = b.linear(x, w.k, w.k_bias, "k")
    v = b.linear(x, w.v, w.v_bias, "v")
    across = style.qk_norm == "all"
    if across and w.q_norm is not None:
        q = b.norm(q, w.q_norm, eps, style.norm)
    if across and w.k_norm is not None:
        k = b.norm(k, w.k_norm, eps, style.norm)
    q = b.op("Reshape", q, b.const([batch, tokens, g, r, hd]))  # 0: that dim of the input
    k = b.op("Reshape", k, b.const([batch, tokens, g, hd]))
    v = b.op("Reshape", v, b.const([batch, tokens, g, hd]))
    if not across and w.q_norm is not None:
        q = b.norm(q, w.q_norm, eps, style.norm)
    if not across and w.k_norm is not None:
        k = b.norm(k, w.k_norm, eps, style.norm)
    q = b.op("Transpose", q, perm=[0, 2, 3, 1, 4])  # [B, g, r, S, hd]
    k = b.op("Transpose", k, perm=[0, 2, 1, 3])  # [B, g, S, hd]
    v = b.op("Transpose", v, perm=[0, 2, 1, 3])
    if rope is not None:
        (cq, sq), (ck, sk), dims = rope
        q = b.rotary(q, cq, sq, dims, hd)
        k = b.rotary(k, ck, sk, dims, hd)
    keys, values = k, v
    if pk is not None:
        keys = b.op("Concat", pk, k, axis=2)
        values = b.op("Concat", pv, v, axis=2)
    two = b.const([2])
    kt = b.op("Transpose", b.op("Unsqueeze", keys, two), perm=[0, 1, 2, 4, 3])
    scale = w.scale if w.scale is not None else style.score_scale
    scores = b.op("Mul", b.op("MatMul", q, kt), b.scalar(hd**-0.5 if scale is None else scale))
    if style.attn_softcap is not None:
        scores = b.softcap(scores, style.attn_softcap)
    if mask is not None:
        scores = b.op("Add", scores, mask)
    probs = b.op("Softmax", scores, axis=-1)
    out = b.op("MatMul", probs, b.op("Unsqueeze", values, two))  # [B, g, r, S, hd]
    out = b.op("Transpose", out, perm=[0, 3, 1, 2, 4])
    out = b.op("Reshape", out, b.const([batch, tokens, g * r * hd]))
    out = b.linear(out, w.o, w.o_bias, "o")
    if w.post_norm is not None:
        out = b.norm(out, w.post_norm, eps, style.norm)
    return out, (k, v), (keys, values)


def mlp_block(b: Builder, h: str, w: MLPWeights, eps: float, style: Style) -> str:
    """The block's output (before the residual add)."""
    x = h if w.norm is None else b.norm(h, w.norm, eps, style.norm, w.norm_bias)
    u = b.linear(x, w.up, w.up_bias, "up")
    if w.gate is None:
        act = b.activation(u, style.act)
    else:
        act = b.op("Mul", b.activation(b.linear(x, w.gate, w.gate_bias, "gate"), style.act), u)
    out = b.linear(act, w.down, w.down_bias, "down")
    return out if w.post_norm is None else b.norm(out, w.post_norm, eps, style.norm)
