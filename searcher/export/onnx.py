"""``searcher export --format onnx``: the pruned model as one ONNX decoder graph, ``model.onnx``
(``latency_models.onnx_decoder``: dynamic batch, sequence and cache lengths; Optimum's input
and output names), checked in ONNX Runtime before the command returns.

The check runs one validation window of the run: a prefill of its first tokens with an empty
cache, then the rest decoded token by token with the cache the graph returns, every position's
logits against the torch model's (one forward pass over the whole window).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from searcher.errors import SearcherError

MODEL = "model.onnx"
DECODE_STEPS = 64  # at most this many cached decode steps in the check (half a short window)


def export_onnx(
    pruned: Any, session: Any, out: Path, tol: float = 1e-3, external: bool | None = None
) -> dict[str, Any]:
    """Write ``out/model.onnx`` (and ``model.onnx.data`` past 2 GB in all, or where
    ``external`` says so) for the pruned model, and check it in ONNX Runtime on a validation
    window of the session. Returns its files, sizes and the largest logit differences."""
    from latency_models.onnx_decoder import build_decoder

    start = time.perf_counter()
    weights = session.space.structure.family.lean(pruned)
    positions = getattr(pruned.config, "max_position_embeddings", None)
    decoder = build_decoder(weights, positions)
    out.mkdir(parents=True, exist_ok=True)
    files = decoder.save(out / MODEL, external)
    del decoder
    written = time.perf_counter() - start
    result: dict[str, Any] = {
        "files": [f.name for f in files],
        "bytes": sum(f.stat().st_size for f in files),
        "weight_bytes": weight_bytes(pruned),
        "write_seconds": written,
    }
    result.update(check(out / MODEL, pruned, session.windows.validation[:1].cpu(), tol))
    result["check_seconds"] = time.perf_counter() - start - written
    return result


def weight_bytes(model: Any) -> int:
    """Bytes of the model's parameters in float32, each tensor once (what a float32
    safetensors file of the pruned model holds)."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() * 4 for p in params)


def check(path: Path, model: Any, ids: Any, tol: float = 1e-3) -> dict[str, Any]:
    """ONNX Runtime's logits for the window ``ids`` [1, L]: a prefill of its first
    L - n tokens with an empty cache, then n = min(L // 2, DECODE_STEPS) cached decode steps,
    against the torch model's logits at every position (one line of error past ``tol``)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from latency_models.backends import ort_options

    n_tokens = ids.shape[1]
    steps = min(n_tokens // 2, DECODE_STEPS)
    first = n_tokens - steps
    with torch.no_grad():
        expect = model(ids, use_cache=False).logits.float().numpy()
    sess = ort.InferenceSession(str(path), ort_options(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    cache = {
        i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32)
        for i in sess.get_inputs()
        if i.name.startswith("past_key_values.")
    }
    tokens = ids.numpy().astype(np.int64)
    diffs = {"prefill": 0.0, "decode": 0.0}
    for start, end in [(0, first), *((t, t + 1) for t in range(first, n_tokens))]:
        feed = {
            "input_ids": tokens[:, start:end],
            "attention_mask": np.ones((1, end), dtype=np.int64),
            "position_ids": np.arange(start, end, dtype=np.int64)[None],
            **cache,
        }
        got = dict(zip(names, sess.run(None, feed)))
        kind = "prefill" if start == 0 else "decode"
        diff = float(np.abs(got["logits"] - expect[:, start:end]).max())
        diffs[kind] = max(diffs[kind], diff)
        if not diff <= tol:  # NaN fails too
            where = f"prefill of {end} tokens" if start == 0 else f"decode step at position {start}"
            raise SearcherError(
                f"ONNX Runtime's logits in the {where} differ from torch's by {diff:.2e} "
                f"(> {tol}): the ONNX export is not faithful (please report this)"
            )
        cache = {
            n.replace("present.", "past_key_values.", 1): v
            for n, v in got.items()
            if n.startswith("present.")
        }
    return {
        "seq_len": n_tokens,
        "prefill_tokens": first,
        "decode_steps": steps,
        "prefill_max_abs_logit_diff": diffs["prefill"],
        "decode_max_abs_logit_diff": diffs["decode"],
    }
