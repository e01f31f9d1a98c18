"""``searcher heal``'s settings: here, apart from the training code, so that building the
CLI's parser (which shows their defaults) does not import torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

from searcher.errors import SearcherError


@dataclass(frozen=True)
class HealSettings:
    """How to heal: ``searcher heal``'s flags."""

    steps: int = 150
    batch_size: int = 4
    seq_len: int = 256
    lr: float | None = None  # None: 1e-4 for full fine-tuning, 1e-3 for LoRA
    warmup: float = 0.1  # share of the steps
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    lora: int | None = None  # adapter rank; None: full fine-tuning
    checkpoint_every: int = 25
    eval_every: int | None = None  # None: at every checkpoint
    validation_windows: int = 16
    data: str | None = None  # None: the config's calibration text
    device: str = "cpu"
    # recompute each decoder layer in the backward pass instead of keeping its activations:
    # less memory, about one more forward pass of time, the same gradients
    gradient_checkpointing: bool = False

    def check(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "validation_windows"):
            if getattr(self, name) < 1:
                raise SearcherError(f"--{name.replace('_', '-')} must be at least 1")
        if self.seq_len < 8:
            raise SearcherError(f"--seq-len {self.seq_len} is too short: use at least 8 tokens")
        if self.lr is not None and not 0 < self.lr < 1:
            raise SearcherError(f"--lr {self.lr} is not a learning rate: give e.g. 1e-4")
        if not 0 <= self.warmup < 1:
            raise SearcherError("--warmup is a share of the steps: give 0 <= W < 1, e.g. 0.1")
        if self.clip <= 0 or self.weight_decay < 0:
            raise SearcherError("--clip must be positive and --weight-decay at least 0")
        if self.lora is not None and self.lora < 1:
            raise SearcherError(f"--lora {self.lora}: the adapter rank must be at least 1")
        if self.eval_every is not None and self.eval_every < 1:
            raise SearcherError("--eval-every must be at least 1")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-4 if self.lora is None else 1e-3

    def rate(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based): linear warm-up, then cosine to 0."""
        warm = int(self.warmup * self.steps)
        if step < warm:
            return self.learning_rate * (step + 1) / warm
        done = (step - warm) / max(self.steps - warm, 1)
        return self.learning_rate * 0.5 * (1.0 + math.cos(math.pi * done))

    def evaluated(self, step: int) -> bool:
        """Whether the held-out KL is measured after ``step`` steps (for the curve)."""
        return step == self.steps or step % (self.eval_every or self.checkpoint_every) == 0
