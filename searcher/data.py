"""Calibration and validation text, tokenised into disjoint windows of the run's length."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from searcher.errors import SearcherError

DEFAULT_SOURCE = "pydoc_data.topics"


def read_text(path: str | None) -> tuple[str, str]:
    """The text and a name for where it came from: CPython's pydoc topics by default."""
    if path in (None, "", DEFAULT_SOURCE):
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics)), DEFAULT_SOURCE
    p = Path(path).expanduser()
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SearcherError(
            f"cannot read data file {path}: {exc.strerror if isinstance(exc, OSError) else exc}; "
            "pass a readable UTF-8 .txt or .jsonl file"
        ) from None
    if p.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise SearcherError(f"{path} line {n} is not valid JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise SearcherError(f"{path} line {n} has no string 'text' field")
            texts.append(record["text"])
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise SearcherError(f"data file {path} holds no text")
    return raw, str(p.resolve())


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Windows:
    """Token windows, calibration and validation disjoint, plus how to rebuild them."""

    calibration: torch.Tensor  # (n, seq_len) int64
    validation: torch.Tensor  # (m, seq_len) int64
    spec: dict[str, Any]


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(
    tokenizer: Any,
    text: tuple[str, str],
    seq_len: int,
    calibration: int | None,
    validation: int,
) -> Windows:
    """Cut ``text`` (from ``read_text``) into seq_len-token windows: calibration from the
    start (None: every window that is not a validation one), validation from the end, never
    overlapping."""
    if seq_len < 8:
        raise SearcherError(f"--seq-len {seq_len} is too short: use at least 8 tokens")
    text, name = text
    tokens = tokenize(tokenizer, text)
    total = len(tokens) // seq_len
    if calibration is None:
        calibration = max(total - validation, 1)
    if calibration + validation > total:
        raise SearcherError(
            f"the data has {len(tokens)} tokens, {total} windows of {seq_len}, but "
            f"{calibration} calibration + {validation} validation windows were asked for: "
            "give more text, a shorter --seq-len, or fewer windows"
        )
    cut = tokens[: total * seq_len].reshape(total, seq_len)
    spec = {
        "source": name,
        "sha256": text_sha256(text),
        "tokens": len(tokens),
        "seq_len": seq_len,
        "calibration_windows": calibration,
        "validation_windows": validation,
        "split": "calibration = first windows of the text, validation = last windows",
    }
    return Windows(cut[:calibration].clone(), cut[total - validation :].clone(), spec)


def held_out(tokenizer: Any, text: tuple[str, str], seq_len: int, validation: int) -> Windows:
    """Every window of ``text`` split in two: the last ``validation`` held out, all the others
    (from the start, never overlapping them) to train on."""
    return windows(tokenizer, text, seq_len, None, validation)


def eval_windows(tokenizer: Any, source: str, seq_len: int, limit: int) -> torch.Tensor:
    """Up to ``limit`` consecutive windows of a text, for scoring a saved config on it."""
    text, _ = read_text(source)
    tokens = tokenize(tokenizer, text)
    total = min(len(tokens) // seq_len, limit)
    if total < 1:
        raise SearcherError(
            f"{source} has {len(tokens)} tokens, fewer than one window of {seq_len}"
        )
    return tokens[: total * seq_len].reshape(total, seq_len)
