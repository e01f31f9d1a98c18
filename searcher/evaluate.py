"""``searcher eval``: score a saved config, a run's best config, or a pruned (or healed) model
directory against the dense model it came from."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from searcher import data, models
from searcher.errors import SearcherError
from searcher.fitness import Evaluator


def evaluate(
    path: str, data_source: str | None = None, pick: int | None = None, windows: int = 8,
    model: str | None = None, device: str = "cpu", dtype: str | None = None,
    batch_size: int | None = None, trust_remote_code: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """A model directory (``export --format pruned``, ``heal``), a run directory (its
    best.json, or entry ``pick`` of its pareto.json) or a config file, scored on ``data_source``
    (default: the windows it was validated on)."""
    from searcher.export.pruned import CONFIG
    from searcher.run import evaluate_config

    p = Path(path)
    if p.is_dir() and (p / CONFIG).is_file():
        if pick is not None:
            raise SearcherError(f"--pick applies to configs; {path} is a model directory")
        return evaluate_model(
            path, data_source, windows, model, device, batch_size or 4, trust_remote_code
        )
    if p.is_dir():
        if not (p / "best.json").is_file():
            raise SearcherError(
                f"{path} is neither a searcher run (best.json) nor a pruned model directory "
                f"({CONFIG})"
            )
        p = p / ("best.json" if pick is None else "pareto.json")
    return evaluate_config(
        str(p), data_source, pick, windows, model, device, dtype, batch_size, trust_remote_code
    )


def evaluate_model(
    path: str, data_source: str | None = None, windows: int = 8, model: str | None = None,
    device: str = "cpu", batch_size: int = 4, trust_remote_code: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """KL to the dense model and perplexity of a pruned model directory. Without
    ``data_source``: a healed model's held-out windows, else its run's validation windows."""
    from searcher.export.pruned import CONFIG, load_pruned
    from searcher.run import model_source

    try:
        header = json.loads((Path(path) / CONFIG).read_text(encoding="utf-8"))["searcher"]
        identity, dtype, d = header["model"], header.get("dtype", "float32"), header["data"]
        source = model_source(header, model)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise SearcherError(
            f"{path}/{CONFIG} does not say which model and data it was made from: it is not a "
            "searcher export"
        ) from None
    dense = models.load(source, device, dtype, trust_remote_code)
    if not models.same_model(dense.identity, identity):
        raise SearcherError(
            f"{path} was pruned from {identity['source']} (fingerprint "
            f"{identity['fingerprint']}), not from {dense.identity['source']}: pass --model with "
            "the dense model it came from"
        )
    pruned = load_pruned(path, getattr(torch, dtype)).to(device)
    heal = header.get("heal", {}).get("data")
    seq_len = (heal or d)["seq_len"]
    if data_source is not None:
        ids = data.eval_windows(dense.tokenizer, data_source, seq_len, windows)
        where = data_source
    else:
        text = data.read_text(d["source"] if heal is None else heal["source"])
        if data.text_sha256(text[0]) != (heal or d)["sha256"]:
            raise SearcherError(
                f"{text[1]} has changed since {path} was made: pass the text to score on "
                "with --data"
            )
        if heal is None:
            cut = data.windows(
                dense.tokenizer, text, seq_len, d["calibration_windows"], d["validation_windows"]
            )
            where = f"validation windows of {d['source']}"
        else:
            cut = data.held_out(dense.tokenizer, text, seq_len, heal["validation_windows"])
            where = f"held-out windows of {heal['source']} (never healed on)"
        ids = cut.validation
    # full dense distributions: a healed model's LM head is not the dense one's
    reference = Evaluator(
        dense.model, ids, lambda c: None, (), batch_size, hidden_reference=False
    ).reference()
    scored = Evaluator(pruned, ids, lambda c: None, (), batch_size, reference=reference)
    scores = scored.score((), 0, scored.n_windows)
    return {
        "config": str(path),
        "data": where,
        "windows": scored.n_windows,
        "seq_len": seq_len,
        "kl": float(scores.kl.mean()),
        "ppl": math.exp(float(scores.nll.mean())),
        "dense_ppl": math.exp(float(reference.dense_nll.mean())),
        "fractions": header.get("fractions", {}),
        "healed": "heal" in header,
    }
