"""Fixtures: tiny models saved as Hugging Face directories, and token windows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import save_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved as a Hugging Face model directory, with its tokenizer."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 (biases on q/k/v) saved as a Hugging Face model directory."""
    return save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), kind="qwen2", seed=1)


@pytest.fixture
def windows() -> torch.Tensor:
    """Random token windows for the tiny models (vocab 320)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 320, (4, 32), generator=g)


@pytest.fixture(autouse=True)
def no_score_cache(monkeypatch) -> None:
    """Runs in tests share no profile scores through ~/.cache (tests of the cache set
    SEARCHER_SCORE_CACHE themselves): each test's evaluations are its own."""
    monkeypatch.setenv("SEARCHER_SCORE_CACHE", "off")
