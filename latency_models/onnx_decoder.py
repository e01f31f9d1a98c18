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
.onnx file, or past protobuf's 2 GB (counting the rotary tables) beside it in ``<name>.data``
(``OnnxDecoder.save``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from latency_models.graph import DecoderWeights, check_style, rotary_functions, rotary_tables
from latency_models.onnx_graph import (
    TYPES,
    Builder,
    OnnxDecoder,
    attention,
    embed,
    finish,
    logits,
    mlp_block,
    refuse_unbuilt,
    residual,
)
from searcher.errors import SearcherError

BATCH, SEQ, PAST = "batch_size", "sequence_length", "past_sequence_length"
TOTAL = "total_sequence_length"
INPUTS = ("input_ids", "attention_mask", "position_ids")


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


def build_decoder(weights: DecoderWeights, max_positions: int | None = None) -> OnnxDecoder:
    """The graph of ``weights`` (with its embedding and head) for any batch, sequence and cache
    length. ``max_positions``: rows of the rotary tables (the model's max_position_embeddings;
    needed where the model has rotary attention)."""
    style = weights.style
    check_style(weights)
    refuse_unbuilt(style)
    if weights.embed is None or weights.head is None:
        raise SearcherError("the deployable ONNX graph needs the model's embedding and head")
    b = Builder(np.dtype("float32"))
    elem = TYPES[b.dtype]
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
    h = embed(b, weights, "position_ids")  # [B, S, hidden]
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
            out, _, cache = attention(b, h, attn, weights.eps, style, rope, mask, pk, pv)
            h = residual(b, h, out, style)
            for name, t in zip(present_names(i), cache):
                b.nodes.append(helper.make_node("Identity", [t], [name]))
                dims = [BATCH, attn.groups, TOTAL, attn.head_dim]
                present.append(helper.make_tensor_value_info(name, elem, dims))
        if mlp is not None:
            h = residual(
                b, h, mlp_block(b, x if style.parallel else h, mlp, weights.eps, style), style
            )
    out = logits(b, weights, h)  # [B * S, vocab]
    vocab = weights.head.shape[0]
    shape = b.op("Concat", b.op("Shape", "input_ids"), b.const([vocab]), axis=0)
    b.nodes.append(helper.make_node("Reshape", [out, shape], ["logits"]))
    logit = helper.make_tensor_value_info("logits", elem, [BATCH, SEQ, vocab])
    return finish(b, "searcher-decoder", inputs, [logit, *present])


def _rotary(
    weights: DecoderWeights, positions: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[int]]:
    """``rotary_tables`` over positions 0 .. positions - 1, each row as the model computes it
    for a sequence that reaches that position (``_by_position``)."""
    tables, index = rotary_tables(weights, 0, positions)
    fns, _ = rotary_functions(weights)  # in rotary_tables' order
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


def _ropes(b: Builder, tables: list[tuple[torch.Tensor, torch.Tensor]]):
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


def _masks(b: Builder, windows: set[int | None]) -> dict[int | None, str]:
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
