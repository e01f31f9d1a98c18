"""Scoring a candidate after a few steps of distillation: training-aware selection (DarwinLM).

``--select trained:STEPS`` gives every survivor of evo's last selection stage STEPS steps of
distillation from the dense model before its final score (``searcher.heal``'s ``Trainer``: KL
on logits, AdamW, warm-up and cosine over the STEPS, the run's seed, so every candidate sees
the same batches in the same order). The candidate is materialised as a compact copy; the
resident model stays dense and is the teacher.

What it trains on: the windows between the calibration windows (which the candidates are
scored on and the importance pass ranked units on) and the validation windows. It never
trains on a window it is scored on, nor on one the final validation uses.

The trained copy keeps the dense model's input embeddings and LM head (they are not trained),
so the fitness's dense reference (``W^T p`` per token, see ``searcher.fitness``) stays exact
for it, and its trained score is the same KL on the same windows as the untrained one's.
Sparsity configs keep their masks (``heal.Masks``).

Cost, in the unit of ``--evals`` (window evaluations): one training step on a batch of b
windows counts as ``STEP_COST * b`` windows: a dense teacher forward pass, the student's
forward pass and its backward pass (about two forward passes). The trained model's score
counts its windows as any score does. (``STEP_COST`` is in ``algorithms.stages``, where evo
checks that --evals reaches its first trained stage.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from searcher import data
from searcher.errors import SearcherError
from searcher.fitness import Evaluator, WindowScores
from searcher.heal import Trainer
from searcher.heal_settings import HealSettings

if TYPE_CHECKING:
    from searcher.run import SessionKey
    from spaces import SearchSpace


def training_windows(
    tokenizer: Any, text: tuple[str, str], seq_len: int, calibration: int, validation: int
) -> torch.Tensor:
    """The windows of ``text`` after the first ``calibration`` and before the last
    ``validation``: what training-aware selection trains on."""
    every = data.windows(tokenizer, text, seq_len, None, validation)
    train = every.calibration[calibration:]
    if len(train) == 0:
        raise SearcherError(
            f"--select trained needs text beyond the {calibration} calibration and {validation} "
            f"validation windows of {seq_len} tokens to train on, and {every.spec['source']} "
            "has none left: give more text (--data) or fewer or shorter windows"
        )
    return train


class TrainedScorer:
    """Scores candidates of ``space`` after distillation from the resident (dense) model, on
    the windows and against the dense reference of ``evaluator``."""

    def __init__(
        self,
        space: SearchSpace,
        evaluator: Evaluator,
        train: torch.Tensor,
        batch_size: int,
        seed: int,
        lr: float | None = None,
    ) -> None:
        """``lr``: None for ``searcher heal``'s default (1e-4)."""
        self.space = space
        self.evaluator = evaluator
        self.train = train
        self.batch_size = batch_size
        self.seed = seed
        self.lr = lr
        self.reference = evaluator.reference()
        self.masked: Sequence[str] = space.weight_names() if space.name == "sparsity" else ()

    def settings(self, steps: int) -> HealSettings:
        return HealSettings(
            steps=steps, batch_size=self.batch_size, seq_len=self.train.shape[1], lr=self.lr,
            seed=self.seed, checkpoint_every=steps, device=str(self.evaluator.device),
        )  # fmt: skip

    def trained_model(self, candidate: Sequence[int], steps: int) -> nn.Module:
        """``candidate``'s compact model after ``steps`` steps of distillation, in the run's
        dtype; the resident model is left dense."""
        teacher = self.space.structure.model  # dense again once materialised
        dtype = next(teacher.parameters()).dtype
        student = self.space.materialize(candidate)
        trainer = Trainer(
            student, teacher, self.train, None, self.settings(steps), self.masked,
            frozen_head=True,
        )  # fmt: skip
        while trainer.state.step < steps:
            trainer.step()
        return trainer.finished().to(dtype)

    def score(self, candidate: Sequence[int], steps: int, start: int, stop: int) -> WindowScores:
        """Per-window KL and NLL of ``candidate`` on windows [start, stop) after ``steps``
        steps of distillation."""
        scorer = Evaluator(
            self.trained_model(candidate, steps), self.evaluator.windows, lambda c: None, (),
            self.evaluator.batch_size, reference=self.reference,
        )  # fmt: skip
        return scorer.score((), start, stop)


def scorer_for(
    key: SessionKey, space: SearchSpace, evaluator: Evaluator, tokenizer: Any, seed: int
) -> TrainedScorer:
    """The trained scorer of a session (the driver's, or a worker's rebuilt from its key)."""
    text = data.read_text(key.data)
    train = training_windows(tokenizer, text, key.seq_len, key.calibration, key.validation)
    return TrainedScorer(space, evaluator, train, key.batch_size, seed)
