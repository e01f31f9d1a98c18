"""The lean graph for every supported family: the torch decoder computes what the Hugging Face
model computes (eager attention, float32) for dense, per-layer pruned and dropped blocks, and
the ONNX graph computes what the torch decoder computes (or refuses in one line).

Tiny random models: 3 layers, GQA groups of 3 query heads where the family has GQA, head_dim
!= hidden / heads where the family allows it, biases where it has them, tied and untied heads.
Norm weights and biases are drawn at random too, so that a misplaced norm or bias shows. Each
model's lean weights come from its family (``Family.lean``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from latency_models import graph
from latency_models.backends import ort_options
from latency_models.graph import Decoder, DecoderWeights, MLPWeights, Style
from latency_models.onnx_graph import build
from latency_models.workload import Workload
from searcher.errors import SearcherError
from searcher.families import family_for, family_of

VOCAB, S, B = 128, 8, 2
TOL = dict(atol=1e-4, rtol=1e-4)
GQA = dict(
    vocab_size=VOCAB, hidden_size=72, num_hidden_layers=3, num_attention_heads=6,
    num_key_value_heads=2, head_dim=16, intermediate_size=96, max_position_embeddings=64,
)  # fmt: skip
MHA = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=64,
)  # fmt: skip
# Falcon: head_dim is hidden / heads; 6 heads of 16 dims
FALCON = dict(
    vocab_size=VOCAB, hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
    ffn_hidden_size=96, max_position_embeddings=64, alibi=False, bos_token_id=0,
    eos_token_id=0,
)  # fmt: skip
# Sliding windows longer than any sequence here (S + 1): the graph does not apply them.
WINDOW = 32


def _config(family: str):
    import transformers as tf

    configs: dict[str, Callable[[], object]] = {
        "llama": lambda: tf.LlamaConfig(**GQA, tie_word_embeddings=True),
        "mistral": lambda: tf.MistralConfig(**GQA, tie_word_embeddings=False),
        "qwen2": lambda: tf.Qwen2Config(**GQA, tie_word_embeddings=False),
        "qwen3": lambda: tf.Qwen3Config(**GQA, tie_word_embeddings=True),
        "granite": lambda: tf.GraniteConfig(
            **GQA, embedding_multiplier=2.0, attention_multiplier=0.3, residual_multiplier=0.5,
            logits_scaling=4.0, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
        ),
        "olmo2": lambda: tf.Olmo2Config(**GQA, tie_word_embeddings=False, pad_token_id=0),
        "gemma": lambda: tf.GemmaConfig(**GQA, tie_word_embeddings=True),
        "gemma2": lambda: tf.Gemma2Config(
            **GQA, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0, sliding_window=WINDOW, tie_word_embeddings=True,
        ),
        "gemma3_text": lambda: tf.Gemma3TextConfig(
            **GQA, sliding_window=WINDOW, final_logit_softcapping=3.0, tie_word_embeddings=False,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
        "phi3": lambda: tf.Phi3Config(
            **GQA, partial_rotary_factor=0.5, pad_token_id=0, tie_word_embeddings=False
        ),
        "gpt2": lambda: tf.GPT2Config(
            n_embd=64, n_head=4, n_layer=3, n_positions=64, vocab_size=VOCAB, n_inner=96,
            bos_token_id=0, eos_token_id=0,
        ),
        "gpt2_inverse_scale": lambda: tf.GPT2Config(
            n_embd=64, n_head=4, n_layer=3, n_positions=64, vocab_size=VOCAB, n_inner=96,
            bos_token_id=0, eos_token_id=0, scale_attn_by_inverse_layer_idx=True,
            tie_word_embeddings=False,
        ),
        "gpt_neox": lambda: tf.GPTNeoXConfig(
            **MHA, intermediate_size=96, rotary_pct=0.5, use_parallel_residual=True,
            bos_token_id=0, eos_token_id=0,
        ),
        "gpt_neox_sequential": lambda: tf.GPTNeoXConfig(
            **MHA, intermediate_size=96, rotary_pct=0.25, use_parallel_residual=False,
            tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
        ),
        "opt": lambda: tf.OPTConfig(
            **MHA, ffn_dim=96, word_embed_proj_dim=64, bos_token_id=0, eos_token_id=0,
            pad_token_id=1,
        ),
        # Falcon 40B's layout: fused rows group by group, ln_attn / ln_mlp, parallel blocks
        "falcon": lambda: tf.FalconConfig(
            **FALCON, new_decoder_architecture=True, num_kv_heads=2, bias=True,
            tie_word_embeddings=False,
        ),
        # Falcon 7B's: all queries then one key and value, one norm read by both blocks
        "falcon_multi_query": lambda: tf.FalconConfig(
            **FALCON, new_decoder_architecture=False, multi_query=True, parallel_attn=True,
            bias=False, tie_word_embeddings=True,
        ),
        # neither: per-head q, k, v rows, sequential blocks with post_attention_layernorm
        "falcon_sequential": lambda: tf.FalconConfig(
            **FALCON, new_decoder_architecture=False, multi_query=False, parallel_attn=False,
            bias=True, tie_word_embeddings=False,
        ),
    }  # fmt: skip
    return configs[family]()


FAMILIES = [
    "llama", "mistral", "qwen2", "qwen3", "granite", "olmo2", "gemma", "gemma2", "gemma3_text",
    "phi3", "gpt2", "gpt2_inverse_scale", "gpt_neox", "gpt_neox_sequential", "opt", "falcon",
    "falcon_multi_query", "falcon_sequential",
]  # fmt: skip


def tiny(family: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(family), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
            else:  # norm weights around 1, biases around 0
                p.normal_(0.0 if "bias" in name else 1.0, 0.1)
    return model.eval().requires_grad_(False)


def lean_of(model: nn.Module) -> DecoderWeights:
    """The model's lean weights, as its family reads them."""
    return family_of(model).lean(model)


def _kind(model: nn.Module) -> str:
    return model.config.model_type


def _layers(model: nn.Module) -> nn.ModuleList:
    kind = _kind(model)
    if kind in ("gpt2", "falcon"):
        return model.transformer.h
    if kind == "gpt_neox":
        return model.gpt_neox.layers
    if kind == "opt":
        return model.model.decoder.layers
    return model.model.layers


def _attn_name(model: nn.Module) -> str:
    names = {"gpt2": "attn", "gpt_neox": "attention", "falcon": "self_attention"}
    return names.get(_kind(model), "self_attn")


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (B, S), generator=g), torch.randint(
        0, VOCAB, (B, 1), generator=g
    )


def _hf(model: nn.Module, ids: torch.Tensor, nxt: torch.Tensor):
    """Last-token logits of the prefill, each layer's K/V (None where attention is dropped),
    and the logits of the next token (a full forward over S + 1 tokens)."""
    with torch.no_grad():
        pre = model(ids, use_cache=True)
        full = model(torch.cat([ids, nxt], dim=1), use_cache=False).logits[:, -1]
    cache = pre.past_key_values
    kv = []
    for i, layer in enumerate(_layers(model)):
        live = any(True for _ in getattr(layer, _attn_name(model)).parameters())
        kv.append((_kv_heads(model, cache.layers[i].keys), _kv_heads(model, cache.layers[i].values))
                  if live else None)  # fmt: skip
    return pre.logits[:, -1], kv, full


def _kv_heads(model: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A cached K or V [B, heads, S, hd] with one head per KV group. Falcon's new
    architecture caches each group's key and value once per query head: the copies are
    checked equal and one kept (the lean graph caches one per group)."""
    cfg = model.config
    if _kind(model) != "falcon" or not cfg.new_decoder_architecture:
        return t
    r = cfg.num_attention_heads // cfg.num_kv_heads
    b, heads, s, hd = t.shape
    copies = t.view(b, heads // r, r, s, hd)
    torch.testing.assert_close(copies, copies[:, :, :1].expand_as(copies), atol=0, rtol=0)
    return copies[:, :, 0]


def _lean(weights: DecoderWeights, ids: torch.Tensor, nxt: torch.Tensor):
    with torch.no_grad():
        out = Decoder(weights, Workload("prefill", B, S)).eval()(ids)
        step = Decoder(weights, Workload("decode", B, S)).eval()(nxt, *out[1:])
    return out, step


def _assert_matches_hf(model: nn.Module, weights: DecoderWeights) -> float:
    """The lean decoder == HF: prefill logits and K/V, then a decode step over the lean
    cache; the largest logit difference."""
    ids, nxt = _inputs()
    logits, kv, full = _hf(model, ids, nxt)
    out, step = _lean(weights, ids, nxt)
    torch.testing.assert_close(out[0], logits, **TOL)
    live = [pair for pair in kv if pair is not None]
    assert len(out) == 1 + 2 * len(live)
    for j, (k, v) in enumerate(live):
        torch.testing.assert_close(out[1 + 2 * j], k, **TOL)
        torch.testing.assert_close(out[2 + 2 * j], v, **TOL)
    torch.testing.assert_close(step[0], full, **TOL)
    return max((out[0] - logits).abs().max().item(), (step[0] - full).abs().max().item())


@pytest.mark.parametrize("family", FAMILIES)
def test_lean_graph_computes_what_hf_computes(family: str) -> None:
    model = tiny(family)
    weights = lean_of(model)
    assert _assert_matches_hf(model, weights) < 1e-4


# --- per-layer pruning, as a width space does it: first KV groups, first neurons ---------


def _rows(lin: nn.Module, idx: torch.Tensor) -> None:
    lin.weight = nn.Parameter(lin.weight[idx].clone())
    if getattr(lin, "bias", None) is not None:
        lin.bias = nn.Parameter(lin.bias[idx].clone())


def _cols(lin: nn.Module, n: int) -> None:
    lin.weight = nn.Parameter(lin.weight[:, :n].clone())


def _prune_attention(model: nn.Module, i: int, groups: int) -> None:
    """Keep layer ``i``'s first ``groups`` KV groups (heads where there is no GQA)."""
    cfg, kind = model.config, _kind(model)
    layer = _layers(model)[i]
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    q, kv = torch.arange(groups * heads // kv_heads * hd), torch.arange(groups * hd)
    if kind == "phi3":  # qkv_proj rows [all q, all k, all v]
        a = layer.self_attn
        _rows(a.qkv_proj, torch.cat([q, heads * hd + kv, (heads + kv_heads) * hd + kv]))
        _cols(a.o_proj, len(q))
        # it splits qkv by its config's head counts: a copy of its own says this layer's
        a.config = copy.copy(a.config)
        a.config.num_attention_heads, a.num_key_value_heads = len(q) // hd, groups
        return
    if kind == "gpt2":
        a, e = layer.attn, layer.attn.c_attn.weight.shape[1] // 3
        idx = torch.cat([q, e + q, 2 * e + q])  # Conv1D: [in, out]; columns [q, k, v]
        a.c_attn.weight = nn.Parameter(a.c_attn.weight[:, idx].clone())
        a.c_attn.bias = nn.Parameter(a.c_attn.bias[idx].clone())
        a.c_attn.nf, a.split_size = len(idx), len(q)
        a.c_proj.weight = nn.Parameter(a.c_proj.weight[: len(q)].clone())
        return
    if kind == "gpt_neox":
        a = layer.attention
        idx = torch.arange(heads * 3 * hd).view(heads, 3 * hd)[:groups].reshape(-1)
        _rows(a.query_key_value, idx)
        _cols(a.dense, len(q))
        return
    if kind == "falcon":
        a = layer.self_attention
        if cfg.new_decoder_architecture:  # rows group by group: [r queries, key, value]
            r = heads // cfg.num_kv_heads
            span = (r + 2) * hd
            a.num_heads, a.num_kv_heads = groups * r, groups
        elif cfg.multi_query:  # one KV group: the only size is the whole
            assert groups == 1
            return
        else:  # head by head: [query, key, value]
            span = 3 * hd
            a.num_heads = a.num_kv_heads = groups
        _rows(a.query_key_value, torch.arange(groups * span))
        _cols(a.dense, a.num_heads * hd)
        return
    a = layer.self_attn
    _rows(a.q_proj, q)
    _rows(a.k_proj, kv)
    _rows(a.v_proj, kv)
    _cols(a.out_proj if kind == "opt" else a.o_proj, len(q))
    if kind == "opt":
        a.num_heads = groups
    if kind == "olmo2":  # its q/k norms span all heads: cut with them
        a.q_norm.weight = nn.Parameter(a.q_norm.weight[q].clone())
        a.k_norm.weight = nn.Parameter(a.k_norm.weight[kv].clone())


def _prune_mlp(model: nn.Module, i: int, width: int) -> None:
    kind, layer = _kind(model), _layers(model)[i]
    keep = torch.arange(width)
    if kind == "gpt2":
        m = layer.mlp
        m.c_fc.weight = nn.Parameter(m.c_fc.weight[:, :width].clone())
        m.c_fc.bias = nn.Parameter(m.c_fc.bias[:width].clone())
        m.c_fc.nf = width
        m.c_proj.weight = nn.Parameter(m.c_proj.weight[:width].clone())
    elif kind in ("gpt_neox", "falcon"):
        _rows(layer.mlp.dense_h_to_4h, keep)
        _cols(layer.mlp.dense_4h_to_h, width)
    elif kind == "opt":
        _rows(layer.fc1, keep)
        _cols(layer.fc2, width)
    elif kind == "phi3":
        m, n = layer.mlp, layer.mlp.gate_up_proj.weight.shape[0] // 2
        _rows(m.gate_up_proj, torch.cat([keep, n + keep]))  # rows [gate, up]
        _cols(m.down_proj, width)
    else:
        _rows(layer.mlp.gate_proj, keep)
        _rows(layer.mlp.up_proj, keep)
        _cols(layer.mlp.down_proj, width)


@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_pruned_blocks(family: str) -> None:
    """Layer 0's attention keeps half its KV groups, layer 2's MLP 40 neurons: the converter
    reads the shapes from the pruned weights, the graph matches the HF model pruned so, and
    ``sliced`` on the dense weights gives the same graph."""
    model = tiny(family)
    dense = lean_of(model)
    a0, m2 = dense.layers[0][0], dense.layers[2][1]
    assert a0 is not None and m2 is not None
    keep = _half(a0.groups)
    layers = [
        (a0.sliced(keep), dense.layers[0][1]),
        dense.layers[1],
        (dense.layers[2][0], m2.sliced(40)),
    ]
    sliced = dataclasses.replace(dense, layers=layers)
    _prune_attention(model, 0, keep)
    _prune_mlp(model, 2, 40)
    pruned = lean_of(model)
    assert pruned.layers[2][1].width == 40
    ids, nxt = _inputs()
    out, step = _lean(sliced, ids, nxt)
    assert out[1].shape == (B, keep, S, a0.head_dim) and step[1].shape == (B, keep, 1, a0.head_dim)
    assert pruned.layers[0][0].groups == keep
    _assert_matches_hf(model, pruned)
    again, step_again = _lean(pruned, ids, nxt)
    for a, b in zip((*out, *step), (*again, *step_again)):
        torch.testing.assert_close(a, b, **TOL)


def _half(groups: int) -> int:
    """Half the KV groups; a multi-query model's one group stays whole."""
    return max(groups // 2, 1)


class _Dropped(nn.Module):
    """A removed block: a module without parameters that adds zeros to the residual (an
    attention module returns (output, attention weights))."""

    def __init__(self, attention: bool) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        zeros = torch.zeros_like(hidden_states)
        return (zeros, None) if self.attention else zeros


def _drop(model: nn.Module, attn_layer: int, mlp_layer: int) -> None:
    layers = _layers(model)
    setattr(layers[attn_layer], _attn_name(model), _Dropped(attention=True))
    if _kind(model) == "opt":  # OPT's MLP lives on the layer: fc1 and fc2 both give zeros
        layers[mlp_layer].fc1, layers[mlp_layer].fc2 = _Dropped(False), _Dropped(False)
    else:
        layers[mlp_layer].mlp = _Dropped(attention=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_dropped_blocks(family: str) -> None:
    model = tiny(family)
    _drop(model, attn_layer=1, mlp_layer=2)
    weights = lean_of(model)
    assert weights.layers[1][0] is None and weights.layers[2][1] is None
    assert all(weights.layers[i][0] is not None for i in (0, 2))
    _assert_matches_hf(model, weights)


# --- ONNX -----------------------------------------------------------------------------------


def _onnx_run(weights: DecoderWeights, wl: Workload, inputs: tuple[torch.Tensor, ...]):
    import onnxruntime as ort

    graph_ = build(weights, wl)
    opts = ort_options()
    if graph_.weights:
        opts.add_external_initializers(
            list(graph_.weights),
            [ort.OrtValue.ortvalue_from_numpy(a) for a in graph_.weights.values()],
        )
    sess = ort.InferenceSession(graph_.model.SerializeToString(), opts)
    return sess.run(None, {n: x.numpy() for n, x in zip(graph_.inputs, inputs)})


def _mixed(weights: DecoderWeights) -> DecoderWeights:
    """Per-layer shapes and dropped blocks: layer 0 half its groups, layer 1 without
    attention, layer 2 with 40 neurons."""
    (a0, m0), (_, m1), (a2, m2) = weights.layers
    assert a0 is not None and m2 is not None
    layers = [(a0.sliced(_half(a0.groups)), m0), (None, m1), (a2, m2.sliced(40))]
    return dataclasses.replace(weights, layers=layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_graph_computes_what_the_torch_decoder_computes(family: str) -> None:
    dense = lean_of(tiny(family))
    ids, nxt = _inputs()
    for weights in (dense, _mixed(dense), dense.without_ends([dense.layers[1]])):
        x = ids if weights.embed is not None else torch.randn(B, S, weights.hidden)
        y = nxt if weights.embed is not None else torch.randn(B, 1, weights.hidden)
        out, step = _lean(weights, x, y)
        for wl, inputs, expect in (
            (Workload("prefill", B, S), (x,), out),
            (Workload("decode", B, S), (y, *out[1:]), step),
        ):
            got = _onnx_run(weights, wl, inputs)
            assert len(got) == len(expect)
            for a, b in zip(got, expect):
                np.testing.assert_allclose(a, b.numpy(), **TOL)


def test_onnx_refuses_a_style_it_does_not_build_in_one_line(monkeypatch) -> None:
    """An activation the torch graph has and the ONNX builder does not."""
    monkeypatch.setitem(graph.ACTIVATIONS, "relu2", lambda x: torch.relu(x) ** 2)
    weights = lean_of(tiny("gpt2"))
    weights = dataclasses.replace(weights, style=dataclasses.replace(weights.style, act="relu2"))
    Decoder(weights, Workload("prefill", 1, 4))  # the torch graph builds it
    with pytest.raises(SearcherError) as err:
        build(weights, Workload("prefill", 1, 4))
    assert "\n" not in str(err.value) and "relu2" in str(err.value)
    assert "GPT-2" in str(err.value)


# --- converters and weights ------------------------------------------------------------------


def test_converters_refuse_what_they_cannot_read() -> None:
    """Each family's ``lean`` itself refuses the variants its ``check`` refuses (the graph
    would compute something else), in one line."""
    model = tiny("opt")
    model.config.do_layer_norm_before = False
    with pytest.raises(SearcherError, match="OPT-350m"):
        family_for("opt").lean(model)
    model = tiny("falcon_sequential")
    model.config.alibi = True
    with pytest.raises(SearcherError, match="ALiBi"):
        family_for("falcon").lean(model)
    model = tiny("gpt_neox")
    model.config.hidden_act = "nope"
    with pytest.raises(SearcherError, match="'nope' activation for GPT-NeoX"):
        family_for("gpt_neox").lean(model)
    with pytest.raises(SearcherError, match="activation"):
        Style(act="nope")
    olmo = lean_of(tiny("olmo2"))  # no pre-norms: a style that wants them is refused
    wrong = dataclasses.replace(olmo, style=dataclasses.replace(olmo.style, pre_norm=True))
    with pytest.raises(SearcherError, match="layer 0's attention lacks a norm tensor"):
        Decoder(wrong, Workload("prefill", 1, 4))


def test_each_model_type_is_read_by_its_own_converter() -> None:
    """The Llama family reads Granite's and OLMo2's variants with their own styles, the
    Gemma family each Gemma generation; Llama itself keeps the graph's default style."""
    assert lean_of(tiny("llama")).style == Style()
    assert lean_of(tiny("granite")).style.family == "Granite"
    assert lean_of(tiny("olmo2")).style.family == "OLMo2"
    assert lean_of(tiny("gemma3_text")).style.family == "Gemma 3"
    assert lean_of(tiny("gpt2")).style.family == "GPT-2"
    falcon = lean_of(tiny("falcon"))
    attn = falcon.layers[0][0]
    assert falcon.style.parallel and attn is not None and (attn.groups, attn.group_size) == (2, 3)
    mqa = lean_of(tiny("falcon_multi_query")).layers[0][0]
    assert mqa is not None and (mqa.groups, mqa.group_size) == (1, 6)


def test_sliced_blocks_keep_their_style_tensors() -> None:
    olmo = lean_of(tiny("olmo2")).layers[0][0]
    assert olmo is not None and olmo.q_norm is not None and olmo.k_norm is not None
    cut = olmo.sliced(1)  # 1 of 2 groups: 3 query heads, 1 KV head
    assert cut.q.shape[0] == cut.q_norm.shape[0] == 3 * 16
    assert cut.k.shape[0] == cut.k_norm.shape[0] == 16
    qwen3 = lean_of(tiny("qwen3")).layers[0][0]
    assert qwen3 is not None and qwen3.sliced(1).q_norm.shape == (16,)  # per head: whole
    gpt2 = lean_of(tiny("gpt2"))
    attn, mlp = gpt2.layers[0]
    assert attn is not None and mlp is not None and mlp.gate is None
    assert (attn.groups, attn.group_size) == (4, 1)
    cut = attn.sliced(2)
    assert cut.q_bias.shape == cut.k_bias.shape == cut.v_bias.shape == (32,)
    assert cut.o.shape == (64, 32) and cut.o_bias.shape == (64,)
    assert mlp.width == 96 and mlp.sliced(10).width == 10 and mlp.sliced(10).up_bias.shape == (10,)
    gated = lean_of(tiny("granite")).layers[0][1]
    assert isinstance(gated, MLPWeights) and gated.width == 96
    assert gated.sliced(7).gate_bias.shape == gated.sliced(7).up_bias.shape == (7,)
    # learned positions are ends: counted in the bytes, left out of block stacks
    assert gpt2.positions is not None and gpt2.without_ends(gpt2.layers).positions is None
    assert gpt2.ends_only().nbytes() > gpt2.without_ends([]).nbytes()


# --- the deployable ONNX graph: dynamic shapes and a KV cache --------------------------------


def _decoder_session(weights: DecoderWeights):
    import onnxruntime as ort

    from latency_models.onnx_decoder import build_decoder

    graph_ = build_decoder(weights, 64)
    opts = ort_options()
    opts.add_external_initializers(
        list(graph_.weights), [ort.OrtValue.ortvalue_from_numpy(a) for a in graph_.weights.values()]
    )
    return ort.InferenceSession(graph_.model.SerializeToString(), opts)


@pytest.mark.parametrize("family", FAMILIES)
def test_deployable_onnx_graph_computes_what_hf_computes(family: str) -> None:
    """``onnx_decoder``'s graph on a left-padded batch: a prefill with an empty cache, then two
    decode steps feeding its cache back, give Hugging Face's logits at every real position;
    layer 0 keeps half its KV groups, layer 1 has no attention (so no cache), layer 0 no MLP,
    layer 2 keeps 40 neurons."""
    model = tiny(family)
    a0 = lean_of(model).layers[0][0]
    assert a0 is not None
    _prune_attention(model, 0, _half(a0.groups))
    _prune_mlp(model, 2, 40)
    _drop(model, attn_layer=1, mlp_layer=0)
    past = _assert_decoder_matches_hf(model)
    assert sorted(past) == [f"past_key_values.{i}.{kv}" for i in (0, 2) for kv in ("key", "value")]
    assert past["past_key_values.0.key"].shape == (B, _half(a0.groups), S + 2, a0.head_dim)


def _assert_decoder_matches_hf(model: nn.Module) -> dict[str, np.ndarray]:
    """Row 1 of the batch left-padded by 3 tokens: prefill of S, then two decode steps; the
    cache after them."""
    sess = _decoder_session(lean_of(model))
    ids = torch.randint(0, VOCAB, (B, S + 2), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1: 3 tokens of left padding
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expect = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    names = [o.name for o in sess.get_outputs()]
    past = {
        i.name: np.zeros((B, i.shape[1], 0, i.shape[3]), dtype=np.float32)
        for i in sess.get_inputs()
        if i.name.startswith("past_key_values.")
    }
    for start, end in ((0, S), (S, S + 1), (S + 1, S + 2)):
        feed = {
            "input_ids": ids[:, start:end].numpy(),
            "attention_mask": mask[:, :end].numpy(),
            "position_ids": pos[:, start:end].numpy(),
            **past,
        }
        out = dict(zip(names, sess.run(None, feed)))
        real = mask[:, start:end].bool().numpy()
        np.testing.assert_allclose(out["logits"][real], expect[:, start:end][real].numpy(), **TOL)
        past = {
            n.replace("present.", "past_key_values."): v
            for n, v in out.items()
            if n.startswith("present.")
        }
    return past


def test_deployable_onnx_graph_applies_sliding_windows() -> None:
    """Windows of 4 tokens, shorter than the prompt: Mistral's on every layer, Qwen2's on
    its sliding layers (1 and 2), Gemma 3's on its local layers (0 and 2)."""
    import transformers as tf

    for config in (
        tf.MistralConfig(**GQA, sliding_window=4),
        tf.Qwen2Config(**GQA, use_sliding_window=True, sliding_window=4, max_window_layers=1),
        tf.Gemma3TextConfig(
            **GQA,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),  # fmt: skip
    ):
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        windows = [a.sliding_window for a, _ in lean_of(model).layers]
        assert windows.count(4) == 2 if config.model_type != "mistral" else windows == [4] * 3
        _assert_decoder_matches_hf(model)


def test_deployable_onnx_graph_rotates_by_position_under_longrope() -> None:
    """Phi-3's longrope switches to its long frequencies once a sequence passes the pretraining
    length (16 here): the graph's table (64 positions) rotates the positions below it as a
    short sequence does, so a 12-token prompt gives Hugging Face's logits."""
    import transformers as tf

    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.5, 2.0, 1.2], "long_factor": [3.0, 5.0, 8.0, 9.0],
            "original_max_position_embeddings": 16}  # fmt: skip
    config = tf.Phi3Config(
        **{**GQA, "hidden_size": 96}, pad_token_id=0, original_max_position_embeddings=16,
        rope_parameters=rope,
    )  # fmt: skip
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    sess = _decoder_session(lean_of(model))
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expect = model(ids, use_cache=False).logits.numpy()
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, 12), dtype=np.int64),
            "position_ids": np.arange(12)[None]}  # fmt: skip
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32)
    np.testing.assert_allclose(sess.run(["logits"], feed)[0], expect, **TOL)
