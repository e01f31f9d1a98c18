"""The lean decoder (``latency_models.graph``) written directly as an ONNX graph.

Exporting through torch takes about 10 s for the 30-layer embedded model even without weights
(TorchScript tracing and its passes), which is most of the cost of measuring one candidate.
The graph is regular, so it is built here node by node in milliseconds; the weights are
handed to ONNX Runtime from memory as external initializers, never serialised. Tests check
that it computes what the torch decoder computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from latency_models.graph import AttentionWeights, DecoderWeights, MLPWeights
from latency_models.workload import Workload

OPSET = 17
_TYPES = {np.dtype("float32"): TensorProto.FLOAT}


@dataclass
class OnnxDecoder:
    model: onnx.ModelProto
    weights: dict[str, np.ndarray]  # external initializers, by name
    inputs: list[str]
    outputs: list[str]

    def save(self, path: str) -> None:
        """A self-contained .onnx file (weights embedded; external data past 2 GB)."""
        from onnx import numpy_helper

        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        kept = [t for t in model.graph.initializer if not _is_external(t)]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        model.graph.initializer.extend(
            numpy_helper.from_array(a, name) for name, a in self.weights.items()
        )
        big = sum(a.nbytes for a in self.weights.values()) > 2**31 - 2**26
        onnx.save_model(model, path, save_as_external_data=big)


def _is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


@dataclass
class _Builder:
    dtype: np.dtype
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    consts: list[TensorProto] = field(default_factory=list)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    externals: list[TensorProto] = field(default_factory=list)
    n: int = 0

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
        self.consts.append(onnx.numpy_helper.from_array(arr, name))
        return name

    def weight(self, t: torch.Tensor, hint: str, transpose: bool = False) -> str:
        """A weight handed to ONNX Runtime from memory (transposed for MatMul if asked)."""
        arr = t.detach().to("cpu", torch.float32).numpy().astype(self.dtype, copy=False)
        arr = np.ascontiguousarray(arr.T if transpose else arr)
        name = self.name(hint)
        self.weights[name] = arr
        proto = TensorProto(name=name, data_type=_TYPES[arr.dtype], dims=arr.shape)
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "memory"), ("offset", "0"), ("length", str(arr.nbytes))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        self.externals.append(proto)
        return name

    def scalar(self, value: float) -> str:
        return self.const(np.array(value, dtype=self.dtype))

    def linear(self, x: str, w: torch.Tensor, bias: torch.Tensor | None, hint: str) -> str:
        y = self.op("MatMul", x, self.weight(w, hint, transpose=True), hint=hint)
        return y if bias is None else self.op("Add", y, self.weight(bias, f"{hint}_b"))

    def norm(self, x: str, w: torch.Tensor, eps: float) -> str:
        sq = self.op("Mul", x, x)
        ms = self.op("ReduceMean", sq, axes=[-1], keepdims=1)
        r = self.op("Sqrt", self.op("Add", ms, self.scalar(eps)))
        return self.op("Mul", self.op("Div", x, r), self.weight(w, "norm"))

    def rotate(self, x: str, cos: str, sin: str, half: int) -> str:
        axes = self.const([-1])
        lo = self.op("Slice", x, self.const([0]), self.const([half]), axes)
        hi = self.op("Slice", x, self.const([half]), self.const([2 * half]), axes)
        rot = self.op("Concat", self.op("Neg", hi), lo, axis=-1)
        return self.op("Add", self.op("Mul", x, cos), self.op("Mul", rot, sin))


def build(weights: DecoderWeights, workload: Workload) -> OnnxDecoder:
    """The ONNX graph of ``Decoder(weights, workload)``: same inputs, outputs and arithmetic,
    in float32 (what ONNX Runtime's CPU kernels run)."""
    b = _Builder(np.dtype("float32"))
    wl = workload
    tokens = wl.seq_len if wl.prefill else 1
    first = 0 if wl.prefill else wl.seq_len
    cos_t, sin_t = weights.rotary(first, tokens)
    cos = b.const(cos_t.detach().cpu().float().numpy().astype(b.dtype), "cos")
    sin = b.const(sin_t.detach().cpu().float().numpy().astype(b.dtype), "sin")
    mask = None
    if wl.prefill:
        m = np.triu(np.full((tokens, tokens), np.finfo(b.dtype).min, dtype=b.dtype), 1)
        mask = b.const(m, "mask")
    hidden = weights.hidden
    inputs: list[onnx.ValueInfoProto] = []
    outputs: list[onnx.ValueInfoProto] = []
    elem = _TYPES[b.dtype]
    if weights.embed is not None:
        inputs.append(
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, [wl.batch, tokens])
        )
        embed = b.weight(weights.embed, "embed")
        h = b.op("Gather", embed, "input_ids")
    else:
        inputs.append(helper.make_tensor_value_info("hidden_in", elem, [wl.batch, tokens, hidden]))
        h = "hidden_in"
    past: list[onnx.ValueInfoProto] = []
    present: list[onnx.ValueInfoProto] = []
    j = 0
    for attn, mlp in weights.layers:
        if attn is not None:
            shape = [wl.batch, attn.groups, wl.seq_len, attn.head_dim]
            pk = pv = None
            if not wl.prefill:
                pk, pv = f"past_k_{j}", f"past_v_{j}"
                past += [helper.make_tensor_value_info(n, elem, shape) for n in (pk, pv)]
            h, k, v = _attention(b, h, attn, weights.eps, cos, sin, mask, pk, pv, wl.batch, tokens)
            for kv, name in (("k", k), ("v", v)):
                out = f"present_{kv}_{j}"
                b.nodes.append(helper.make_node("Identity", [name], [out]))
                dims = [wl.batch, attn.groups, tokens, attn.head_dim]
                present.append(helper.make_tensor_value_info(out, elem, dims))
            j += 1
        if mlp is not None:
            h = _mlp(b, h, mlp, weights.eps)
    inputs += past
    if weights.head is not None:
        last = b.op("Gather", h, b.const(np.array(tokens - 1, dtype=np.int64)), axis=1)
        last = b.norm(last, weights.final_norm, weights.eps)
        tied = weights.head is weights.embed
        head = embed if tied else b.weight(weights.head, "head")
        b.nodes.append(helper.make_node("Gemm", [last, head], ["logits"], transB=1))
        outputs.append(
            helper.make_tensor_value_info("logits", elem, [wl.batch, weights.head.shape[0]])
        )
    else:
        b.nodes.append(helper.make_node("Identity", [h], ["hidden_out"]))
        outputs.append(
            helper.make_tensor_value_info("hidden_out", elem, [wl.batch, tokens, hidden])
        )
    outputs += present
    graph = helper.make_graph(
        b.nodes, f"searcher-{wl.key}", inputs, outputs, initializer=b.consts + b.externals
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return OnnxDecoder(model, b.weights, [i.name for i in inputs], [o.name for o in outputs])


def _attention(
    b: _Builder, h: str, w: AttentionWeights, eps: float, cos: str, sin: str,
    mask: str | None, pk: str | None, pv: str | None, batch: int, tokens: int,
) -> tuple[str, str, str]:  # fmt: skip
    g, r, hd = w.groups, w.group_size, w.head_dim
    x = b.norm(h, w.norm, eps)
    q = b.linear(x, w.q, w.q_bias, "q")
    k = b.linear(x, w.k, w.k_bias, "k")
    v = b.linear(x, w.v, w.v_bias, "v")
    q = b.op("Reshape", q, b.const([batch, tokens, g, r, hd]))
    k = b.op("Reshape", k, b.const([batch, tokens, g, hd]))
    v = b.op("Reshape", v, b.const([batch, tokens, g, hd]))
    if w.q_norm is not None:
        q = b.norm(q, w.q_norm, eps)
    if w.k_norm is not None:
        k = b.norm(k, w.k_norm, eps)
    q = b.op("Transpose", q, perm=[0, 2, 3, 1, 4])
    k = b.op("Transpose", k, perm=[0, 2, 1, 3])
    v = b.op("Transpose", v, perm=[0, 2, 1, 3])
    q = b.rotate(q, cos, sin, hd // 2)
    k = b.rotate(k, cos, sin, hd // 2)
    keys, values = k, v
    if pk is not None:
        keys = b.op("Concat", pk, k, axis=2)
        values = b.op("Concat", pv, v, axis=2)
    two = b.const([2])
    kt = b.op("Transpose", b.op("Unsqueeze", keys, two), perm=[0, 1, 2, 4, 3])
    scores = b.op("Mul", b.op("MatMul", q, kt), b.scalar(hd**-0.5))
    if mask is not None:
        scores = b.op("Add", scores, mask)
    probs = b.op("Softmax", scores, axis=-1)
    out = b.op("MatMul", probs, b.op("Unsqueeze", values, two))
    out = b.op("Transpose", out, perm=[0, 3, 1, 2, 4])
    out = b.op("Reshape", out, b.const([batch, tokens, g * r * hd]))
    return b.op("Add", h, b.linear(out, w.o, w.o_bias, "o")), k, v


def _mlp(b: _Builder, h: str, w: MLPWeights, eps: float) -> str:
    x = b.norm(h, w.norm, eps)
    a = b.linear(x, w.gate, None, "gate")
    u = b.linear(x, w.up, None, "up")
    act = b.op("Mul", b.op("Mul", a, b.op("Sigmoid", a)), u)
    return b.op("Add", h, b.linear(act, w.down, None, "down"))
