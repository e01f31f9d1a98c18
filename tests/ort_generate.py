"""Greedy generation from an exported ``model.onnx`` with nothing but numpy and ONNX Runtime,
as a user of the export would write it (no searcher code), and the torch reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort


def ort_session(path: str | Path) -> ort.InferenceSession:
    providers = ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), providers=providers)
    except Exception:  # this test process made ORT's global thread pool: sessions share it
        opts = ort.SessionOptions()
        opts.use_per_session_threads = False
        return ort.InferenceSession(str(path), opts, providers=providers)


def greedy(
    model: str | Path | ort.InferenceSession, prompts: list[list[int]], steps: int
) -> list[list[int]]:
    """``steps`` greedy tokens after each prompt, the prompts left-padded into one batch: a
    prefill with an empty cache, then one token at a time with the cache fed back, a growing
    attention_mask and the next position_ids. ``model``: a model.onnx or a session of one."""
    sess = model if isinstance(model, ort.InferenceSession) else ort_session(model)
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = np.zeros((n, width), dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    past = {
        i.name: np.zeros((n, i.shape[1], 0, i.shape[3]), dtype=np.float32)
        for i in sess.get_inputs()
        if i.name.startswith("past_key_values.")
    }
    names = [o.name for o in sess.get_outputs()]
    tokens = np.zeros((n, 0), dtype=np.int64)
    for _ in range(steps):
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past}
        out = dict(zip(names, sess.run(None, feed)))
        ids = out["logits"][:, -1].argmax(-1).astype(np.int64)[:, None]
        tokens = np.concatenate([tokens, ids], axis=1)
        past = {
            name.replace("present.", "past_key_values."): value
            for name, value in out.items()
            if name.startswith("present.")
        }
        mask = np.concatenate([mask, np.ones((n, 1), dtype=np.int64)], axis=1)
        positions = positions[:, -1:] + 1
    return tokens.tolist()


def torch_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Hugging Face's ``generate(do_sample=False)``: ``steps`` new tokens (the model's
    generation config is told not to stop at EOS)."""
    import torch

    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=steps,
            pad_token_id=0,
        )  # fmt: skip
    assert out.shape[1] == len(prompt) + steps
    return out[0, len(prompt) :].tolist()
