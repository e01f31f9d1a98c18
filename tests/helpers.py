"""Tiny randomly initialised models built from configs, and a tokenizer trained here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode


def tiny_config(kind: str = "llama", **overrides):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=320,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    common.update(overrides)
    return Qwen2Config(**common) if kind == "qwen2" else LlamaConfig(**common)


def tiny_model(kind: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **overrides), dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init, so pruning visibly hurts
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model.eval().requires_grad_(False)


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE trained on CPython's pydoc topics: real subword tokens, no download."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = [topics[k] for k in sorted(topics)][:60]
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def save_tiny(path: Path, kind: str = "llama", seed: int = 0, **overrides) -> Path:
    tiny_model(kind, seed, **overrides).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def random_windows(model: torch.nn.Module, n: int, seq: int, seed: int = 0) -> torch.Tensor:
    """``n`` windows of ``seq`` random token ids in the model's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, seq), generator=g)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.float()


def counted_flops(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """FLOPs torch.utils.flop_counter counts for one forward pass (eager attention)."""
    model.set_attn_implementation("eager")  # attention scores as plain, counted matmuls
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    return counter.get_total_flops()


def candidates(space, seed: int, n: int = 2) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    out = [space.dense(), (0,) * len(space.genes)]
    out += [tuple(int(rng.integers(0, k)) for k in space.n_levels) for _ in range(n)]
    return out


def toy_problem(budget: str, n_levels, flops, params, flops_base: float = 1.0):
    """A Problem whose genes cost ``weight * kept fraction`` per metric: unequal unit costs."""
    from latency_models.table import CostTable
    from searcher.budget import Budget
    from searcher.problem import Problem

    keep = tuple(tuple((lv + 1) / n for lv in range(n)) for n in n_levels)
    costs = {
        m: CostTable.build(m, base, [[w * k for k in ks] for w, ks in zip(weights, keep)])
        for m, weights, base in (("flops", flops, flops_base), ("params", params, 1.0))
    }
    return Problem(tuple(n_levels), costs, Budget.parse(budget), keep, space_name="toy")
