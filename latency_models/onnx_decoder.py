"""The lean decoder as one deployable ONNX graph: dynamic batch, sequence and cache lengths,
prefill and decode in the same graph, with the input and output names stock runtimes use
(Hugging Face Optimum's and onnxruntime-genai's decoder convention).

Inputs: ``input_ids`` [batch, seq] int64, ``attention_mask`` [batch, past + seq] int64 (1 for a
real token, 0 for padding), ``position_ids`` [batch, seq] int64, and for each layer N whose
attention is kept ``past_key_values.N.key`` / ``.value`` [batch, kv_heads_N, past, head_dim]
(past may be 0: an empty cache). Outputs: ``logits`` [batch, seq, vocab] and
``present.N.key`` / ``.value`` [batch, kv_heads_N, past + seq, head_dim]. N is the layer's
index in the model; a layer whose attention was removed has no cache, so its N is absent, and
each layer's KV head count is its own (static) pruned count.

Attention is causal (by cache index, as Hugging Face's masks are) and honours the padding in
``attention_mask``; a layer with a sliding window attends to the last ``window`` cache slots
only. Rotary cos/sin are gathered by ``position_ids`` from tables of ``max_positions`` rows;
learned positions (GPT-2, OPT) are gathered from the model's own table. Everything a family's
``Style`` says (norms, softcaps, multipliers, parallel residual, partial rotary) is the fixed-
shape latency graph's (``latency_models.onnx_graph``), whose builder pieces this module shares.

Weights are stored once each (a tied embedding and LM head is one initializer, gathered for
the embedding and multiplied by with ``Gemm(transB=1)`` for the head), in float32, inside the
.onnx file, or beside it in ``<name>.data`` past protobuf's 2 GB.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from latency_models.graph import AttentionWeights, DecoderWeights, Style, check_style, rotary_tables
from latency_models.onnx_graph import (
    _TYPES,
    OPSET,
    OnnxDecoder,
    _Builder,
    _is_external,
    _mlp,
    _refuse_unbuilt,
    _residual,
)
from searcher.errors import SearcherError

BATCH, SEQ, PAST = "batch_size", "sequence_length", "past_sequence_length"
TOTAL = "total_sequence_length"
INPUTS = ("input_ids", "attention_mask", "position_ids")
EXTERNAL_OVER = 2**31 - 2**26  # bytes of weights past which they go to <name>.data


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


@dataclass
class _Once(_Builder):
    """A builder that stores each tensor once however many nodes read it (a tied head, the
    one norm both blocks of a parallel Falcon layer read)."""

    seen: dict[tuple[int, bool], tuple[torch.Tensor, str]] = field(default_factory=dict)

    def weight(self, t: torch.Tensor, hint: str, transpose: bool = False) -> str:
        key = (id(t), transpose)  # the tensor is kept in ``seen``: its id is not reused
        if key not in self.seen:
            self.seen[key] = (t, super().weight(t, hint, transpose))
        return self.seen[key][1]


def build_decoder(weights: DecoderWeights, max_positions: int | None = None) -> OnnxDecoder:
    """The graph of ``weights`` (with its embedding and head) for any batch, sequence and cache
    length. ``max_positions``: rows of the rotary tables (the model's max_position_embeddings;
    needed where the model has rotary attention)."""
    style = weights.style
    check_style(weights)
    _refuse_unbuilt(style)
    if weights.embed is None or weights.head is None:
        raise SearcherError("the deployable ONNX graph needs the model's embedding and head")
    b = _Once(np.dtype("float32"))
    elem = _TYPES[b.dtype]
    tables: list[tuple[torch.Tensor, torch.Tensor]] = []
    index = [0] * len(weights.layers)
    if style.rotary_dims != 0:
        if not max_positions:
            raise SearcherError(
                f"{style.family}: the model's config gives no max_position_embeddings, which "
                "sizes the ONNX graph's rotary tables"
            )
        tables, index = _rotary(weights, max_positions)
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [BATCH, SEQ]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [BATCH, TOTAL]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, [BATCH, SEQ]),
    ]
    outputs: list[onnx.ValueInfoProto] = []
    embed = b.weight(weights.embed, "embed")
    h = b.op("Gather", embed, "input_ids")  # [B, S, hidden]
    if style.embed_scale != 1.0:
        h = b.op("Mul", h, b.scalar(style.embed_scale))
    if weights.positions is not None:
        h = b.op("Add", h, b.op("Gather", b.weight(weights.positions, "positions"), "position_ids"))
    ropes = _ropes(b, tables)
    windows = {a.sliding_window for a, _ in weights.layers if a is not None}
    masks = _masks(b, windows)
    present: list[onnx.ValueInfoProto] = []
    for i, ((attn, mlp), table) in enumerate(zip(weights.layers, index)):
        x = h  # the layer's input, which a parallel MLP reads
        if attn is not None:
            pk, pv = past_names(i)
            shape = [BATCH, attn.groups, PAST, attn.head_dim]
            inputs += [helper.make_tensor_value_info(n, elem, shape) for n in (pk, pv)]
            rope = ropes[table] if ropes else None
            mask = masks[attn.sliding_window]
            out, keys, values = _attention(b, h, attn, weights.eps, style, rope, mask, pk, pv)
            h = _residual(b, h, out, style)
            for name, t in zip(present_names(i), (keys, values)):
                b.nodes.append(helper.make_node("Identity", [t], [name]))
                dims = [BATCH, attn.groups, TOTAL, attn.head_dim]
                present.append(helper.make_tensor_value_info(name, elem, dims))
        if mlp is not None:
            h = _residual(b, h, _mlp(b, x if style.parallel else h, mlp, weights.eps, style), style)
    if weights.final_norm is not None:
        h = b.norm(h, weights.final_norm, weights.eps, style.norm, weights.final_norm_bias)
    vocab = weights.head.shape[0]
    flat = b.op("Reshape", h, b.const([-1, weights.hidden]))
    logits = b.op("Gemm", flat, b.weight(weights.head, "head"), transB=1)  # tied: the embed
    if style.logits_divisor != 1.0:
        logits = b.op("Div", logits, b.scalar(style.logits_divisor))
    if style.logits_softcap is not None:
        logits = b.softcap(logits, style.logits_softcap)
    shape = b.op("Concat", b.op("Shape", "input_ids"), b.const([vocab]), axis=0)
    b.nodes.append(helper.make_node("Reshape", [logits, shape], ["logits"]))
    outputs.append(helper.make_tensor_value_info("logits", elem, [BATCH, SEQ, vocab]))
    outputs += present
    graph = helper.make_graph(
        b.nodes, "searcher-decoder", inputs, outputs, initializer=b.consts + b.externals
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    model.producer_name = "searcher"
    return OnnxDecoder(model, b.weights, [i.name for i in inputs], [o.name for o in outputs])


def _rotary(
    weights: DecoderWeights, positions: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[int]]:
    """``rotary_tables`` over positions 0 .. positions - 1, each row as the model computes it
    for a sequence that reaches that position (``_by_position``)."""
    tables, index = rotary_tables(weights, 0, positions)
    fns = [weights.rotary]  # in rotary_tables' order
    for attn, _ in weights.layers:
        fn = weights.rotary if attn is None or attn.rotary is None else attn.rotary
        if fn not in fns:
            fns.append(fn)
    return [_by_position(fn, t, positions) for fn, t in zip(fns, tables)], index


def _by_position(fn: Any, table: tuple[torch.Tensor, torch.Tensor], positions: int):
    """A rotary table whose rows do not depend on how long the sequence is. Most rotaries'
    don't; a long-context one (Phi-3's longrope) switches its frequencies for the whole
    sequence once it passes the pretraining length, so a table made in one call over every
    position has the long frequencies from position 0. Then rows below the switch come from
    the short regime and the rest from the long one: exact for sequences under the switch,
    and past it what cached decoding computes (earlier keys keep their rotation)."""

    def short(n: int) -> bool:  # positions 0 and 1 rotated as for a sequence of 2
        cos, sin = fn(0, n)
        return bool(torch.allclose(cos[:2], first[0], rtol=0, atol=1e-6)) and bool(
            torch.allclose(sin[:2], first[1], rtol=0, atol=1e-6)
        )

    first = fn(0, 2)
    if positions <= 2 or short(positions):
        fn(0, 2)  # leave a stateful rotary module in its short regime
        return table
    lo, hi = 2, positions  # short(lo), not short(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if short(mid) else (lo, mid)
    below = fn(0, lo)
    fn(0, 2)
    return tuple(torch.cat([s[:lo], t[lo:]]) for s, t in zip(below, table))


def _ropes(b: _Builder, tables: list[tuple[torch.Tensor, torch.Tensor]]):
    """Per rotary table: cos and sin gathered by position_ids, shaped for the queries
    [B, 1, 1, S, dims] and for the keys [B, 1, S, dims], and the rotated dims."""
    out = []
    for cos, sin in tables:
        cs = [
            b.op("Gather", b.table(t, name), "position_ids")
            for t, name in ((cos, "cos"), (sin, "sin"))
        ]
        q = [b.op("Unsqueeze", t, b.const([1, 2])) for t in cs]
        k = [b.op("Unsqueeze", t, b.const([1])) for t in cs]
        out.append((q, k, cos.shape[-1]))
    return out


def _masks(b: _Builder, windows: set[int | None]) -> dict[int | None, str]:
    """Additive masks [B, 1, 1, S, past + S] (0 where a query may attend, the dtype's lowest
    where not), one per sliding window (None: none). Query i of the S new tokens sits at cache
    index past + i; key j is visible when j <= past + i, attention_mask[b, j] is 1 and, with a
    window w, j > past + i - w (Hugging Face's sliding-window rule)."""
    one, zero_i = b.const(np.array(1, np.int64)), b.const(np.array(0, np.int64))
    first = b.const([0])
    seq = b.op("Squeeze", b.op("Shape", "input_ids", start=1, end=2), first)
    total = b.op("Squeeze", b.op("Shape", "attention_mask", start=1, end=2), first)
    keys = b.op("Range", zero_i, total, one)  # [T]
    queries = b.op("Unsqueeze", b.op("Range", b.op("Sub", total, seq), total, one), b.const([1]))
    causal = b.op("LessOrEqual", keys, queries)  # [S, T]
    real = b.op("Cast", b.op("Unsqueeze", "attention_mask", b.const([1])), to=TensorProto.BOOL)
    zero, low = b.scalar(0.0), b.scalar(float(np.finfo(b.dtype).min))
    out = {}
    for w in sorted(windows, key=lambda w: (w is not None, w or 0)):
        allowed = causal
        if w is not None:
            start = b.op("Sub", queries, b.const(np.array(w, np.int64)))
            allowed = b.op("And", allowed, b.op("Greater", keys, start))
        allowed = b.op("And", allowed, real)  # [B, S, T]
        out[w] = b.op("Unsqueeze", b.op("Where", allowed, zero, low), b.const([1, 2]))
    return out


def _attention(
    b: _Builder, h: str, w: AttentionWeights, eps: float, style: Style, rope: Any, mask: str,
    pk: str, pv: str,
) -> tuple[str, str, str]:  # fmt: skip
    """The block's output (before the residual add) and the whole cache: past then new K/V."""
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
    q = b.op("Reshape", q, b.const([0, 0, g, r, hd]))  # 0: that dim of the input
    k = b.op("Reshape", k, b.const([0, 0, g, hd]))
    v = b.op("Reshape", v, b.const([0, 0, g, hd]))
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
    keys = b.op("Concat", pk, k, axis=2)  # [B, g, past + S, hd]
    values = b.op("Concat", pv, v, axis=2)
    two = b.const([2])
    kt = b.op("Transpose", b.op("Unsqueeze", keys, two), perm=[0, 1, 2, 4, 3])
    scale = w.scale if w.scale is not None else style.score_scale
    scores = b.op("Mul", b.op("MatMul", q, kt), b.scalar(hd**-0.5 if scale is None else scale))
    if style.attn_softcap is not None:
        scores = b.softcap(scores, style.attn_softcap)
    probs = b.op("Softmax", b.op("Add", scores, mask), axis=-1)
    out = b.op("MatMul", probs, b.op("Unsqueeze", values, two))  # [B, g, r, S, hd]
    out = b.op("Transpose", out, perm=[0, 3, 1, 2, 4])
    out = b.op("Reshape", out, b.const([0, 0, g * r * hd]))
    out = b.linear(out, w.o, w.o_bias, "o")
    if w.post_norm is not None:
        out = b.norm(out, w.post_norm, eps, style.norm)
    return out, keys, values


def save_decoder(decoder: OnnxDecoder, path: Path, external: bool | None = None) -> list[Path]:
    """Write the graph with its weights to ``path``, and past 2 GB of weights (or where
    ``external`` says so) the weights to ``<path name>.data`` beside it, written straight from
    their arrays (tensors of 1 MB and more at 64 KB offsets, which runtimes can map). Returns
    the files."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    if external is None:
        external = sum(a.nbytes for a in decoder.weights.values()) > EXTERNAL_OVER
    model = onnx.ModelProto()
    model.CopyFrom(decoder.model)
    kept = [t for t in model.graph.initializer if not _is_external(t)]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    data.unlink(missing_ok=True)
    if not external:
        model.graph.initializer.extend(
            numpy_helper.from_array(a, name) for name, a in decoder.weights.items()
        )
        onnx.save_model(model, str(path))
        return [path]
    with open(data, "wb") as f:
        for name, a in decoder.weights.items():
            if a.nbytes >= 2**20 and f.tell() % 2**16:
                f.write(bytes(2**16 - f.tell() % 2**16))
            offset = f.tell()
            a.tofile(f)
            t = TensorProto(name=name, data_type=_TYPES[a.dtype], dims=a.shape)
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", offset), ("length", a.nbytes)):
                entry = t.external_data.add()
                entry.key, entry.value = key, str(value)
            model.graph.initializer.append(t)
    onnx.save_model(model, str(path))
    return [path, data]
